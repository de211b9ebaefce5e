"""Blockwise attention in plain JAX: memory linear in length, exact, with its own backward pass.

The FlashAttention recurrence (Rabe & Staats 2021; Dao et al. 2022): queries go in blocks of
`block_q`, and each block walks the key blocks it can see, keeping a running max, a running
softmax denominator and an unnormalized output. No [T, S] array ever exists: each block's
mask is built from indices and segment ids as it is needed.

Which keys a query sees, for query i of row b (global index `q_offset[b] + i`) and key j:

    j <= q_offset[b] + i                    causal, bottom-right aligned to the cache
    q_offset[b] + i - j < window            only when window > 0 (transformers' sliding window)
    q_segment[b, i] == kv_segment[b, j]     only when segments are given (packing, padding)

Key blocks outside a query block's causal and window range are never read: the walk is a
`while_loop` over exactly that range, so a causal prefill does about half the work of a dense
one, and decoding reads only the cache blocks up to each row's length. Rows of a batch walk
their own ranges in step (a vmapped loop): a row whose range ends before the others' computes
on the one block after it and discards the result, so no row reads more than one block past
its own length.

The backward pass recomputes each block's probabilities from the saved log-sum-exp
(FlashAttention-2), so training memory is linear in length too.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from qwen2_jax.layers import precision

# A query with no visible key (a padding row) gets zero output and zero gradients, never NaN.
_NO_KEY = float(jnp.finfo(jnp.float32).min)


def block_sizes(t: int, s: int) -> tuple[int, int]:
    """(block_q, block_kv) for T queries over S keys.

    Decode-like calls (few queries) read the cache in blocks of up to 4096 keys: the work per
    key is tiny, so the loop's per-iteration cost would dominate small ones. Prefill and
    training use tiles of up to 512 x 512, whose float32 scores ([N, 512, 512]) stay small
    beside the weights. A length that is not a whole number of blocks is split evenly (600:
    2 x 304, not 2 x 512), so padding wastes little.
    """
    if t <= 64:
        return t, _even_blocks(s, 4096)
    return _even_blocks(t, 512), _even_blocks(s, 512)


def _even_blocks(n: int, most: int) -> int:
    """The block size, a multiple of 8 and at most `most` (or n itself when smaller), that
    splits n into as few blocks as `most` allows, as evenly as possible."""
    if n <= most:
        return n
    blocks = -(-n // most)
    return min(most, (-(-n // blocks) + 7) // 8 * 8)


def attention(q, k, v, q_offset, q_segment=None, kv_segment=None, window=0,
              block_q: int | None = None, block_kv: int | None = None):
    """Exact softmax attention (float32 softmax) of q [B, T, N, H] over k, v [B, K, S, H].

    Keys and values are kv-head major, the KV cache's layout: each head's block is then one
    contiguous [bk, H] matrix, and neither prefill nor decoding ever transposes the cache.

    q_offset: int [B], the global index of each row's first query (0 for a whole sequence; the
    cache length before this chunk when decoding). q_segment [B, T], kv_segment [B, S]: int
    segment ids or both None. window: int, static or traced (0: no window). Returns
    [B, T, N, H] in v's dtype. Differentiable in q, k and v.
    """
    t, s = q.shape[1], k.shape[2]
    default_q, default_kv = block_sizes(t, s)
    block_q, block_kv = block_q or default_q, block_kv or default_kv
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (q.shape[0],))
    window = jnp.asarray(window, jnp.int32)
    if q_segment is None:  # one segment: every key is a candidate
        q_segment = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment = jnp.zeros((k.shape[0], s), jnp.int32)
    # Padding to whole blocks: padded keys are past every query (causal hides them); padded
    # queries see at most what the last real one sees, and are cut off below.
    q, q_segment = _pad_to(q, block_q), _pad_to(q_segment, block_q)
    k, v = _pad_to(k, block_kv, axis=2), _pad_to(v, block_kv, axis=2)
    kv_segment = _pad_to(kv_segment, block_kv)
    out = _flash(block_q, block_kv, q, k, v, q_offset, q_segment.astype(jnp.int32),
                 kv_segment.astype(jnp.int32), window)
    return out[:, :t]


def _pad_to(x, block: int, axis: int = 1):
    """x with zeros appended along `axis` to a multiple of `block`."""
    pad = -x.shape[axis] % block
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths)


def _kv_block_range(first_query, last_query, window, block_kv: int, kv_blocks: int):
    """[lo, hi): the key blocks that queries first_query..last_query (global indices) see."""
    hi = jnp.minimum(last_query // block_kv + 1, kv_blocks)
    lo = jnp.where(window > 0, jnp.maximum(first_query - window + 1, 0) // block_kv, 0)
    return jnp.minimum(lo, hi - 1), hi


def _visible(q_index, kv_index, q_seg, kv_seg, window):
    """Bool [bq, 1, bk]: which keys each query of the block sees (see the module docstring);
    the 1 broadcasts over the query heads of a kv head."""
    diff = q_index[:, None] - kv_index[None, :]  # [bq, bk]
    seen = (diff >= 0) & (q_seg[:, None] == kv_seg[None, :])
    return (seen & ((window <= 0) | (diff < window)))[:, None, :]


def _query_block(q, i, block_q):
    """Block i of a row's queries [K, Tp, G, H], as [K, bq * G, H]."""
    qb = jax.lax.dynamic_slice_in_dim(q, i * block_q, block_q, 1)
    return qb.reshape(qb.shape[0], -1, qb.shape[-1])


