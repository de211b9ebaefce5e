"""Long context: blockwise attention against the dense reference, memory that grows linearly,
chunked prefill, decoding over long caches, dynamic YaRN and sequence parallelism."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_attention import dot_product_attention
from test_generate import hf_generate

import qwen2_jax
from conftest import hf_logits, make_hf_model, make_word_chat_model
from qwen2_jax import Qwen2Config, blockwise, decoding
from qwen2_jax.api import _forward
from qwen2_jax.decoding import generate, init_cache, prefill
from qwen2_jax.rope import dynamic_yarn_scale
from qwen2_jax.sharding import make_mesh

NO_SEGMENT = np.iinfo(np.int32).min
SCRIPT = Path(sys.executable).parent / "qwen2-jax"


def dense_mask(t, s, offset, q_segments, kv_segments, window):
    """The [B, T, S] mask by its definition (`blockwise`'s docstring), in numpy."""
    q_index = np.asarray(offset)[:, None] + np.arange(t)  # [B, T]
    diff = q_index[:, :, None] - np.arange(s)[None, None, :]
    mask = (diff >= 0) & (q_segments[:, :, None] == kv_segments[:, None, :])
    return mask & (diff < window) if window else mask


def random_qkv(rng, b, t, s, n, k, h=8):
    """q [B, T, N, H]; k, v [B, K, S, H] (kv-head major, as the kernel and the cache)."""
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), jnp.float32)
    return normal(b, t, n, h), normal(b, k, s, h), normal(b, k, s, h)


def dense(q, key, value, mask):
    """The dense reference on kv-major keys and values."""
    return dot_product_attention(q, jnp.swapaxes(key, 1, 2), jnp.swapaxes(value, 1, 2), mask)


# Each case: (T, heads N on kv heads K, window, the segment layout). Blocks of 16 queries and
# 32 keys (8 and 16 for the larger windows) make every case span many blocks, skipped ones
# included.
MASK_CASES = {
    "left_padding_gqa": (70, 4, 2, 0, "left"),
    "right_padding_mqa": (70, 4, 1, 0, "right"),
    "packed_segments": (90, 6, 2, 0, "packed"),
    "window_packed": (90, 4, 2, 7, "packed"),
    "window_wider_than_a_block": (100, 4, 2, 40, "left"),
}


def segments_for(layout: str, b: int, t: int) -> np.ndarray:
    seg = np.zeros((b, t), np.int32)
    if layout == "left":
        seg[0, :13] = NO_SEGMENT
    elif layout == "right":
        seg[1, t - 21:] = NO_SEGMENT
    else:  # three packed examples, then padding
        seg[:, 30:] = 1
        seg[:, 55:] = 2
        seg[:, t - 9:] = NO_SEGMENT
    return seg


