"""The public functions: load, init, forward (see DESIGN.md's contract)."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import logging
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from qwen2_jax import lora
from qwen2_jax import quantize as quant
from qwen2_jax.checkpoint import orbax_io
from qwen2_jax.checkpoint.hf_io import CheckpointError, open_checkpoint, read_hf_params
from qwen2_jax.checkpoint.output import INCOMPLETE_MARKER
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import check_token_ids, compute_dtype
from qwen2_jax.masks import positions_from_mask
from qwen2_jax.model import REMAT_POLICIES, Qwen2ForCausalLM
from qwen2_jax.sharding import (
    auto_axes,
    mesh_context,
    mesh_of,
    named_sharding,
    resolve_rules,
    shard_input,
    use_mesh,
)

logger = logging.getLogger("qwen2_jax")

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | None, stored: str | None) -> jnp.dtype:
    """The storage dtype for `dtype`; None: float32 on CPU, the checkpoint's (`stored`)
    elsewhere.

    CPU gets float32 because XLA:CPU bfloat16 matmuls are ~15x slower than float32.
    """
    if dtype is None:
        if jax.default_backend() == "cpu" or stored not in DTYPES:
            return jnp.dtype(jnp.float32)
        return jnp.dtype(DTYPES[stored])
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[str(dtype)])


def load(path: str | os.PathLike, dtype: str | None = None, mesh: Mesh | None = None,
         rules=None, quantize: str | None = None, quantize_embeddings: bool = False,
         adapter: str | os.PathLike | None = None) -> tuple[Qwen2Config, dict]:
    """Reads a model folder into (config, params).

    path: a Hugging Face folder (config.json and *.safetensors: one file, or shards with
    model.safetensors.index.json), an Orbax checkpoint folder written by `qwen2-jax convert`
    or training (see `orbax_io`), or a llama.cpp `.gguf` file (dequantized one tensor at a
    time, as transformers does; needs the `gguf` package). dtype: "float32" | "bfloat16" | "float16" | None
    (see `resolve_dtype`). Params are a plain nested dict of jax arrays (paths in `model.py`).
    mesh: place every parameter already sharded by `rules` (see `sharding.resolve_rules`);
    each process reads from disk only the slices (HF) or chunks (Orbax) its own devices hold.
    Any `jax.make_mesh` mesh works (see `sharding`: missing axes, other names, Explicit axes).
    None: one device.

    quantize: "int8" | "int4" | None: every projection weight-only quantized (`quantize.py`)
    as it is read, one parameter at a time, so the float model is never whole in memory;
    quantize_embeddings: the embedding (and lm_head) too. An Orbax folder written by
    `convert --quantize` is restored as it was quantized (quantize may then be omitted).

    adapter: a PEFT LoRA adapter folder (`lora.py`), applied unmerged: its A and B (scale
    folded into B) sit beside the kernels they adapt, placed by the kernels' logical axes.
    """
    config, params = _load_base(os.fspath(path), dtype, mesh, rules, quantize,
                                quantize_embeddings)
    if adapter is not None:
        settings, adapters = lora.load_adapter(os.fspath(adapter), config)
        params = lora.combine(params, place_adapters(config, settings,
                                                     lora.folded(adapters, settings), mesh,
                                                     rules))
        logger.info("adapter %s: LoRA r=%d on %s", adapter, settings.rank,
                    ",".join(settings.targets))
    return config, params


def place_adapters(config: Qwen2Config, settings: lora.LoRAConfig, adapters: dict,
                   mesh: Mesh | None, rules=None) -> dict:
    """Adapters on the first device, or sharded on `mesh` by their logical axes."""
    return _place_by_axes(adapters, lambda: lora.logical_axes(
        config, settings, param_logical_axes(config)), mesh, rules)


def place_stacked_adapters(config: Qwen2Config, adapters: dict, mesh: Mesh | None,
                           rules=None) -> dict:
    """A `lora.stack_adapters` tree placed as `place_adapters` places one adapter (the
    adapter axis is never split)."""
    return _place_by_axes(adapters, lambda: lora.stacked_logical_axes(
        config, adapters, param_logical_axes(config)), mesh, rules)


def _place_by_axes(adapters: dict, axes_of, mesh: Mesh | None, rules) -> dict:
    """device_put of each leaf on the first device, or on mesh by axes_of()'s names."""
    if mesh is None:
        return jax.device_put(adapters, jax.local_devices()[0])
    rules = resolve_rules(rules, mesh)
    axes = axes_of()
    return jax.tree.map(lambda x, names: jax.device_put(
        x, named_sharding(names, x.shape, mesh, rules)), adapters, axes,
        is_leaf=lambda x: isinstance(x, tuple))


