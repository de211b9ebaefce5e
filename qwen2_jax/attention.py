"""Grouped-query self-attention with q/k/v bias (no o_proj bias) and rotary embeddings."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import Dtype, Linear, precision
from qwen2_jax.rope import apply_rope
from qwen2_jax.sharding import constrain

# Finite, so a query with no visible key (a padding row) gets uniform weights, never NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


# cuDNN's fused (flash) attention for bfloat16/float16 on GPU; False forces the einsum path.
FUSED_ON_GPU = True


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          mask: jnp.ndarray, fused: bool = False) -> jnp.ndarray:
    """Softmax attention with query heads grouped onto their kv head; softmax in float32.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool [B, T, S]. Query head n uses kv head
    n // (N / K), as transformers' `repeat_kv`. Returns [B, T, N, H] in v's dtype.
    fused: use cuDNN's fused kernel when on GPU in 16 bits (it never builds the [T, S]
    scores in memory: 4.6x faster forward + backward on an H100 at T = 1024).
    """
    if (fused and FUSED_ON_GPU and jax.default_backend() == "gpu"
            and q.dtype == k.dtype == v.dtype and v.dtype in (jnp.bfloat16, jnp.float16)):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None],
                                            implementation="cudnn")
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                        precision=precision(q.dtype)) * h**-0.5  # [B, K, G, T, S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=precision(v.dtype))  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)


class Attention(nn.Module):
    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray, mask: jnp.ndarray,
                 cache: tuple[jnp.ndarray, jnp.ndarray] | None = None,
                 cache_index: jnp.ndarray | None = None):
        """x: [B, T, D]; cos, sin: [B, T, H]; mask: bool [B, T, S]. Returns [B, T, D].

        With a cache (keys, values [B, S, K, H]): the new keys and values go into slots
        cache_index[b] .. cache_index[b] + T - 1 of row b, the queries attend over all S
        slots (mask says which), and the result is ([B, T, D], the updated cache).
        """
        c = self.config
        n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_size

        def linear(features, axes, name, use_bias=True):
            return Linear(features, axes, c.initializer_range, use_bias=use_bias,
                          dtype=self.dtype, param_dtype=self.param_dtype, name=name)

        q = linear((n, h), ("embed", "heads", "head_dim"), "q_proj")(x)  # [B, T, N, H]
        key = linear((k, h), ("embed", "kv_heads", "head_dim"), "k_proj")(x)  # [B, T, K, H]
        value = linear((k, h), ("embed", "kv_heads", "head_dim"), "v_proj")(x)  # [B, T, K, H]
        q, key = apply_rope(q, cos, sin), apply_rope(key, cos, sin)
        q = constrain(q, ("batch", "length", "heads", "head_dim"))
        key = constrain(key, ("batch", "length", "kv_heads", "head_dim"))
        value = constrain(value, ("batch", "length", "kv_heads", "head_dim"))
        if cache is not None:
            cache = tuple(constrain(write_slots(c_, new.astype(c_.dtype), cache_index),
                                    ("batch", "length", "kv_heads", "head_dim"))
                          for c_, new in zip(cache, (key, value), strict=True))
            key, value = cache[0].astype(self.dtype), cache[1].astype(self.dtype)  # [B, S, K, H]
        # the fused kernel for whole sequences (training, forward); decoding keeps the einsum
        out = dot_product_attention(q, key, value, mask, fused=cache is None)  # [B, T, N, H]
        out = linear((c.hidden_size,), ("heads", "head_dim", "embed"), "o_proj",
                     use_bias=False)(out)  # [B, T, D]
        return out if cache is None else (out, cache)


def write_slots(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray) -> jnp.ndarray:
    """cache [B, S, ...] with new [B, T, ...] written at slots start[b] .. start[b] + T - 1."""
    def row(c, n, i):
        return jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0)

    return jax.vmap(row)(cache, new, start)