@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_blockwise_equals_dense_attention_and_its_gradients(case):
    t, n, k, window, layout = MASK_CASES[case]
    rng = np.random.default_rng(0)
    q, key, value = random_qkv(rng, 2, t, t, n, k)
    seg = segments_for(layout, 2, t)
    mask = jnp.asarray(dense_mask(t, t, np.zeros(2, int), seg, seg, window))
    real = jnp.asarray(seg != NO_SEGMENT)[:, :, None, None]  # padding queries' rows differ
    weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * real

    def ours(q, key, value):
        out = blockwise.attention(q, key, value, 0, jnp.asarray(seg), jnp.asarray(seg), window,
                                  block_q=16, block_kv=32)
        return jnp.sum(out * weights), out

    def reference(q, key, value):
        out = dense(q, key, value, mask)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.value_and_grad(ours, argnums=(0, 1, 2), has_aux=True)(q, key, value)
    (_, expected), expected_grads = jax.value_and_grad(reference, argnums=(0, 1, 2),
                                                       has_aux=True)(q, key, value)
    np.testing.assert_allclose(out * real, expected * real, rtol=1e-5, atol=1e-5)
    for name, g, e in zip("qkv", grads, expected_grads, strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


def test_cache_attention_equals_dense_for_chunks_and_decode_steps():
    """Queries at per-row offsets into a cache (a prefill chunk, a decode step) see exactly
    the slots up to their own, within the window."""
    rng = np.random.default_rng(1)
    for t, offsets, window in ((24, [0, 40], 0), (1, [5, 90], 0), (1, [70, 17], 9),
                               (24, [33, 0], 20)):
        q, key, value = random_qkv(rng, 2, t, 128, 6, 2)
        offsets = np.asarray(offsets, np.int32)
        zeros_q, zeros_kv = np.zeros((2, t), np.int32), np.zeros((2, 128), np.int32)
        mask = dense_mask(t, 128, offsets, zeros_q, zeros_kv, window)
        out = blockwise.attention(q, key, value, jnp.asarray(offsets), None, None, window,
                                  block_q=8, block_kv=16)
        np.testing.assert_allclose(out, dense(q, key, value, jnp.asarray(mask)),
                                   rtol=1e-5, atol=1e-5)


def test_decoding_never_reads_a_cache_block_past_the_next_one():
    """Slots from two blocks past a row's length on hold NaN: if any were read into a kept
    result, the output would be NaN. (A row done before the others computes on the one block
    after its range and discards it, so that block may hold anything too.)"""
    rng = np.random.default_rng(2)
    q, key, value = random_qkv(rng, 3, 1, 256, 4, 2)
    lengths = np.array([20, 131, 64])
    block = 16
    poisoned_k, poisoned_v = np.array(key), np.array(value)
    for row, length in enumerate(lengths):
        first_unread = ((length - 1) // block + 2) * block
        poisoned_k[row, :, first_unread:] = np.nan
        poisoned_v[row, :, first_unread:] = np.nan
    args = jnp.asarray(lengths - 1), None, None, 0, 1, block
    clean = blockwise.attention(q, key, value, *args)
    poisoned = blockwise.attention(q, jnp.asarray(poisoned_k), jnp.asarray(poisoned_v), *args)
    assert np.isfinite(np.asarray(poisoned)).all()
    np.testing.assert_array_equal(poisoned, clean)


def test_a_long_sequence_through_the_model_equals_transformers(tmp_path):
    """1,100 tokens: several 512-token blocks, skipped blocks, left padding and a window in
    the model's own block sizes."""
    model = make_hf_model(tmp_path, use_sliding_window=True, sliding_window=300,
                          max_window_layers=1, max_position_embeddings=2048)
    config, params = qwen2_jax.load(tmp_path)
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 101, (2, 1100))
    mask = np.ones_like(ids)
    mask[1, :77] = 0
    expected = hf_logits(model, ids, mask)
    ours = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    real = mask.astype(bool)
    np.testing.assert_allclose(ours[real], expected[real], rtol=1e-4, atol=1e-4)


TINY = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=65536)


def test_forward_and_training_memory_grow_linearly_with_length():
    """XLA's own accounting of the compiled programs: doubling the length at most doubles
    the temporary memory (dense attention's [N, T, T] float32 scores would quadruple it, to
    4.3 GB at 16K tokens)."""
    params = qwen2_jax.init(TINY, jax.random.key(0))

    def temp_bytes(length: int, grad: bool) -> int:
        ids = jax.ShapeDtypeStruct((1, length), jnp.int32)

        def logits(params, ids):
            return _forward(TINY, jnp.float32, "full", None, (), "sorted", False, params, ids,
                            None, None, None)

        fn = jax.grad(lambda p, i: logits(p, i).sum()) if grad else logits
        return jax.jit(fn).lower(params, ids).compile().memory_analysis().temp_size_in_bytes

    for grad in (False, True):
        short, long = temp_bytes(8192, grad), temp_bytes(16384, grad)
        assert long <= 2.2 * short, (grad, short, long)
        assert long < 0.1 * 4 * 16384 ** 2 * TINY.num_attention_heads


def test_chunked_prefill_memory_does_not_grow_with_the_prompt():
    """One compiled chunk serves a prompt of any length; its temporary memory beside a cache
    of 65,536 slots is its memory beside 8,192 plus at most three copies of one layer's keys
    and values (the layer scan's copies of the layer it updates; 8 layers here, so a copy of
    the whole cache fails), nothing that grows with chunk x slots (a dense mask alone would
    be 134 MB, the scores 2.1 GB)."""
    config = dataclasses.replace(TINY, num_hidden_layers=8)
    params = qwen2_jax.init(config, jax.random.key(0))

    def layer_cache_bytes(slots: int) -> int:
        return 2 * config.num_key_value_heads * slots * config.head_size * 4

    def temp_bytes(slots: int) -> int:
        cache = jax.eval_shape(lambda: init_cache(config, 1, slots, jnp.float32))
        ids = jax.ShapeDtypeStruct((1, 2048), jnp.int32)
        rows = jax.ShapeDtypeStruct((1,), jnp.int32)
        logits = jax.ShapeDtypeStruct((1, config.vocab_size), jnp.float32)
        compiled = decoding._prefill_chunk.lower(
            config, jnp.float32, None, (), params, cache, ids, jnp.int32(0), rows, logits,
            None).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    assert temp_bytes(65536) <= temp_bytes(8192) + 3 * layer_cache_bytes(65536)


