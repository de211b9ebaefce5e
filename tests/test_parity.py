"""Logits parity with transformers' Qwen2ForCausalLM on tiny random checkpoints (float32)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Qwen2ForCausalLM

import qwen2_jax
from conftest import hf_logits, make_hf_model

TOL = 1e-4


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))))


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param(dict(tie_word_embeddings=True), id="tied"),
        pytest.param(dict(tie_word_embeddings=False), id="untied"),
        pytest.param(dict(num_attention_heads=4, num_key_value_heads=4), id="mha"),
        pytest.param(dict(num_attention_heads=4, num_key_value_heads=2), id="gqa"),
        pytest.param(dict(num_attention_heads=4, num_key_value_heads=1), id="mqa"),
        pytest.param(dict(hidden_size=56, num_attention_heads=14, num_key_value_heads=2,
                          tie_word_embeddings=True), id="14heads_2kv_like_0.5B"),
        pytest.param(dict(head_dim=6, num_attention_heads=4, num_key_value_heads=2),
                     id="explicit_head_dim"),
    ],
)
def test_logits_match_transformers(tmp_path, rng, overrides):
    model = make_hf_model(tmp_path, **overrides)
    config, params = qwen2_jax.load(tmp_path)
    ids = rng.integers(0, config.vocab_size, (2, 11))
    ours = qwen2_jax.forward(config, params, ids)
    ref = hf_logits(model, ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert max_diff(ours, ref) <= TOL, max_diff(ours, ref)
    assert np.abs(ref).max() > 0.3  # logits of magnitude ~1: the tolerance means something


def test_yarn_beyond_original_context(tmp_path, rng):
    """Positions up to 4x past `original_max_position_embeddings`, both YaRN key spellings."""
    scaling = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    model = make_hf_model(tmp_path, rope_scaling=scaling, max_position_embeddings=64)
    config, params = qwen2_jax.load(tmp_path)
    assert config.rope_type == "yarn"
    ids = rng.integers(0, config.vocab_size, (1, 60))
    ref = hf_logits(model, ids)
    assert max_diff(qwen2_jax.forward(config, params, ids), ref) <= TOL
    # Plain RoPE on the same weights is far off: the test sees the scaling.
    plain = dataclasses.replace(config, rope_scaling=None)
    assert max_diff(qwen2_jax.forward(plain, params, ids), ref) > 1e-2


@pytest.mark.parametrize("layer_types", [None, ["full_attention", "sliding_attention",
                                                "full_attention"]])
def test_sliding_window_on_the_right_layers(tmp_path, rng, layer_types):
    """Window 5 on layers >= max_window_layers (or as layer_types says), sequence of 23."""
    extra = {} if layer_types is None else {"layer_types": layer_types}
    model = make_hf_model(tmp_path, use_sliding_window=True, sliding_window=5,
                          max_window_layers=1, **extra)
    config, params = qwen2_jax.load(tmp_path)
    expected = (0, 5, 5) if layer_types is None else (0, 5, 0)
    assert config.layer_windows == expected
    ids = rng.integers(0, config.vocab_size, (2, 23))
    ref = hf_logits(model, ids)
    assert max_diff(qwen2_jax.forward(config, params, ids), ref) <= TOL
    # Each wrong layer assignment is visibly wrong, so the comparison above pins the layers.
    for wrong in (["full_attention"] * 3, ["sliding_attention"] * 3):
        other = dataclasses.replace(config, layer_types=tuple(wrong))
        assert max_diff(qwen2_jax.forward(other, params, ids), ref) > 1e-2


def padded_batch(rng, lengths, total, side, vocab):
    ids = rng.integers(0, vocab, (len(lengths), total))  # padding ids random: a leak shows
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        if side == "left":
            mask[row, total - n:] = 1
        else:
            mask[row, :n] = 1
    return ids, mask


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_equals_each_row_alone(tmp_path, rng, side):
    model = make_hf_model(tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    config, params = qwen2_jax.load(tmp_path)
    ids, mask = padded_batch(rng, [9, 4, 13], 13, side, config.vocab_size)
    ours = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    ref_batch = hf_logits(model, ids, mask, positions)
    for row in range(ids.shape[0]):
        real = mask[row].astype(bool)
        alone = hf_logits(model, ids[row:row + 1, real])[0]
        assert max_diff(ours[row, real], alone) <= TOL
        assert max_diff(ours[row, real], ref_batch[row, real]) <= TOL


def test_packed_segments_equal_each_segment_alone(tmp_path, rng):
    model = make_hf_model(tmp_path, use_sliding_window=True, sliding_window=4, max_window_layers=1)
    config, params = qwen2_jax.load(tmp_path)
    lengths = [5, 8, 3]
    segments = np.concatenate([np.full(n, s + 1) for s, n in enumerate(lengths)] + [np.zeros(2)])
    ids = rng.integers(0, config.vocab_size, (1, segments.size))
    mask = (segments != 0).astype(np.int32)[None]
    ours = np.asarray(qwen2_jax.forward(config, params, ids, mask, segment_ids=segments[None]))
    start = 0
    for n in lengths:
        alone = hf_logits(model, ids[:, start:start + n])
        assert max_diff(ours[:, start:start + n], alone) <= TOL
        start += n
    # Without segment ids the later examples would see the earlier ones.
    leaky = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    assert max_diff(leaky[:, 5:13], ours[:, 5:13]) > 1e-2


def test_explicit_position_ids(tmp_path, rng):
    model = make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    ids = rng.integers(0, config.vocab_size, (2, 7))
    positions = np.stack([np.arange(7) + 30, np.arange(7) * 3])
    ours = qwen2_jax.forward(config, params, ids, position_ids=positions)
    assert max_diff(ours, hf_logits(model, ids, position_ids=positions)) <= TOL


def test_bf16_checkpoint_with_float32_compute(tmp_path, rng):
    make_hf_model(tmp_path, dtype=torch.bfloat16)
    config, params = qwen2_jax.load(tmp_path, dtype="float32")
    assert config.dtype == "bfloat16"
    assert params["layers"]["self_attn"]["q_proj"]["kernel"].dtype == np.float32
    model = Qwen2ForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = rng.integers(0, config.vocab_size, (2, 9))
    assert max_diff(qwen2_jax.forward(config, params, ids), hf_logits(model, ids)) <= TOL


def test_sharded_checkpoint_with_index(tmp_path, rng):
    model = make_hf_model(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    config, params = qwen2_jax.load(tmp_path)
    ids = rng.integers(0, config.vocab_size, (1, 8))
    assert max_diff(qwen2_jax.forward(config, params, ids), hf_logits(model, ids)) <= TOL
