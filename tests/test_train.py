"""SFT: data and masks, loss and gradients against PyTorch autograd, packing, accumulation."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen2_jax
from conftest import assert_grads_equal_torch, make_hf_model
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train import step
from qwen2_jax.train.data import DataError, Example, load_examples, pack
from qwen2_jax.train.step import (
    SFTObjective,
    TrainConfig,
    batch_gradients,
    optimizer,
    token_losses,
    train_step,
)


def examples(rng, lengths=(7, 12, 5, 9, 3)) -> list[Example]:
    out = []
    for n in lengths:
        targets = (rng.random(n) < 0.6).tolist()
        targets[-1] = True
        out.append(Example(rng.integers(0, 101, n).tolist(), targets))
    return out


def loss_and_grads(config, params, batch, summed=False):
    """(mean loss, per-token losses, gradients), the gradients from the per-token losses or,
    summed, from the fused loss-and-gradient pass of a trained head (SFT's)."""
    def mean_loss(p):
        losses = token_losses(config, p, batch)
        total = token_losses(config, p, batch, summed=True) if summed else losses.sum()
        return total / batch["weights"].sum(), losses

    (loss, losses), grads = jax.value_and_grad(mean_loss, has_aux=True)(params)
    return loss, losses, grads


@pytest.mark.parametrize("loss_chunk, tied, summed", [
    (None, False, False), (5, True, False), (5, False, True), (5, True, True)],
    ids=["one_chunk", "tied_chunks_of_5", "fused_chunks_of_5", "fused_tied_chunks_of_5"])
def test_loss_and_grads_equal_pytorch_autograd(tmp_path, rng, monkeypatch, loss_chunk, tied,
                                               summed):
    """Also with the vocab projection and loss in chunks of 5 positions (16-token rows: three
    chunks and a padded one), as long rows run them, with the lm_head tied to the
    embeddings (the table's gradient then sums both uses), and with the fused pass that makes
    the head's and the hidden states' gradients with the loss (SFT's)."""
    if loss_chunk:
        monkeypatch.setattr(step, "LOSS_CHUNK", loss_chunk)
    model = make_hf_model(tmp_path, tie_word_embeddings=tied)
    config, params = qwen2_jax.load(tmp_path)
    batch = {k: jnp.asarray(v) for k, v in pack(examples(rng), 16, seed=0).items()}
    loss, losses, grads = loss_and_grads(config, params, batch, summed)

    # transformers on each example alone (no packing on its side), summed like ours
    total, count = 0.0, 0.0
    tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    weights = np.asarray(batch["weights"])
    for r in range(tokens.shape[0]):
        for s in set(segments[r]) - {0}:
            at = segments[r] == s
            ids = torch.as_tensor(tokens[r, at][None], dtype=torch.long)
            logp = torch.log_softmax(model(ids).logits.float(), -1)[0, :-1]
            nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
            w = torch.as_tensor(weights[r, at][:-1])
            np.testing.assert_allclose(np.asarray(losses[r])[at][:-1], (nll * w).detach().numpy(),
                                       rtol=0, atol=2e-5)
            total = total + (nll * w).sum()
            count += float(w.sum())
    (total / count).backward()
    np.testing.assert_allclose(float(loss), float(total.detach() / count), rtol=1e-5)
    assert_grads_equal_torch(config, grads, model, atol=1e-4)


def test_packed_rows_equal_unpacked(tmp_path, rng):
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    data = examples(rng)
    packed = {k: jnp.asarray(v) for k, v in pack(data, 24, seed=1).items()}
    singles = [pack([example], 12, seed=0) for example in data]  # one example per row
    alone = {k: jnp.concatenate([x[k] for x in singles]) for k in singles[0]}
    assert packed["tokens"].shape[0] < alone["tokens"].shape[0] == len(data)
    loss_p, _, grads_p = loss_and_grads(config, params, packed)
    loss_a, _, grads_a = loss_and_grads(config, params, alone)
    np.testing.assert_allclose(float(loss_p), float(loss_a), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_p,
                 grads_a)


def test_accumulated_micro_batches_equal_one_large_batch(tmp_path, rng):
    make_hf_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    batch = pack(examples(rng, (7, 12, 9, 11)), 12, seed=2)  # no two fit a row: 4 rows
    assert batch["tokens"].shape == (4, 12)
    one = {k: jnp.asarray(v)[None] for k, v in batch.items()}  # [1, 4, T]
    two = {k: jnp.asarray(v).reshape(2, 2, 12) for k, v in batch.items()}  # [2, 2, T]
    objective = SFTObjective(config)
    gradients = jax.jit(batch_gradients, static_argnums=0)
    m1, grads1 = gradients(objective, params, one)
    m2, grads2 = gradients(objective, params, two)
    loss1 = m1["loss"]
    np.testing.assert_allclose(float(loss1), float(m2["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=0, atol=1e-6), grads1, grads2)

    # and the jitted step with grad_accum=2 runs: AdamW moves every parameter
    train = TrainConfig(learning_rate=1e-3, total_steps=10, grad_accum=2)
    start = jax.tree.map(np.array, params)  # copies: the step donates (reuses) params
    new, _, metrics = train_step(objective, train, params, optimizer(train).init(params), two, 0)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss1), rtol=1e-6)
    assert float(metrics["lr"]) == pytest.approx(1e-3)  # the peak: no warmup, step 0
    assert all(np.abs(np.asarray(a) - b).max() > 0 for a, b in zip(
        jax.tree.leaves(new), jax.tree.leaves(start), strict=True))


# ----- data ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(qwen2_tokenizer_dir):
    return Tokenizer(str(qwen2_tokenizer_dir))


def write_lines(path, lines):
    path.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return str(path)


def test_assistant_only_targets(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [
        {"messages": [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                      {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]},
        {"prompt": "Hi", "completion": "Hello!"},
    ])
    data, stats = load_examples(path, tokenizer, max_len=256)
    assert stats.examples == 2
    first = data[0]
    trained = tokenizer.decode([t for t, m in zip(first.tokens, first.targets, strict=True) if m])
    assert trained == "4<|im_end|>\n6<|im_end|>\n"
    assert tokenizer.decode(first.tokens) == tokenizer.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
         {"role": "assistant", "content": "6"}], False)
    second = data[1]
    assert tokenizer.decode([t for t, m in zip(second.tokens, second.targets, strict=True)
                             if m]) == "Hello!<|im_end|>\n"
    everything, _ = load_examples(path, tokenizer, 256, train_on_prompt=True)
    assert all(everything[0].targets)


def test_bad_lines_name_file_and_line_or_are_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [
        {"prompt": "a", "completion": "b"},
        "{not json",
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"text": "wrong format"},
        {"messages": [{"role": "robot", "content": "x"}]},
    ])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_examples(path, tokenizer, 64)
    data, stats = load_examples(path, tokenizer, 64, skip_bad_lines=True)
    assert (len(data), stats.skipped_bad_lines) == (1, 4)


