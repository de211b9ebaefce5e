"""Generation: greedy token-identical to transformers, sampling semantics, the cache API."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax.decoding import decode_step, generate, init_cache, prefill
from qwen2_jax.sampling import Sampling, choose, process
from qwen2_jax.sharding import make_mesh

PROMPT_LENGTHS = (5, 12, 1, 8)  # ragged: left-padded for transformers, not for us


def hf_generate(model, prompts, max_new_tokens, **kwargs) -> list[list[int]]:
    """transformers' generate on a left-padded batch; the new tokens of each row."""
    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             pad_token_id=0, **kwargs)
    return out[:, width:].tolist()


def until_stop(tokens: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(tokens):
        if t in stops:
            return tokens[:i]
    return tokens


@pytest.fixture
def prompts(rng):
    return [rng.integers(0, 101, n).tolist() for n in PROMPT_LENGTHS]


@pytest.mark.parametrize("overrides", [
    {},  # untied, GQA 4 on 2
    {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 4,
     "max_window_layers": 1},  # layers 1-2 windowed; 20 new tokens run far past the window
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
     "num_key_value_heads": 1},  # YaRN, MQA; positions go past the original context
])
def test_greedy_equals_transformers(tmp_path, prompts, overrides):
    model = make_hf_model(tmp_path, **overrides)
    config, params = qwen2_jax.load(tmp_path)
    ours = generate(config, params, prompts, max_new_tokens=20, yarn="static")  # transformers'
    assert ours == hf_generate(model, prompts, 20, do_sample=False, eos_token_id=None)


def test_stop_tokens_end_each_row(tmp_path, prompts):
    model = make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    free = hf_generate(model, prompts, 16, do_sample=False, eos_token_id=None)
    stops = {free[0][3], free[1][6]}  # rows 0 and 1 stop early; the others maybe later
    theirs = hf_generate(model, prompts, 16, do_sample=False, eos_token_id=sorted(stops))
    ours = generate(config, params, prompts, max_new_tokens=16, stop_token_ids=sorted(stops))
    assert ours == [until_stop(row, stops) for row in theirs]
    assert len(ours[0]) == 3 and len(ours[1]) <= 6


def test_greedy_with_repetition_penalty_equals_transformers(tmp_path, prompts):
    model = make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    ours = generate(config, params, prompts, max_new_tokens=16, repetition_penalty=1.5)
    theirs = hf_generate(model, prompts, 16, do_sample=False, eos_token_id=None,
                         repetition_penalty=1.5)
    assert ours == theirs
    assert ours != generate(config, params, prompts, max_new_tokens=16)  # it does something


def test_step_by_step_equals_generate(tmp_path, prompts):
    """prefill + decode_step by hand, the API a server builds on, gives generate's tokens."""
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)
    ids = np.zeros((len(prompts), 16), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    cache = init_cache(config, len(prompts), 32, jnp.float32)
    logits, cache = prefill(config, jnp.float32, None, (), params, cache, ids, lengths)
    tokens = []
    for _ in range(6):
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        tokens.append(np.asarray(token))
        logits, cache = decode_step(config, jnp.float32, None, (), params, cache, lengths, token)
        lengths = lengths + 1
    assert np.stack(tokens, 1).tolist() == generate(config, params, prompts, max_new_tokens=6)


@pytest.mark.parametrize("spec", ["data=2,tensor=2,fsdp=2", "tensor=2,fsdp=4"])
def test_generate_on_a_mesh_equals_one_device(tmp_path, spec):
    make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 128, n).tolist() for n in (3, 9, 6, 1, 4, 7, 2, 5)]
    config, params = qwen2_jax.load(tmp_path)
    expected = generate(config, params, prompts, max_new_tokens=10)
    mesh = make_mesh(spec)
    _, sharded = qwen2_jax.load(tmp_path, mesh=mesh)
    assert generate(config, sharded, prompts, max_new_tokens=10) == expected
    cache = init_cache(config, 8, 32, jnp.float32, mesh)
    assert cache["k"].sharding.spec[1:4] == (("data", "fsdp") if "data" in spec else "fsdp",
                                             "tensor", None)


# ----- sampling ---------------------------------------------------------------------------


