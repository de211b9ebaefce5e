"""The dense attention the model used before its blockwise kernel: a [B, T, S] mask and an
einsum softmax. The reference that `qwen2_jax.attention.attend` must equal on every mask case.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from qwen2_jax.layers import precision

# Finite, so a query with no visible key (a padding row) gets uniform weights, never NaN.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def causal_mask(token_mask: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Bool [B, T, S] (S == T): query t may see key s iff s <= t, s is real, same segment."""
    length = token_mask.shape[1]
    index = jnp.arange(length)
    causal = index[None, :, None] >= index[None, None, :]  # [1, T, S]
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]  # [B, T, S]
    return causal & same_segment & (token_mask[:, None, :] != 0)


def sliding_window_mask(mask: jnp.ndarray, window: int) -> jnp.ndarray:
    """Restricts mask [B, T, S] to the `window` most recent keys, the query included.

    As transformers: `q - window < kv <= q` in token index space, which equals position space
    for every real token because padding and other segments are masked anyway.
    """
    length = mask.shape[1]
    index = jnp.arange(length)
    recent = index[:, None] - index[None, :] < window  # [T, S]
    return mask & recent[None]


def cache_masks(positions: jnp.ndarray, slots: int, window: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(full, sliding-window) bool masks [B, T, S] for queries at `positions` [B, T] over a
    KV cache of `slots` slots holding each row's tokens at the slot of their position.

    A query sees every slot up to its own position (slots past a row's length hold stale
    values, never visible); the window keeps `position - window < slot`, as transformers.
    """
    slot = jnp.arange(slots)
    full = slot[None, None, :] <= positions[:, :, None]  # [B, T, S]
    if not window:
        return full, full
    return full, full & (positions[:, :, None] - slot[None, None, :] < window)


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                          mask: jnp.ndarray) -> jnp.ndarray:
    """The dense reference: softmax attention through a [T, S] mask; softmax in float32.

    q: [B, T, N, H]; k, v: [B, S, K, H]; mask: bool [B, T, S]. Query head n uses kv head
    n // (N / K), as transformers' `repeat_kv`. Returns [B, T, N, H] in v's dtype. Its
    memory grows with T * S.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, preferred_element_type=jnp.float32,
                        precision=precision(q.dtype)) * h**-0.5  # [B, K, G, T, S]
    logits = jnp.where(mask[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, precision=precision(v.dtype))  # [B, T, K, G, H]
    return out.reshape(b, t, n, h)
