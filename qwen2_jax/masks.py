"""Positions from the batch layout: padding and packed segments.

Padding is `token_mask == 0` (left or right); packed examples carry distinct `segment_ids` in
one row. Positions count real tokens only and restart at every segment, so a left-padded row,
or an example packed after others, sees exactly the positions it would see alone. (Which keys
a query sees is decided block by block inside the attention: `blockwise.py`.)
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
