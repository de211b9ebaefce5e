"""Grouped-query self-attention with q/k/v bias (no o_proj bias) and rotary embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen2_jax import blockwise, quantize
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import Dtype, Linear
from qwen2_jax.rope import apply_rope
from qwen2_jax.sharding import constrain, current_mesh, sequence_axes

# Accelerator kernels for whole sequences; False forces the blockwise path everywhere.
KERNELS = True


KV_AXES = ("batch", "kv_heads", "length", "head_dim")
CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")  # one layer's KV cache


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, q_offset, segments, window,
           whole_sequence: bool) -> jnp.ndarray:
    """Causal attention of q [B, T, N, H] over k, v [B, K, S, H]; memory linear in length.

    q_offset [B]: each row's first query's key index (0 for a whole sequence, the cache
    length for a chunk or a decode step). segments: int [B, T] segment ids of a whole
    sequence (padding given a segment of its own) or None. window: keys within `window` of
    the query only (0: all); a Python int, or traced when layers differ. whole_sequence: T ==
    S and offset 0 (training, forward), where the accelerator kernels apply: Pallas splash
    attention on TPU, cuDNN's fused attention on GPU (16-bit, no segments). Elsewhere, and
    for chunks and decoding, the blockwise kernel (`blockwise.attention`). With the queries'
    length split over a `sequence` mesh axis, see `_sequence_parallel`.
    """
    split = sequence_axes(q.shape[1]) if q.shape[1] > 1 else ()
    if split:
        return _sequence_parallel(q, k, v, q_offset, segments, window, split)
    backend = jax.default_backend()
    static_window = isinstance(window, int)
    if KERNELS and whole_sequence and static_window and backend == "tpu":
        from qwen2_jax import kernels  # Pallas's TPU modules: imported only where they run

        return kernels.splash_attention(q, *_token_major(k, v), segments, window)
    if (KERNELS and whole_sequence and static_window and backend == "gpu" and segments is None
            and q.dtype == k.dtype == v.dtype and v.dtype in (jnp.bfloat16, jnp.float16)):
        from qwen2_jax import kernels

        return kernels.cudnn_attention(q, *_token_major(k, v), window)
    return blockwise.attention(q, k, v, q_offset, segments, segments, window)


def _token_major(k, v):
    """[B, K, S, H] -> [B, S, K, H], the kernels' layout (for the model's fresh keys and
    values XLA cancels this against the transpose that made them kv-major)."""
    return jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)


def _sequence_parallel(q, k, v, q_offset, segments, window, axes: tuple[str, ...]):
    """`attend` with the queries split over the mesh axes `axes` along T, each device
    attending its own slice to all keys and values (gathered over `axes`).

    Why gather rather than pass K/V around a ring: with grouped-query attention the keys and
    values are N / K times smaller than the queries (7x for Qwen2-0.5B, 8x for 72B), so one
    all-gather per layer costs little and keeps each device's work a plain blockwise call.
    The blockwise kernel then skips the blocks each slice cannot see, so the causal work is
    uneven across the slices (the last does the most), a ring's main advantage we forgo.
    """
    mesh = current_mesh()
    seq = P(None, axes)

    def local(q, k, v, q_offset, q_segments, kv_segments):
        index = jax.lax.axis_index(axes)
        offset = q_offset + index * q.shape[1]  # this slice's first query, as a key index
        return blockwise.attention(q, k, v, offset, q_segments, kv_segments, window)

    has_segments = segments is not None
    zeros = jnp.zeros(q.shape[:2], jnp.int32)
    q_segments = segments if has_segments else zeros
    kv_segments = segments if has_segments else jnp.zeros((k.shape[0], k.shape[2]), jnp.int32)
    return jax.shard_map(local, mesh=mesh, in_specs=(seq, P(), P(), P(), seq, P()),
                         out_specs=seq, axis_names=set(axes), check_vma=False)(
        q, k, v, q_offset, q_segments, kv_segments)


class Attention(nn.Module):
    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, segments, window,
                 cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
                 cache_index: jnp.ndarray | None = None, layer: jnp.ndarray | None = None,
                 slot_rope: tuple[jnp.ndarray, jnp.ndarray] | None = None):
        """x: [B, T, D]; cos, sin: [B, T, H]; segments, window: as `attend`. Returns [B, T, D].

        With a cache (keys, values [B, K, S, H], or [L, B, K, S, H] with this layer at index
        `layer`): the new keys and values go into slots cache_index[b] .. cache_index[b] +
        T - 1 of row b, in place, the queries attend over the slots up to their own, and the
        result is ([B, T, D], the updated cache). An int8 cache is (keys, values, their scales
        [B, K, S] or [L, B, K, S]): one scale per token and head (`quantize.quantize_kv`).

        An int8 cache holds keys without their rotated k_proj bias, added back exactly when
        read (slot_rope: cos, sin [B, S, H] of every slot's position). Qwen2's biases reach
        ~200 in a few channels against a median of ~0.5: quantized with them, one scale per
        token and head leaves the other channels a step or two (+1.3% perplexity on
        Qwen2.5-Coder-0.5B, against -0.01% without).
        """
        c = self.config
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_size

        def linear(features, axes, name, use_bias=True):
            return Linear(features, axes, c.initializer_range, use_bias=use_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q = linear((n, h), ("embed", "heads", "head_dim"), "q_proj")(x)  # [B, T, N, H]
        k_proj = linear((k, h), ("embed", "kv_heads", "head_dim"), "k_proj")
        key = k_proj(x)  # [B, T, K, H]
        value = linear((k, h), ("embed", "kv_heads", "head_dim"), "v_proj")(x)  # [B, T, K, H]
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        # kv-head major, the cache's layout (see `blockwise.attention`)
        key = constrain(jnp.swapaxes(key, 1, 2), KV_AXES)  # [B, K, T, H]
        value = constrain(jnp.swapaxes(value, 1, 2), KV_AXES)  # [B, K, T, H]
        if cache is not None:
            if len(cache) == 4:  # int8, with scales; keys without their rotated bias
                bias = k_proj.variables["params"]["bias"].astype(self.dtype)  # [K, H]

                def rotated_bias(cos, sin):  # [B, T or S, H] -> [B, K, T or S, H]
                    shape = (*cos.shape[:2], k, h)
                    return jnp.swapaxes(apply_rope(jnp.broadcast_to(bias, shape), cos, sin), 1, 2)

                (key_q, key_s), (value_q, value_s) = map(
                    quantize.quantize_kv, (key - rotated_bias(cos, sin), value))
                new = (key_q, value_q, key_s, value_s)
            else:
                new = (key, value)
            cache = tuple(write_slots(c_, n.astype(c_.dtype), cache_index, layer)
                          for c_, n in zip(cache, new, strict=True))
            key, value = (this_layer(c_, layer) for c_ in cache[:2])  # [B, K, S, H]
            if len(cache) == 4:
                key, value = (quantize.dequantize_kv(c_, this_layer(s_, layer), self.dtype)
                              for c_, s_ in zip((key, value), cache[2:], strict=True))
                key = key + rotated_bias(*slot_rope)
            key, value = key.astype(self.dtype), value.astype(self.dtype)
        q_offset = jnp.zeros(x.shape[0], jnp.int32) if cache is None else cache_index
        out = attend(q, key, value, q_offset, segments, window,
                     whole_sequence=cache is None)  # [B, T, N, H]
        out = linear((c.hidden_size,), ("heads", "head_dim", "embed"), "o_proj",
                     use_bias=False)(out)  # [B, T, D]
        return out if cache is None else (out, cache)


def write_slots(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray,
                layer: jnp.ndarray | None = None) -> jnp.ndarray:
    """cache [B, K, S, H] (or [L, B, K, S, H], written at `layer`) with new [B, K, T, H] at
    slots start[b] .. start[b] + T - 1 of each row; or an int8 cache's scales, without H."""
    axes = CACHE_AXES[:new.ndim]
    if layer is None:
        def row(c, n, i):
            return jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=1)

        return constrain(jax.vmap(row)(cache, new, start), axes)

    # Row by row: a vmap over B, the second axis, would make XLA transpose the whole cache.
    def row(b, c):
        at = (layer, b, 0, start[b]) + (0,) * (new.ndim - 3)
        return jax.lax.dynamic_update_slice(c, new[b][None, None], at)

    return constrain(jax.lax.fori_loop(0, new.shape[0], row, cache), ("layers", *axes))


def this_layer(cache: jnp.ndarray, layer: jnp.ndarray | None) -> jnp.ndarray:
    """The [B, K, S, H] cache (or [B, K, S] scales) of `layer` (the cache itself when it is
    one layer's)."""
    if layer is None:
        return cache
    return constrain(jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False),
                     CACHE_AXES[:cache.ndim - 1])
