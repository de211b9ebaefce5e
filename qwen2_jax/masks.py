"""Positions and attention masks from the batch layout: padding, packed segments, windows.

Padding is `token_mask == 0` (left or right); packed examples carry distinct `segment_ids` in
one row. Positions count real tokens only and restart at every segment, so a left-padded row,
or an example packed after others, sees exactly the positions it would see alone.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def positions_from_mask(token_mask: jnp.ndarray, segment_ids: jnp.ndarray) -> jnp.ndarray:
    """Position ids [B, T] int32: 0, 1, ... over the real tokens of each segment.

    token_mask, segment_ids: int [B, T]. Padding tokens get the position of the previous real
    token (0 before any), which is harmless because no real token attends to them.
    """
    token_mask = token_mask.astype(jnp.int32)
    count = jnp.cumsum(token_mask, axis=1)  # real tokens so far, inclusive  [B, T]
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    # Real tokens before the current segment: `count - mask` at its first token, carried forward.
    offset = lax.cummax(jnp.where(starts, count - token_mask, 0), axis=1)
    return jnp.maximum(count - offset - 1, 0)


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