@pytest.fixture(scope="module")
def windowed_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("windowed")
    model = make_hf_model(folder, use_sliding_window=True, sliding_window=6,
                          max_window_layers=1)
    return model, *qwen2_jax.load(folder)


def test_chunked_prefill_gives_the_same_greedy_tokens_for_every_chunk_size(windowed_model):
    model, config, params = windowed_model
    rng = np.random.default_rng(4)
    prompts = [rng.integers(0, 101, n).tolist() for n in (37, 5, 20)]
    expected = hf_generate(model, prompts, 12, do_sample=False, eos_token_id=None)
    for chunk in (1, 5, 16, 2048):
        assert generate(config, params, prompts, max_new_tokens=12,
                        prefill_chunk=chunk) == expected, chunk


def test_prefill_compiles_once_per_chunk_width(windowed_model):
    _, config, params = windowed_model
    rng = np.random.default_rng(5)
    generate(config, params, [rng.integers(0, 101, 40).tolist()], 2, prefill_chunk=8)
    before = decoding._prefill_chunk._cache_size()
    for n in (33, 50, 61):  # other prompt lengths, the same cache bucket: more chunks
        generate(config, params, [rng.integers(0, 101, n).tolist()], 2, prefill_chunk=8)
    assert decoding._prefill_chunk._cache_size() == before


