"""Weight-only int8 and int4 quantization, and the int8 KV cache.

A quantized projection keeps its name and trades `kernel` for two parameters:

    qkernel  int8  [*in, *out]            int8: symmetric, one scale per output channel
             uint8 [*in[:-1], in/2, *out]  int4: symmetric, two values a byte (packed)
    qscale   float32 [*out]                int8
             float32 [*in[:-1], in/GROUP, *out]  int4: one scale per GROUP inputs along the
                                           last input dim (o_proj's H when it is < GROUP)

and a quantized table trades `embedding` [V, D] for `qembedding` and `qscale` ([V] for int8,
[V, D/GROUP] for int4). The quantized tree keeps logical axes (`quantized_axes`), so meshes,
Orbax and the server take it as they take float params; `layers.Linear` and
`layers.Embedding` see which kind they were given. Norms, biases, the MoE router and the
routed experts stay float.

Why our own and not qwix (0.1.8, read and measured): for a float activation times a quantized
weight, `qwix.dot_general` always dequantizes the whole weight first and relies on XLA to fuse
that into the dot. TPU and GPU do; XLA:CPU does not, and writes the float weight out (10x
slower than a float32 weight for one row, measured), so the CPU decode path needs the loop in
`quantized_dot` that qwix's einsum cannot express. Its `quantize_model` intercepts a Flax
model's ops at trace time; our params are a plain pytree with logical axes, which the server,
Orbax and the meshes already move, and two params a projection keep that so.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

MODES = ("int8", "int4")
KV_CACHE_DTYPES = ("auto", "int8")
GROUP = 128
# Rows of the weight dequantized per step of the few-rows CPU loop (`quantized_dot`): the
# float tile stays in cache instead of becoming a whole float weight in memory.
CPU_BLOCK = 32
CPU_MAX_ROWS = 64
CPU_TABLE_BLOCK = 128
# Projections whose kernel has two input dims ([N, H, D]); every other has one.
TWO_INPUT_DIMS = ("o_proj",)
NOT_QUANTIZED = ("gate", "shared_expert_gate")  # MoE routers: tiny, and decide routing


def check_mode(quantize: str | None, flag: str = "quantize") -> None:
    if quantize is not None and quantize not in MODES:
        raise ValueError(f"{flag} {quantize!r} is not one of {MODES} (or None for float)")


def group_size(inputs: int) -> int:
    """int4's group along an input dim of `inputs`: GROUP, or the largest even divisor of it
    below GROUP (a head of 64 in o_proj)."""
    size = math.gcd(inputs, GROUP)
    if size % 2:
        raise ValueError(f"int4 needs an even input dimension to pack two values a byte; "
                         f"got {inputs}")
    return size


# -- quantizing -----------------------------------------------------------------------------


def quantize_int8(w: jax.Array, axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """Symmetric int8 over `axes` (the input dims): (int8 like w, float32 scale without axes)."""
    w = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=axes, keepdims=True) / 127.0
    safe = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8)
    return q, jnp.squeeze(scale, axes)


def quantize_int4(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """Symmetric int4 in groups along `axis`: (uint8 with `axis` halved, two values a byte;
    float32 scale with `axis` cut to its group count). Byte j of a group holds its value j in
    the low nibble and value j + size/2 in the high one, so each half of a group unpacks to a
    contiguous run of inputs (no interleaving, see `_blocked_dot`)."""
    w = jnp.moveaxis(w.astype(jnp.float32), axis, -1)  # [..., I]
    size = group_size(w.shape[-1])
    groups = w.reshape(*w.shape[:-1], -1, 2, size // 2)  # [..., I/gs, 2, gs/2]
    scale = jnp.max(jnp.abs(groups), axis=(-2, -1)) / 7.0  # [..., I/gs]
    safe = jnp.where(scale == 0, 1.0, scale)[..., None, None]
    q = jnp.clip(jnp.round(groups / safe), -7, 7).astype(jnp.int8)
    packed = (q[..., 0, :] & 0xF) | (q[..., 1, :] << 4)  # [..., I/gs, gs/2]
    packed = jax.lax.bitcast_convert_type(packed.reshape(*w.shape[:-1], -1), jnp.uint8)
    return jnp.moveaxis(packed, -1, axis), jnp.moveaxis(scale, -1, axis)


def unpack_int4(packed: jax.Array) -> tuple[jax.Array, jax.Array]:
    """uint8 bytes -> (their low nibbles, their high nibbles) as int8 values in [-8, 7]."""
    signed = jax.lax.bitcast_convert_type(packed, jnp.int8)
    return jnp.left_shift(signed, 4) >> 4, signed >> 4  # arithmetic shifts sign-extend


def dequantize(q: jax.Array, scale: jax.Array, axis: int, dtype=jnp.float32) -> jax.Array:
    """The float weight of a quantized one; `axis`: the last input dim (int4's grouped one).
    int8's scale has no input dims; int4's has `axis` cut to its group count."""
    if q.dtype == jnp.int8:
        extra = q.ndim - scale.ndim  # the input dims the scale lacks, at axis - extra + 1 ..
        first = axis - extra + 1
        return q.astype(dtype) * jnp.expand_dims(scale, tuple(range(first, first + extra))).astype(dtype)
    packed = jnp.moveaxis(q, axis, -1)  # [..., I/2]
    groups = scale.shape[axis]
    packed = packed.reshape(*packed.shape[:-1], groups, -1)  # [..., I/gs, gs/2]
    values = jnp.stack(unpack_int4(packed), axis=-2).astype(dtype)  # [..., I/gs, 2, gs/2]
    values = values * jnp.moveaxis(scale, axis, -1)[..., None, None].astype(dtype)
    return jnp.moveaxis(values.reshape(*values.shape[:-3], -1), -1, axis)


# -- matmuls ----------------------------------------------------------------------------------


def quantized_dot(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int, dtype,
                  precision=None) -> jax.Array:
    """`x @ dequantize(q)` over x's trailing `n_in` dims, without a float weight in memory.

    XLA fuses the dequantization into the dot on TPU and GPU. XLA:CPU does not: it writes the
    whole float weight, then multiplies (measured 10x slower than a float32 weight for one
    row). So on CPU, for a few rows (decoding), the weight is dequantized CPU_BLOCK input rows
    at a time in a loop, each tile used while it is in cache; many rows (prefill) amortize
    the whole-weight dequantization over the rows.
    """
    lead = x.shape[:x.ndim - n_in]
    rows = math.prod(lead)
    if jax.default_backend() == "cpu" and rows <= CPU_MAX_ROWS:
        return _blocked_dot(x, q, scale, n_in, dtype)
    w = dequantize(q, scale, n_in - 1, dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    return jax.lax.dot_general(x.astype(dtype), w, (contract, ((), ())), precision=precision)


def _blocked_dot(x, q, scale, n_in, dtype):
    """The few-rows CPU form: a fori_loop over blocks of the flattened input dim."""
    lead, features = x.shape[:x.ndim - n_in], q.shape[n_in:]
    inputs = math.prod(x.shape[x.ndim - n_in:])
    x2 = x.reshape(-1, inputs).astype(dtype)  # [M, I]
    outputs = math.prod(features)
    int4 = q.dtype == jnp.uint8
    if int4:
        block = inputs // math.prod(scale.shape[:n_in])  # one group a step
        q2 = q.reshape(-1, block // 2, outputs)  # [I/gs, gs/2, O]
        s2 = scale.reshape(-1, outputs)  # [I/gs, O], float32
        halves = x2.reshape(x2.shape[0], -1, 2, block // 2)  # [M, I/gs, 2, gs/2]
    else:
        block = math.gcd(inputs, CPU_BLOCK)
        q2 = q.reshape(-1, block, outputs)  # [I/b, b, O]
        xb = x2.reshape(x2.shape[0], -1, block)  # [M, I/b, b]

    def dot(a, w):  # float32 sums: a bfloat16 running sum would round once a step
        return jnp.dot(a, w.astype(dtype), preferred_element_type=jnp.float32)

    def step(i, acc):
        if int4:  # the group's two halves, each a plain dot, scaled on the [M, O] output
            low, high = unpack_int4(q2[i])  # [gs/2, O]
            return acc + (dot(halves[:, i, 0], low) + dot(halves[:, i, 1], high)) * s2[i]
        return acc + dot(xb[:, i], q2[i])

    y = jax.lax.fori_loop(0, q2.shape[0], step,
                          jnp.zeros((x2.shape[0], outputs), jnp.float32))  # [M, O]
    if not int4:
        y = y * scale.reshape(outputs)
    return y.astype(dtype).reshape(*lead, *features)


def quantized_attend(x: jax.Array, q: jax.Array, scale: jax.Array, dtype,
                     precision=None) -> jax.Array:
    """`x [..., D] @ dequantize(table [V, D]).T` -> float32 [..., V]: the quantized lm_head,
    on CPU for a few rows a loop over blocks of CPU_TABLE_BLOCK vocab rows (as
    `quantized_dot`), the table never transposed or dequantized whole."""
    lead, vocab = x.shape[:-1], q.shape[0]
    block = math.gcd(vocab, CPU_TABLE_BLOCK)
    if jax.default_backend() != "cpu" or math.prod(lead) > CPU_MAX_ROWS or block < 8:
        w = dequantize(q, scale, 1, dtype)  # [V, D]
        return jnp.einsum("...D,VD->...V", x.astype(dtype), w, precision=precision,
                          preferred_element_type=jnp.float32)
    x2 = x.reshape(-1, x.shape[-1]).astype(dtype)  # [M, D]
    qb = q.reshape(vocab // block, block, q.shape[1])  # [V/b, b, D or D/2]
    sb = scale.reshape(vocab // block, block, *scale.shape[1:])  # [V/b, b(, G)]

    def step(i, y):
        w = dequantize(qb[i], sb[i], 1, dtype)  # [b, D]
        part = jnp.einsum("MD,bD->Mb", x2, w, preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(y, part, i * block, axis=1)

    y = jax.lax.fori_loop(0, vocab // block, step, jnp.zeros((x2.shape[0], vocab), jnp.float32))
    return y.reshape(*lead, vocab)


def quantized_lookup(q: jax.Array, scale: jax.Array, ids: jax.Array, dtype) -> jax.Array:
    """Rows `ids` of a quantized table, dequantized: [*ids.shape, D]."""
    return dequantize(jnp.take(q, ids, axis=0), jnp.take(scale, ids, axis=0), ids.ndim, dtype)


# -- whole param trees ------------------------------------------------------------------------


def _is_table(path: tuple[str, ...]) -> bool:
    return path[-1] == "embedding"


def _input_dims(path: tuple[str, ...]) -> int:
    return 2 if path[-2] in TWO_INPUT_DIMS else 1


def quantizes(path: tuple[str, ...], embeddings: bool) -> bool:
    """Whether the parameter at `path` (a tuple of dict keys) is quantized."""
    if path[-1] == "kernel":
        return path[-2] not in NOT_QUANTIZED
    return embeddings and _is_table(path)


def quantize_param(path: tuple[str, ...], w: jax.Array, lead: int, mode: str) -> dict:
    """{name: array} replacing the parameter at `path`; `lead`: its stacked dims (layers)."""
    if _is_table(path):  # [V, D]: per row (an output channel of the lm_head)
        q, scale = quantize_int8(w, (lead + 1,)) if mode == "int8" else quantize_int4(w, lead + 1)
        return {"qembedding": q, "qscale": scale}
    n_in = _input_dims(path)
    inputs = tuple(range(lead, lead + n_in))
    q, scale = quantize_int8(w, inputs) if mode == "int8" else quantize_int4(w, inputs[-1])
    return {"qkernel": q, "qscale": scale}


def quantized_axes(path: tuple[str, ...], axes: tuple, lead: int, mode: str) -> dict:
    """The logical axes of `quantize_param`'s arrays, from the float parameter's `axes`."""
    if _is_table(path):
        return {"qembedding": axes, "qscale": axes if mode == "int4" else axes[:lead + 1]}
    n_in = _input_dims(path)
    if mode == "int8":
        return {"qkernel": axes, "qscale": axes[:lead] + axes[lead + n_in:]}
    return {"qkernel": axes, "qscale": axes}


def stacked_dims(axes: tuple) -> int:
    """How many leading dims of a parameter are stacked layers (1 when scanned, else 0)."""
    return int(bool(axes) and axes[0] == "layers")


def is_float_param(path: tuple[str, ...]) -> bool:
    """Whether the parameter at `path` takes the model's float dtype (quantized values keep
    their int dtype, and their scales float32)."""
    return path[-1] not in ("qkernel", "qembedding", "qscale")


def map_params(tree: dict, fn) -> dict:
    """A new tree with each leaf replaced by the entries of `fn(path, leaf)` (a dict), so a
    leaf can become several (`kernel` -> `qkernel`, `qscale`). Leaves are visited in order."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = map_params(value, lambda path, x, key=key: fn((key, *path), x))
        else:
            out |= fn((key,), value)
    return out