def _load_base(folder: str, dtype, mesh, rules, quantize, quantize_embeddings):
    """load without the adapter."""
    start = time.perf_counter()
    quant.check_mode(quantize)
    if os.path.exists(os.path.join(folder, INCOMPLETE_MARKER)):
        raise CheckpointError(f"{folder}: incomplete: left by an interrupted qwen2-jax convert, "
                              "export or save; write it again")
    if orbax_io.is_orbax_folder(folder):
        metadata = orbax_io.read_metadata(folder)
        stored, stored_quant = metadata["dtype"], metadata.get("quantize")
        config = Qwen2Config.from_file(folder)
        target = resolve_dtype(dtype, stored)
        if stored_quant is not None:
            wanted = {"weights": quantize or stored_quant["weights"],
                      "embeddings": quantize_embeddings or stored_quant["embeddings"]}
            if wanted != stored_quant:
                raise ValueError(f"{folder} is quantized as {stored_quant}; it cannot be loaded "
                                 f"as {wanted} (load its float source instead)")
            quantize, quantize_embeddings = stored_quant["weights"], stored_quant["embeddings"]
            params = orbax_io.restore_params(folder, _abstract_arrays(
                config, target, mesh, rules, quantize, quantize_embeddings))
        elif quantize is None:
            _check_embeddings_flag(quantize, quantize_embeddings)
            params = orbax_io.restore_params(folder, _abstract_arrays(config, target, mesh,
                                                                      rules))
        else:  # each float parameter restored alone, then quantized
            quantizer = _Quantizer(config, mesh, rules, quantize, quantize_embeddings)
            params = quant.map_params(
                _abstract_arrays(config, target, mesh, rules),
                lambda path, abstract: quantizer(path, orbax_io.restore_one(folder, path,
                                                                             abstract)))
        params = jax.block_until_ready(params)
        release_freed_memory()
        logger.info("loaded %s (Orbax, %s%s) in %.1f s", folder, stored,
                    f", {quantize}" if quantize else "", time.perf_counter() - start)
        return config, params
    _check_embeddings_flag(quantize, quantize_embeddings)
    config, ckpt, _ = open_checkpoint(folder)
    quantizer = None
    if quantize is not None:
        quantizer = _Quantizer(config, mesh, rules, quantize, quantize_embeddings)
    params, bytes_read = read_hf_params(ckpt, np.dtype(resolve_dtype(dtype, config.dtype)),
                                        _placement(config, mesh, rules), quantizer)
    jax.block_until_ready(params)
    release_freed_memory()
    logger.info("loaded %s: read %.1f MB in %.1f s%s", folder, bytes_read / 1e6,
                time.perf_counter() - start, f", quantized {quantize}" if quantize else "")
    return config, params


def _check_embeddings_flag(quantize: str | None, quantize_embeddings: bool) -> None:
    if quantize is None and quantize_embeddings:
        raise ValueError("quantize_embeddings needs quantize='int8' or 'int4'")