def test_sft_trains_on_32768_token_sequences_in_bounded_memory(tmp_path):
    """One SFT step on one 32,768-token row. Dense attention's scores alone would take
    8.6 GB (2 heads x 32,768^2 float32); the blockwise kernel and remat keep the whole
    process under 2 GB."""
    words = [f"w{i}" for i in range(40)]
    make_word_chat_model(tmp_path, words, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=32768)
    rng = random.Random(0)
    prompt = " ".join(rng.choice(words) for _ in range(32740))
    (tmp_path / "train.jsonl").write_text(json.dumps({"prompt": prompt,
                                                      "completion": "w1 w2 w3"}) + "\n")
    command = [str(SCRIPT), "sft", "--model", str(tmp_path), "--data",
               str(tmp_path / "train.jsonl"), "--out", str(tmp_path / "out"), "--steps", "1",
               "--batch-size", "1", "--max-len", "32768", "--remat", "full", "--no-progress"]
    # A wrapper process reports its child's peak RSS alone (this worker's other children
    # would count in our own RUSAGE_CHILDREN).
    wrapper = ("import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)")
    run = subprocess.run([sys.executable, "-c", wrapper, *command], capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr
    peak_mb = int(run.stdout.split()[-1]) / 1024
    assert peak_mb < 2048, peak_mb
    (record,) = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert math.isfinite(record["loss"]) and record["loss"] > 0


def test_generate_reads_a_long_prompt_from_a_file(tmp_path):
    """--prompt-file gives the whole file as one prompt: the same text as --prompt, here
    3,000 words prefilled in chunks of 512; a file that is not UTF-8 names its line."""
    words = [f"w{i}" for i in range(40)]
    make_word_chat_model(tmp_path, words, max_position_embeddings=4096)
    rng = random.Random(1)
    text = " ".join(rng.choice(words) for _ in range(3000))
    (tmp_path / "prompt.txt").write_text(text)
    common = [str(SCRIPT), "generate", "--model", str(tmp_path), "--max-new-tokens", "6",
              "--prefill-chunk", "512"]
    from_file = subprocess.run([*common, "--prompt-file", str(tmp_path / "prompt.txt")],
                               capture_output=True, text=True, timeout=300)
    assert from_file.returncode == 0, from_file.stderr
    inline = subprocess.run([*common, "--prompt", text], capture_output=True, text=True,
                            timeout=300)
    assert from_file.stdout == inline.stdout and from_file.stdout.strip()
    (tmp_path / "bad.txt").write_bytes(b"w1 w2\nw3 \xff w4")
    bad = subprocess.run([*common, "--prompt-file", str(tmp_path / "bad.txt")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert f"{tmp_path / 'bad.txt'}:2: not UTF-8 text" in bad.stderr


# ----- dynamic YaRN ---------------------------------------------------------------------

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    """One set of weights, with and without YaRN rope_scaling (original context 32)."""
    folder = tmp_path_factory.mktemp("yarn")
    model = make_hf_model(folder, rope_scaling=YARN, max_position_embeddings=128)
    config, params = qwen2_jax.load(folder)
    return model, config, dataclasses.replace(config, rope_scaling=None), params


def prefill_logits(config, params, prompt, rope_scale):
    ids = np.asarray([prompt], np.int32)
    cache = init_cache(config, 1, 64, jnp.float32)
    logits, _ = prefill(config, jnp.float32, None, (), params, cache, ids,
                        jnp.asarray([len(prompt)]), rope_scale=rope_scale)
    return np.asarray(logits)


def test_dynamic_yarn_scale_follows_the_request_length():
    config = Qwen2Config(rope_scaling=YARN, max_position_embeddings=128)
    np.testing.assert_array_equal(dynamic_yarn_scale(config, [10, 32, 48, 128, 1000]),
                                  np.float32([1, 1, 1.5, 4, 4]))


def test_dynamic_yarn_on_a_short_request_is_exactly_plain_rope(yarn_model):
    _, yarn, plain, params = yarn_model
    prompt = list(range(3, 23))
    scale = jnp.asarray(dynamic_yarn_scale(yarn, [len(prompt) + 8]))  # 28 <= 32: s = 1
    plain_logits = prefill_logits(plain, params, prompt, None)
    np.testing.assert_array_equal(prefill_logits(yarn, params, prompt, scale), plain_logits)
    static = prefill_logits(yarn, params, prompt, None)
    assert np.abs(static - plain_logits).max() > 1e-3  # static YaRN changes short inputs


def test_dynamic_yarn_rows_differ_in_one_batch_without_recompiling(yarn_model):
    _, yarn, plain, params = yarn_model
    rng = np.random.default_rng(6)
    short, long = rng.integers(0, 101, 10).tolist(), rng.integers(0, 101, 60).tolist()
    alone = [generate(yarn, params, [p], max_new_tokens=8) for p in (short, long)]
    together = generate(yarn, params, [short, long], max_new_tokens=8)
    assert together == [a[0] for a in alone]
    assert generate(yarn, params, [long], max_new_tokens=8, yarn=None) == alone[1]  # default
    # the short row got plain RoPE, the long one s = 68 / 32 = 2.125: not static YaRN's 4
    assert alone[0] == generate(plain, params, [short], max_new_tokens=8)
    assert together[1] != generate(yarn, params, [long], max_new_tokens=8, yarn="static")[0]
    generate(yarn, params, [long[:40]], max_new_tokens=8)  # s = 1.5
    counts = decoding._prefill_chunk._cache_size(), decoding._decode_loop._cache_size()
    generate(yarn, params, [long[:45]], max_new_tokens=8)  # s = 1.66, the same shapes
    assert (decoding._prefill_chunk._cache_size(), decoding._decode_loop._cache_size()) == counts


def test_dynamic_yarn_at_the_full_factor_equals_transformers(yarn_model):
    model, yarn, _, params = yarn_model
    prompt = np.random.default_rng(7).integers(0, 101, 100).tolist()  # 100 + 28 = 4 x 32
    ours = generate(yarn, params, [prompt], max_new_tokens=28)
    assert ours == hf_generate(model, [prompt], 28, do_sample=False, eos_token_id=None)


# ----- sequence parallelism ---------------------------------------------------------------

@pytest.mark.parametrize("spec", ["sequence=4,tensor=2", "data=2,sequence=4"])
def test_sequence_parallel_forward_and_prefill_equal_one_device(windowed_model, spec):
    _, config, params = windowed_model
    rng = np.random.default_rng(8)
    ids = rng.integers(0, 101, (2, 64))
    mask = np.ones_like(ids)
    mask[0, :5] = 0
    mesh = make_mesh(spec)
    sharded = jax.device_put(params, qwen2_jax.api.param_shardings(config, mesh))
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    ours = qwen2_jax.forward(config, sharded, ids, mask)
    assert "sequence" in str(ours.sharding.spec)
    real = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[real], expected[real], rtol=1e-4, atol=1e-4)
    prompts = [rng.integers(0, 101, 40).tolist(), rng.integers(0, 101, 23).tolist()]
    assert (generate(config, sharded, prompts, max_new_tokens=6, prefill_chunk=16)
            == generate(config, params, prompts, max_new_tokens=6, prefill_chunk=16))