def _kv_block(x, j, block_kv: int):
    """Key or value block j [K, bk, H] of a row's [K, Sp, H]."""
    return jax.lax.dynamic_slice_in_dim(x, j * block_kv, block_kv, 1)


def _scores(qb, kb, scale):
    """Float32 [K, Q, bk] of queries qb [K, Q, H] (Q = bq * G) against a key block [K, bk, H]:
    one plain matmul per kv head."""
    return jnp.einsum("KQH,KSH->KQS", qb, kb, preferred_element_type=jnp.float32,
                      precision=precision(qb.dtype)) * scale


def _row_forward(block_q, block_kv, q, k, v, offset, q_seg, kv_seg, window):
    """One batch row. q [K, Tp, G, H]; k, v [K, Sp, H]. Returns (out [K, Tp, G, H] in v's
    dtype, log-sum-exp [K, Tp, G] float32)."""
    kv_blocks = k.shape[1] // block_kv
    heads, _, group, h = q.shape
    scale = h ** -0.5

    def query_block(i):
        qb = _query_block(q, i, block_q)  # [K, bq * G, H]
        q_seg_b = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q)  # [bq]
        q_index = offset + i * block_q + jnp.arange(block_q)  # [bq]
        lo, hi = _kv_block_range(q_index[0], q_index[-1], window, block_kv, kv_blocks)

        def step(carry):
            j, m, denom, acc = carry  # m, denom [K, bq, G]; acc [K, bq, G, H]
            kv_seg_b = jax.lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv)  # [bk]
            seen = _visible(q_index, j * block_kv + jnp.arange(block_kv), q_seg_b, kv_seg_b,
                            window)  # [bq, 1, bk]
            scores = _scores(qb, _kv_block(k, j, block_kv), scale)
            scores = jnp.where(seen, scores.reshape(heads, block_q, group, -1), _NO_KEY)
            m_new = jnp.maximum(m, scores.max(-1))  # [K, bq, G]
            # A row with nothing visible yet keeps m = _NO_KEY; subtracting 0 instead makes
            # its masked scores' exp 0 rather than 1.
            probs = jnp.exp(scores - jnp.where(m_new == _NO_KEY, 0.0, m_new)[..., None])
            correction = jnp.exp(m - m_new)
            denom = denom * correction + probs.sum(-1)
            vb = _kv_block(v, j, block_kv)  # [K, bk, H]
            values = jnp.einsum("KQS,KSH->KQH", probs.reshape(heads, -1, block_kv).astype(
                vb.dtype), vb, preferred_element_type=jnp.float32,
                precision=precision(vb.dtype))  # [K, bq * G, H]
            acc = acc * correction[..., None] + values.reshape(acc.shape)
            return j + 1, m_new, denom, acc

        m0 = jnp.full((heads, block_q, group), _NO_KEY, jnp.float32)
        acc0 = jnp.zeros((heads, block_q, group, h), jnp.float32)
        _, m, denom, acc = jax.lax.while_loop(lambda c: c[0] < hi, step,
                                              (lo, m0, jnp.zeros_like(m0), acc0))
        seen_any = denom > 0
        out = acc / jnp.where(seen_any, denom, 1.0)[..., None]
        lse = jnp.where(seen_any, m + jnp.log(jnp.where(seen_any, denom, 1.0)), jnp.inf)
        return out.astype(v.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(q.shape[1] // block_q))
    # out [nq, K, bq, G, H]; lse [nq, K, bq, G]
    out = jnp.moveaxis(out, 0, 1).reshape(q.shape)
    lse = jnp.moveaxis(lse, 0, 1).reshape(q.shape[:3])
    return out, lse


def _row_backward(block_q, block_kv, q, k, v, offset, q_seg, kv_seg, window, out, lse,
                  d_out):
    """One batch row's (dq, dk, dv): each query block walks its key blocks again, with the
    probabilities recomputed from the log-sum-exp; dk and dv accumulate in place."""
    kv_blocks = k.shape[1] // block_kv
    heads, _, group, h = q.shape
    scale = h ** -0.5
    # D = rowsum(dO * O): the softmax backward's per-query term.  [K, Tp, G]
    delta = jnp.einsum("KTGH,KTGH->KTG", d_out.astype(jnp.float32), out.astype(jnp.float32))

    def query_block(carry, i):
        dk, dv = carry  # float32, as k and v
        qb = _query_block(q, i, block_q)  # [K, bq * G, H]
        dob = _query_block(d_out, i, block_q)  # [K, bq * G, H]
        q_seg_b = jax.lax.dynamic_slice_in_dim(q_seg, i * block_q, block_q)
        lse_b = jax.lax.dynamic_slice_in_dim(lse, i * block_q, block_q, 1)  # [K, bq, G]
        delta_b = jax.lax.dynamic_slice_in_dim(delta, i * block_q, block_q, 1)  # [K, bq, G]
        q_index = offset + i * block_q + jnp.arange(block_q)
        lo, hi = _kv_block_range(q_index[0], q_index[-1], window, block_kv, kv_blocks)
        f32 = precision(jnp.float32)

        def step(state):
            j, dq, dk, dv = state
            kb, vb = _kv_block(k, j, block_kv), _kv_block(v, j, block_kv)
            kv_seg_b = jax.lax.dynamic_slice_in_dim(kv_seg, j * block_kv, block_kv)
            seen = _visible(q_index, j * block_kv + jnp.arange(block_kv), q_seg_b, kv_seg_b,
                            window)  # [bq, 1, bk]
            scores = _scores(qb, kb, scale).reshape(heads, block_q, group, -1)
            probs = jnp.where(seen, jnp.exp(scores - lse_b[..., None]), 0.0)  # [K, bq, G, bk]
            d_probs = _scores(dob, vb, 1.0).reshape(probs.shape)
            d_scores = (probs * (d_probs - delta_b[..., None]) * scale).reshape(heads, -1,
                                                                                 block_kv)
            probs = probs.reshape(d_scores.shape)  # [K, bq * G, bk]
            dq = dq + jnp.einsum("KQS,KSH->KQH", d_scores, kb.astype(jnp.float32),
                                 precision=f32)
            dk_j = jnp.einsum("KQS,KQH->KSH", d_scores, qb.astype(jnp.float32), precision=f32)
            dv_j = jnp.einsum("KQS,KQH->KSH", probs, dob.astype(jnp.float32), precision=f32)
            dk = _add_kv_block(dk, j, block_kv, dk_j)
            dv = _add_kv_block(dv, j, block_kv, dv_j)
            return j + 1, dq, dk, dv

        dq0 = jnp.zeros(qb.shape, jnp.float32)
        _, dq, dk, dv = jax.lax.while_loop(lambda c: c[0] < hi, step, (lo, dq0, dk, dv))
        return (dk, dv), dq.reshape(heads, block_q, group, h)

    zeros = jnp.zeros(k.shape, jnp.float32)
    (dk, dv), dq = jax.lax.scan(query_block, (zeros, zeros), jnp.arange(q.shape[1] // block_q))
    return jnp.moveaxis(dq, 0, 1).reshape(q.shape), dk, dv


def _add_kv_block(x, j, block_kv: int, delta):
    start = j * block_kv
    block = jax.lax.dynamic_slice_in_dim(x, start, block_kv, 1)
    return jax.lax.dynamic_update_slice_in_dim(x, block + delta, start, 1)


def _grouped(q, kv_heads: int):
    """q [B, T, N, H] -> [B, K, T, G, H] (query head n on kv head n // G)."""
    b, t, n, h = q.shape
    return jnp.transpose(q.reshape(b, t, kv_heads, n // kv_heads, h), (0, 2, 1, 3, 4))


def _ungrouped(x):
    """[B, K, T, G, H] -> [B, T, N, H]."""
    b, kv_heads, t, group, h = x.shape
    return jnp.transpose(x, (0, 2, 1, 3, 4)).reshape(b, t, kv_heads * group, h)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _flash(block_q, block_kv, q, k, v, q_offset, q_segment, kv_segment, window):
    return _flash_forward(block_q, block_kv, q, k, v, q_offset, q_segment, kv_segment,
                          window)[0]


def _flash_forward(block_q, block_kv, q, k, v, q_offset, q_segment, kv_segment, window):
    row = functools.partial(_row_forward, block_q, block_kv)
    out, lse = jax.vmap(row, in_axes=(0, 0, 0, 0, 0, 0, None))(
        _grouped(q, k.shape[1]), k, v, q_offset, q_segment, kv_segment, window)
    out = _ungrouped(out)  # [B, Tp, N, H]
    return out, (q, k, v, q_offset, q_segment, kv_segment, window, out, lse)


def _flash_backward(block_q, block_kv, residuals, d_out):
    q, k, v, q_offset, q_segment, kv_segment, window, out, lse = residuals
    kv_heads = k.shape[1]
    row = functools.partial(_row_backward, block_q, block_kv)
    dq, dk, dv = jax.vmap(row, in_axes=(0, 0, 0, 0, 0, 0, None, 0, 0, 0))(
        _grouped(q, kv_heads), k, v, q_offset, q_segment, kv_segment, window,
        _grouped(out, kv_heads), lse, _grouped(d_out, kv_heads))
    return (_ungrouped(dq).astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype),
            None, None, None, None)


_flash.defvjp(_flash_forward, _flash_backward)