def quantize_abstract(boxed: dict, mode: str, embeddings: bool) -> dict:
    """The boxed abstract params (nn.Partitioned of ShapeDtypeStruct, as Flax's init gives
    them) of the model quantized by `mode`: the tree `load(quantize=mode)` returns."""

    def one(path, box):
        if not quantizes(path, embeddings):
            return {path[-1]: box}
        lead = stacked_dims(box.names)
        shapes = jax.eval_shape(lambda w: quantize_param(path, w, lead, mode), box.value)
        axes = quantized_axes(path, tuple(box.names), lead, mode)
        return {name: nn.Partitioned(shapes[name], axes[name]) for name in shapes}

    return map_params(boxed, one)


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
    """The float params a quantized tree stands for (`kernel` and `embedding` again): what its
    matmuls compute with, for checks and for exporting."""

    def one(path, x):
        name = path[-1]
        if name == "qscale":
            return {}
        if name not in ("qkernel", "qembedding"):
            return {name: x}
        node = params
        for key in path[:-1]:
            node = node[key]
        if name == "qembedding":
            return {"embedding": dequantize(x, node["qscale"], 1, dtype)}
        lead = int(path[0] == "layers")  # scanned layers are stacked on a leading L
        return {"kernel": dequantize(x, node["qscale"], lead + _input_dims(path) - 1, dtype)}

    return map_params(params, one)


def quantization_of(params: dict) -> dict | None:
    """{"weights": "int8" | "int4", "embeddings": bool} of a params tree, or None if float."""
    kinds = set()
    embeddings = False

    def one(path, x):
        nonlocal embeddings
        if path[-1] in ("qkernel", "qembedding"):
            kinds.add("int8" if x.dtype == jnp.int8 else "int4")
            embeddings |= path[-1] == "qembedding"
        return {}

    map_params(params, one)
    if not kinds:
        return None
    (mode,) = kinds
    return {"weights": mode, "embeddings": embeddings}


# -- the KV cache -----------------------------------------------------------------------------


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Keys or values [..., H] -> (int8 [..., H], float32 scale [...]): per token, per head."""
    return quantize_int8(x, (x.ndim - 1,))


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    return q.astype(dtype) * scale[..., None].astype(dtype)


def weight_bytes(params) -> int:
    """Bytes the params hold (what decoding reads per token, embeddings aside)."""
    return sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize
               for x in jax.tree.leaves(params))