def test_overlong_examples_are_truncated_or_dropped_and_counted(tmp_path, tokenizer):
    path = write_lines(tmp_path / "d.jsonl", [{"prompt": "a", "completion": "word " * 50},
                                              {"prompt": "b", "completion": "c"}])
    data, stats = load_examples(path, tokenizer, 30)
    assert stats.truncated == 1 and len(data[0].tokens) == 30 and stats.examples == 2
    data, stats = load_examples(path, tokenizer, 30, overflow="drop")
    assert stats.dropped_too_long == 1 and stats.examples == 1


def test_packing_is_deterministic_by_seed(rng):
    data = examples(rng, (3, 4, 5, 6, 7, 8))
    a, b, c = pack(data, 16, seed=0), pack(data, 16, seed=0), pack(data, 16, seed=5)
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != c[k]).any() for k in a if a[k].shape == c[k].shape) or \
        a["tokens"].shape != c["tokens"].shape
    assert a["weights"].sum() == sum(sum(e.targets[1:]) for e in data)


@pytest.mark.parametrize("loss_chunk", [None, 5], ids=["one_chunk", "chunks_of_5"])
def test_train_step_on_a_mesh_equals_one_device(tmp_path, rng, monkeypatch, loss_chunk):
    """The jitted step keeps params and optimizer state sharded as loaded, and computes the
    same update (fsdp=4 x tensor=2 over 8 CPU devices), also with the loss in chunks."""
    from qwen2_jax.sharding import make_mesh

    if loss_chunk:
        monkeypatch.setattr(step, "LOSS_CHUNK", loss_chunk)
    make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    config, params = qwen2_jax.load(tmp_path)
    batch = {k: jnp.asarray(v).reshape(2, 2, 12)
             for k, v in pack(examples(rng, (7, 12, 9, 11)), 12, seed=2).items()}
    train = TrainConfig(learning_rate=1e-3, total_steps=10, grad_accum=2)
    expected, _, m1 = train_step(SFTObjective(config), train, params,
                                 optimizer(train).init(params), batch, 0)
    mesh = make_mesh("fsdp=4,tensor=2")
    _, sharded = qwen2_jax.load(tmp_path, mesh=mesh)
    shardings = jax.tree.map(lambda x: x.sharding, sharded)
    objective = SFTObjective(config, mesh=mesh, rules=qwen2_jax.sharding.DEFAULT_RULES)
    got, _, m2 = train_step(objective, train, sharded, optimizer(train).init(sharded), batch, 0)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    for x, y, s in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                       jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
        # Adam's first update is about +-lr per weight; a coordinate whose gradient is ~0
        # turns float noise into a visible difference, hence 10% of lr.
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-4)
