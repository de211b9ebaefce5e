"""Fused attention kernels for long inputs: splash (TPU, Pallas) and cuDNN flash (GPU).

`attention.attend` uses them on accelerators for whole sequences, and the portable blockwise
kernel (`blockwise.py`) everywhere else. Like it, they never build the [T, S] scores, and
neither takes a dense mask: splash gets the static part
(causal, window) as a block-sparse pattern plus per-token segment ids; cuDNN gets `is_causal`,
a window and per-row lengths, because a dense mask there is turned into a dense bias
(REFERENCE_SERVING.md, "Long context"). Both serve self-attention over the same T tokens
(training, a plain forward): query i sees key j iff j <= i, and with a window, i - window < j.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

# Splash's kv blocks are a whole number of TPU lanes.
LANES = 128


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                     segment_ids: jnp.ndarray | None, window: int = 0, *,
                     interpret: bool = False, block: int = 512) -> jnp.ndarray:
    """Causal self-attention with splash attention, grouped-query, softmax in float32.

    q: [B, T, N, H]; k, v: [B, T, K, H], query head n on kv head n // (N / K) as transformers'
    `repeat_kv`; segment_ids: int [B, T] or None, a query sees only keys of its own segment
    (give padding an id of its own, e.g. -1, so that no row is left with nothing to see);
    window: 0, or each query sees its `window` most recent keys, itself included.
    Returns [B, T, N, H] in v's dtype. Differentiable (splash's own backward kernels).

    T is padded up to a multiple of the block, itself lowered to T rounded up to 128 when T is
    shorter; block must be a multiple of 128. interpret: run the Pallas kernels on CPU.
    """
    if block % LANES:
        raise ValueError(f"splash block {block} must be a multiple of {LANES}")
    _, t, n, h = q.shape
    if k.shape[1] != t:
        raise ValueError(f"splash_attention is self-attention over T={t} tokens; "
                         f"k has {k.shape[1]}")
    block = min(block, _round_up(t, LANES))
    length = _round_up(t, block)
    pad = length - t
    if segment_ids is not None:
        # Padding comes after every real token, so causality alone hides it from real queries;
        # an id of its own just keeps it out of the last example. Each padded query sees
        # itself: splash forbids rows with no visible key (0/0 in its softmax).
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)),
                              constant_values=jnp.iinfo(jnp.int32).min)  # [B, T']

    def heads_first(x):  # [B, T, N, H] -> [B, N, T', H]
        return jnp.pad(jnp.swapaxes(x, 1, 2), ((0, 0), (0, 0), (0, pad), (0, 0)))

    # The kernel does not scale the logits.
    q, k, v = heads_first(q * h**-0.5), heads_first(k), heads_first(v)

    shape = (length, length)
    mask = (masks.LocalMask(shape, (window - 1, 0), offset=0) if window
            else masks.CausalMask(shape))
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                              block_q_dkv=block, block_kv_dkv=block,
                              block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # The mha kernel takes K < N kv heads itself (its index maps read kv head n // G).
    kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * n), block_sizes=sizes,
                                    head_shards=1, q_seq_shards=1, interpret=interpret)

    def one_row(q, k, v, segments):  # [N, T', H], [K, T', H] x2, [T'] or None
        ids = None if segments is None else splash.SegmentIds(segments, segments)
        return kernel(q, k, v, segment_ids=ids)

    out = jax.vmap(one_row)(q, k, v, segment_ids)  # [B, N, T', H]
    return jnp.swapaxes(out[:, :, :t], 1, 2).astype(v.dtype)  # [B, T, N, H]


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, window: int = 0,
                    q_lengths: jnp.ndarray | None = None,
                    kv_lengths: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causal self-attention with cuDNN's fused flash kernel (GPU only), grouped-query.

    q: [B, T, N, H]; k, v: [B, T, K, H], all bfloat16 or float16 (cuDNN has no float32), H a
    multiple of 8 and at most 128 (256 on Hopper); window as in `splash_attention`;
    q_lengths, kv_lengths: int [B] or None, the first L tokens of a row are real (right
    padding only: cuDNN has no segments here). Returns [B, T, N, H] in q's dtype.

    jax turns (left, right) = (window - 1, 0) into cuDNN's sliding_window_length = window,
    which keeps the keys (i - window, i]: the window counts the query itself.
    """
    return jax.nn.dot_product_attention(
        q, k, v, is_causal=True,
        local_window_size=(window - 1, 0) if window else None,
        query_seq_lengths=None if q_lengths is None else q_lengths.astype(jnp.int32),
        key_value_seq_lengths=None if kv_lengths is None else kv_lengths.astype(jnp.int32),
        implementation="cudnn")