class _Quantizer:
    """Turns one float parameter into its quantized arrays (`quantize.quantize_param`), placed
    as `param_shardings` of the quantized tree; parameters that stay float pass through."""

    def __init__(self, config, mesh, rules, mode: str, embeddings: bool):
        self.mode, self.embeddings = mode, embeddings
        self.axes = param_logical_axes(config)
        self.placement = _placement(config, mesh, rules, mode, embeddings)

    def __call__(self, path: tuple[str, ...], array: jax.Array) -> dict:
        if not quant.quantizes(path, self.embeddings):
            return {path[-1]: array}
        lead = quant.stacked_dims(_at(self.axes, path))
        node = _at(self.placement, path[:-1])
        names = ("qembedding" if path[-1] == "embedding" else "qkernel", "qscale")
        shardings = {name: node[name] for name in names}
        out = jax.jit(quant.quantize_param, static_argnums=(0, 2, 3), out_shardings=shardings)(
            path, array, lead, self.mode)
        array.delete()  # the float weight goes now, not at the next collection
        return out


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def release_freed_memory() -> None:
    """Hands the memory that reading freed back to the system (a garbage collection, then
    glibc's malloc_trim).

    Restoring reads every tensor through host buffers that reference cycles keep alive until
    a collection, and glibc keeps freed memory in its arenas: without this a process that
    loaded the 0.5B model in float32 (2.4 GB) stays at 5.0 GB resident, with it at 2.7 GB.
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def init(config: Qwen2Config, rng: jax.Array, dtype: str = "float32", mesh: Mesh | None = None,
         rules=None) -> dict:
    """Randomly initialized params (normal(initializer_range) weights, zero biases, unit norms).

    With a mesh, each device computes only its own shards (jit with out_shardings); the values
    equal the unsharded init's (JAX's partitionable threefry RNG).
    """
    model = Qwen2ForCausalLM(config, param_dtype=DTYPES[dtype])

    def init_params(rng):
        ids = jnp.zeros((1, 1), jnp.int32)
        return nn.meta.unbox(model.init(rng, ids, ids, ids + 1, ids)["params"])

    if mesh is not None and isinstance(getattr(rng, "sharding", None), NamedSharding):
        # A key made inside the caller's `jax.set_mesh(explicit_mesh)` is typed as on that mesh.
        rng = jax.device_put(rng, NamedSharding(auto_axes(mesh), PartitionSpec()))
    with mesh_context(mesh):
        return jax.jit(init_params, out_shardings=_placement(config, mesh, rules))(rng)


@functools.lru_cache(maxsize=8)  # a trace of the whole model; load asks several times
def _abstract_params(config: Qwen2Config, quantize: str | None = None,
                     quantize_embeddings: bool = False) -> dict:
    """Params as shapes with their logical-axis boxes, without allocating; quantized as
    `load(quantize=...)` gives them."""
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(Qwen2ForCausalLM(config).init, jax.random.key(0), ids, ids, ids,
                           ids)["params"]
    if quantize is None:
        return boxed
    return quant.quantize_abstract(boxed, quantize, quantize_embeddings)


def _abstract_arrays(config: Qwen2Config, target, mesh, rules, quantize: str | None = None,
                     quantize_embeddings: bool = False) -> dict:
    """ShapeDtypeStructs placed for restoring: float params in `target`, quantized ones as
    they are stored (int8/uint8 values, float32 scales)."""
    boxed = nn.meta.unbox(_abstract_params(config, quantize, quantize_embeddings))
    placement = _placement(config, mesh, rules, quantize, quantize_embeddings)
    return quant.map_params(boxed, lambda path, x: {path[-1]: jax.ShapeDtypeStruct(
        x.shape, target if quant.is_float_param(path) else x.dtype,
        sharding=_at(placement, path))})


def param_logical_axes(config: Qwen2Config, quantize: str | None = None,
                       quantize_embeddings: bool = False) -> dict:
    """The logical axis names of every parameter (same tree as the params), without allocating."""
    return nn.get_partition_spec(_abstract_params(config, quantize, quantize_embeddings))


def param_shardings(config: Qwen2Config, mesh: Mesh, rules=None, quantize: str | None = None,
                    quantize_embeddings: bool = False) -> dict:
    """The NamedSharding of every parameter on `mesh` under `rules` (same tree as the params)."""
    rules = resolve_rules(rules, mesh)
    boxed = _abstract_params(config, quantize, quantize_embeddings)
    return jax.tree.map(lambda box: named_sharding(box.names, box.value.shape, mesh, rules),
                        boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def _placement(config: Qwen2Config, mesh: Mesh | None, rules, quantize: str | None = None,
               quantize_embeddings: bool = False) -> dict:
    """param_shardings, or every parameter on the first device when there is no mesh."""
    if mesh is not None:
        return param_shardings(config, mesh, rules, quantize, quantize_embeddings)
    device = SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda _: device,
                        param_logical_axes(config, quantize, quantize_embeddings),
                        is_leaf=lambda x: isinstance(x, PartitionSpec))


@functools.partial(jax.jit, static_argnames=("config", "dtype", "remat", "mesh", "rules",
                                             "moe_dispatch", "router_logits"))
def _forward(config, dtype, remat, mesh, rules, moe_dispatch, router_logits, params, input_ids,
             token_mask, positions, segment_ids):
    if positions is None and token_mask is not None:
        positions = positions_from_mask(token_mask, segment_ids)
    model = Qwen2ForCausalLM(config, dtype=dtype, remat=remat, moe_dispatch=moe_dispatch)
    with use_mesh(mesh, rules):
        if not router_logits:
            return model.apply({"params": params}, input_ids, positions, token_mask, segment_ids)
        logits, state = model.apply({"params": params}, input_ids, positions, token_mask,
                                    segment_ids, mutable=["intermediates"])
    return logits, sparse_router_logits(config, state["intermediates"])


def sparse_router_logits(config: Qwen2Config, intermediates: dict) -> jax.Array:
    """The sown router logits of every sparse layer, in layer order: [layers, N, E]."""
    if "layers" in intermediates:  # scanned: already stacked over layers
        return intermediates["layers"]["mlp"]["router_logits"][0]
    return jnp.stack([intermediates[f"layers_{i}"]["mlp"]["router_logits"][0]
                      for i, sparse in enumerate(config.sparse_layers) if sparse])


def forward(config: Qwen2Config, params: dict, input_ids, attention_mask=None, *,
            position_ids=None, segment_ids=None, dtype=None, remat: str = "none",
            mesh: Mesh | None = None, rules=None, moe_dispatch: str = "sorted",
            output_router_logits: bool = False):
    """Float32 logits [B, T, V] for int input_ids [B, T].

    attention_mask [B, T]: 1 = real token, 0 = padding (left or right), as in transformers.
    segment_ids [B, T]: packed examples; attention never crosses segments. position_ids
    [B, T]: default counts real tokens, restarting per segment, so a padded or packed example
    gives the logits it gives alone. dtype: compute dtype (default: the params' dtype).
    remat: one of REMAT_POLICIES (what the backward pass recomputes; no effect on values).
    mesh, rules: where activations go (default: the mesh the params live on, default rules;
    rules that name an axis of a user's own mesh must be passed here as to `load`); inputs
    may be host arrays every process holds in full; an id outside [0, vocab_size) raises. Logits come back sharded over
    batch (and vocab) on the mesh. moe_dispatch: "sorted" (each token through its top-k
    experts only) or "dense" (every expert, the reference). output_router_logits: return
    (logits, router logits [sparse layers, B*T, E]) for `moe.load_balancing_loss`.
    """
    mesh = mesh if mesh is not None else mesh_of(params)
    rules = resolve_rules(rules, mesh)
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    check_token_ids(input_ids, config.vocab_size, "input_ids")  # before int32 could wrap them
    input_ids = input_ids.astype(np.int32)
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")

    def as_ids(x, default, name):
        if x is None:
            return default
        x = np.asarray(x, np.int32)
        if x.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {x.shape}; expected {input_ids.shape} like input_ids")
        return x

    whole_rows = attention_mask is None and segment_ids is None  # kernels need no segments
    token_mask = as_ids(attention_mask, np.ones(input_ids.shape, np.int32), "attention_mask")
    segment_ids = as_ids(segment_ids, np.zeros(input_ids.shape, np.int32), "segment_ids")
    if whole_rows:
        token_mask = segment_ids = None
    positions = as_ids(position_ids, None, "position_ids")
    if mesh is not None:
        input_ids, token_mask, segment_ids, positions = (
            None if x is None else shard_input(x, mesh, ("batch", "length"), rules)
            for x in (input_ids, token_mask, segment_ids, positions))
    dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype(params)
    if moe_dispatch not in ("sorted", "dense"):
        raise ValueError(f"moe_dispatch {moe_dispatch!r} is not 'sorted' or 'dense'")
    if output_router_logits and not any(config.sparse_layers):
        raise ValueError("output_router_logits needs a qwen2_moe config with sparse layers")
    with mesh_context(mesh):
        return _forward(config, dtype, remat, mesh, rules, moe_dispatch, output_router_logits,
                        params, input_ids, token_mask, positions, segment_ids)
