"""Splash attention (Pallas interpret mode, on CPU) and cuDNN attention (GPU only) against a
plain einsum softmax with an explicit [T, S] mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwen2_jax.kernels import cudnn_attention, splash_attention

HIGHEST = jax.lax.Precision.HIGHEST


def reference(q, k, v, segment_ids, window=0):
    """softmax(q·k / sqrt(H)) v over keys that are causal, in the query's segment and window."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    index = jnp.arange(t)
    mask = index[:, None] >= index[None, :]  # [T, S]
    if window:
        mask &= index[:, None] - index[None, :] < window
    if segment_ids is None:
        segment_ids = jnp.zeros((b, t), jnp.int32)
    mask = mask[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])  # [B, T, S]
    q = q.reshape(b, t, kv_heads, n // kv_heads, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q, k, precision=HIGHEST,
                        preferred_element_type=jnp.float32) * h**-0.5
    logits = jnp.where(mask[:, None, None], logits, -jnp.inf)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, K, G, T, S]
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v.astype(jnp.float32), precision=HIGHEST)
    return out.reshape(b, t, n, h).astype(v.dtype)


def inputs(b, t, n, kv_heads, h, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h))
    k = rng.normal(size=(b, t, kv_heads, h))
    v = rng.normal(size=(b, t, kv_heads, h))
    return (jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype))


def packed_segments(t):
    """[2, T]: row 0 left and right padding (-1) around two packed examples; row 1 three
    examples, no padding. Boundaries fall inside splash's 128-token blocks."""
    row0 = np.full(t, -1)
    row0[7:100], row0[100:t - 20] = 0, 1
    row1 = np.repeat([0, 1, 2], [60, 75, t - 135])
    return jnp.asarray(np.stack([row0, row1]), jnp.int32)


# Float32 throughout: the kernel's online softmax differs from the reference only in the
# order of its sums (exact exp and reciprocal), measured ~1e-6; 1e-5 leaves a margin.
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kv_heads, window", [(2, 0), (1, 33)], ids=["gqa", "mqa-window"])
def test_splash_matches_reference_with_packing_and_padding(kv_heads, window):
    q, k, v = inputs(2, 200, 4, kv_heads, 32)  # T = 200 is not a multiple of the block
    segments = packed_segments(200)
    out = splash_attention(q, k, v, segments, window, interpret=True, block=128)
    assert out.shape == q.shape and out.dtype == jnp.float32
    np.testing.assert_allclose(out, reference(q, k, v, segments, window), **TOL)


def test_splash_without_segments_lowers_a_block_longer_than_t():
    q, k, v = inputs(1, 200, 4, 2, 32, seed=1)
    out = splash_attention(q, k, v, None, 64, interpret=True)  # block 512 -> 256
    np.testing.assert_allclose(out, reference(q, k, v, None, 64), **TOL)


def test_splash_gradients_match_reference():
    q, k, v = inputs(2, 200, 4, 2, 32, seed=2)
    segments = packed_segments(200)
    cotangent = jnp.asarray(np.random.default_rng(3).normal(size=q.shape), jnp.float32)

    def loss(attention):
        return lambda q, k, v: jnp.sum(attention(q, k, v) * cotangent)

    splash = jax.jit(jax.grad(loss(lambda q, k, v: splash_attention(
        q, k, v, segments, 48, interpret=True, block=128)), argnums=(0, 1, 2)))
    plain = jax.grad(loss(lambda q, k, v: reference(q, k, v, segments, 48)), argnums=(0, 1, 2))
    for name, got, want in zip("qkv", splash(q, k, v), plain(q, k, v), strict=True):
        np.testing.assert_allclose(got, want, **TOL, err_msg=f"d{name}")


def test_splash_block_must_be_whole_lanes():
    q, k, v = inputs(1, 8, 2, 1, 8)
    with pytest.raises(ValueError, match="multiple of 128"):
        splash_attention(q, k, v, None, block=200, interpret=True)


def check_cudnn_attention(dtype, tol):
    t, lengths = 200, jnp.asarray([200, 131], jnp.int32)
    q, k, v = inputs(2, t, 4, 2, 64, dtype=dtype)
    # Right padding: its own segment, so the reference's real rows see exactly the real keys.
    segments = jnp.where(jnp.arange(t)[None] < lengths[:, None], 0, -1)
    real = np.asarray(jnp.arange(t)[None] < lengths[:, None])  # [B, T]
    for window in (0, 33):
        out = cudnn_attention(q, k, v, window, lengths, lengths)
        want = reference(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                         segments, window)
        assert out.shape == q.shape and out.dtype == dtype
        np.testing.assert_allclose(np.asarray(out, np.float32)[real], np.asarray(want)[real],
                                   **tol, err_msg=f"window={window}")


def test_cudnn_arguments_through_xla(monkeypatch):
    """The same call with implementation="xla", which reads local_window_size and the lengths
    as the cuDNN path does, checks the argument forms on CPU (in float32: xla takes it)."""
    attention = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention",
                        lambda *args, **kw: attention(*args, **{**kw, "implementation": "xla"}))
    check_cudnn_attention(jnp.float32, TOL)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_matches_reference():
    check_cudnn_attention(jnp.bfloat16, dict(rtol=2e-2, atol=2e-2))