def hf_process(logits, seen_ids, s: Sampling) -> np.ndarray:
    """transformers' processors, in generate's order, on the same logits."""
    scores = torch.tensor(np.asarray(logits))
    ids = torch.tensor(seen_ids)
    if s.repetition_penalty:
        scores = RepetitionPenaltyLogitsProcessor(s.repetition_penalty)(ids, scores)
    scores = TemperatureLogitsWarper(s.temperature)(ids, scores)
    if s.top_k:
        scores = TopKLogitsWarper(s.top_k)(ids, scores)
    if s.top_p is not None:
        scores = TopPLogitsWarper(s.top_p)(ids, scores)
    if s.min_p:
        scores = MinPLogitsWarper(s.min_p)(ids, scores)
    return scores.numpy()


@pytest.mark.parametrize("s", [
    Sampling(64, temperature=0.7),
    Sampling(64, temperature=1.0, top_k=5),
    Sampling(64, temperature=1.3, top_p=0.9),
    Sampling(64, temperature=0.8, min_p=0.1),
    Sampling(64, temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3),
])
def test_processors_equal_transformers(rng, s):
    logits = rng.normal(size=(3, 64)).astype(np.float32) * 3
    seen_ids = rng.integers(0, 64, (3, 7))
    seen = np.zeros((3, 64), bool)
    np.put_along_axis(seen, seen_ids, True, axis=1)
    ours = np.asarray(process(jnp.asarray(logits), jnp.asarray(seen), s))
    theirs = hf_process(logits, seen_ids, s)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    finite = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-6)
    assert finite.sum(axis=1).min() >= 1


def test_top_p_keeps_exactly_the_nucleus():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    logits = jnp.asarray(np.log(probs))
    none = jnp.zeros((1, 4), bool)

    def kept(top_p):
        out = process(logits, none, Sampling(4, temperature=1.0, top_p=top_p))
        return np.flatnonzero(~np.isinf(np.asarray(out[0]))).tolist()

    assert kept(0.5) == [0]  # the most likely token alone reaches 0.5
    assert kept(0.79) == [0, 1]
    assert kept(0.81) == [0, 1, 2]
    assert kept(1.0) == [0, 1, 2, 3]


def test_top_k_1_equals_greedy(tmp_path, prompts):
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    greedy = generate(config, params, prompts, max_new_tokens=12)
    for seed in (0, 1):
        assert generate(config, params, prompts, max_new_tokens=12, temperature=1.5, top_k=1,
                        seed=seed) == greedy


def test_seeds_repeat_and_differ(tmp_path, prompts):
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)

    def run(seed):
        return generate(config, params, prompts, max_new_tokens=12, temperature=1.0, seed=seed)

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_empirical_frequencies_match_the_filtered_softmax():
    s = Sampling(8, temperature=0.8, top_k=6, top_p=0.9)
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.7, 0.3, 0.0, -0.5, 3.0]])
    seen = jnp.zeros((1, 8), bool)
    expected = np.asarray(jax.nn.softmax(process(logits, seen, s)))[0]
    n = 40_000
    keys = jax.random.split(jax.random.key(0), n)
    tokens = np.asarray(jax.vmap(lambda k: choose(logits, seen, k, s)[0])(keys))
    frequencies = np.bincount(tokens, minlength=8) / n
    assert (frequencies[expected == 0] == 0).all()  # filtered tokens never come
    np.testing.assert_allclose(frequencies, expected, atol=0.01)  # 4 sigma at n = 40k


def test_never_past_the_tokenizer_vocabulary(tmp_path, prompts):
    """Ids at or past vocab_size (the embedding's padding rows) never come out."""
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    hot = generate(config, params, prompts, max_new_tokens=30, temperature=5.0, vocab_size=40)
    greedy = generate(config, params, prompts, max_new_tokens=30, vocab_size=40)
    assert max(max(row) for row in hot + greedy) < 40
    assert len({t for row in hot for t in row}) > 10  # the hot sampler did explore


def test_bad_arguments():
    config = qwen2_jax.PRESETS["Qwen2-0.5B"]
    with pytest.raises(ValueError, match="top_p must be in"):
        Sampling(10, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="at least one token"):
        generate(config, {}, [[1], []])
