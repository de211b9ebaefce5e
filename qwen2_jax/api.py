"""The public functions: load, init, forward (see DESIGN.md's contract)."""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config
from qwen2_jax.hf_io import read_hf_config, read_hf_params
from qwen2_jax.masks import positions_from_mask
from qwen2_jax.model import REMAT_POLICIES, Qwen2ForCausalLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype: str | None, config: Qwen2Config) -> jnp.dtype:
    """The storage dtype for `dtype`; None: float32 on CPU, the checkpoint's dtype elsewhere.

    CPU gets float32 because XLA:CPU bfloat16 matmuls are ~15x slower than float32.
    """
    if dtype is None:
        if jax.default_backend() == "cpu" or config.dtype not in DTYPES:
            return jnp.dtype(jnp.float32)
        return jnp.dtype(DTYPES[config.dtype])
    if str(dtype) not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    return jnp.dtype(DTYPES[str(dtype)])


def load(path: str | os.PathLike, dtype: str | None = None, mesh=None) -> tuple[Qwen2Config, dict]:
    """Reads a Hugging Face model folder into (config, params).

    path: a folder with config.json and *.safetensors (one file, or shards with
    model.safetensors.index.json). dtype: "float32" | "bfloat16" | "float16" | None (see
    `resolve_dtype`). Params are a plain nested dict of jax arrays (paths in `model.py`).
    """
    if mesh is not None:
        raise NotImplementedError("load(mesh=...) arrives with the sharding issue; pass mesh=None")
    folder = os.fspath(path)
    config = read_hf_config(folder)
    params = read_hf_params(folder, config, np.dtype(resolve_dtype(dtype, config)))
    return config, jax.tree.map(jnp.asarray, params)


def init(config: Qwen2Config, rng: jax.Array, dtype: str = "float32") -> dict:
    """Randomly initialized params (normal(initializer_range) weights, zero biases, unit norms)."""
    model = Qwen2ForCausalLM(config, param_dtype=DTYPES[dtype])
    ids = jnp.zeros((1, 1), jnp.int32)
    variables = jax.jit(model.init)(rng, ids, ids, ids + 1, ids)
    return nn.meta.unbox(variables["params"])


def param_logical_axes(config: Qwen2Config) -> dict:
    """The logical axis names of every parameter (same tree as the params), without allocating."""
    model = Qwen2ForCausalLM(config)
    ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    boxed = jax.eval_shape(model.init, jax.random.key(0), ids, ids, ids, ids)["params"]
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "remat"))
def _forward(config, dtype, remat, params, input_ids, token_mask, positions, segment_ids):
    if positions is None:
        positions = positions_from_mask(token_mask, segment_ids)
    model = Qwen2ForCausalLM(config, dtype=dtype, remat=remat)
    return model.apply({"params": params}, input_ids, positions, token_mask, segment_ids)


def forward(config: Qwen2Config, params: dict, input_ids, attention_mask=None, *,
            position_ids=None, segment_ids=None, dtype=None, remat: str = "none") -> jax.Array:
    """Float32 logits [B, T, V] for int input_ids [B, T].

    attention_mask [B, T]: 1 = real token, 0 = padding (left or right), as in transformers.
    segment_ids [B, T]: packed examples; attention never crosses segments. position_ids
    [B, T]: default counts real tokens, restarting per segment, so a padded or packed example
    gives the logits it gives alone. dtype: compute dtype (default: the params' dtype).
    remat: one of REMAT_POLICIES (what the backward pass recomputes; no effect on values).
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {sorted(REMAT_POLICIES)}")

    def as_ids(x, default, name):
        if x is None:
            return default
        x = jnp.asarray(x, jnp.int32)
        if x.shape != input_ids.shape:
            raise ValueError(f"{name} has shape {x.shape}; expected {input_ids.shape} like input_ids")
        return x

    token_mask = as_ids(attention_mask, jnp.ones_like(input_ids), "attention_mask")
    segment_ids = as_ids(segment_ids, jnp.zeros_like(input_ids), "segment_ids")
    positions = as_ids(position_ids, None, "position_ids")
    dtype = jnp.dtype(dtype) if dtype is not None else params["embed_tokens"]["embedding"].dtype
    return _forward(config, dtype, remat, params, input_ids, token_mask, positions, segment_ids)
