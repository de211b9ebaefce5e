"""DPO: data, losses, metrics and gradients against TRL's DPOTrainer (trl 1.16, run here)."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qwen2_jax
from conftest import assert_grads_equal_torch, make_hf_model, make_word_chat_model
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import DataError
from qwen2_jax.train.dpo import DPOObjective, sequence_logps
from qwen2_jax.train.preference import load_pairs, pair_batch
from qwen2_jax.train.step import batch_gradients

SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)

STANDARD = [
    {"prompt": "What is 2+2?", "chosen": " It is 4.", "rejected": " Five, surely."},
    {"prompt": "Name a colour", "chosen": ": blue", "rejected": ": the number 7"},
    {"prompt": "Translate 'chat'", "chosen": " cat", "rejected": " dog<|im_end|>"},
    {"prompt": "你好", "chosen": "！你好吗？", "rejected": " hello"},
]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
     "chosen": [{"role": "assistant", "content": "4"}],
     "rejected": [{"role": "assistant", "content": "It is four, I think."}]},
    {"prompt": [{"role": "user", "content": "Hi"}],
     "chosen": [{"role": "assistant", "content": "Hello!"}],
     "rejected": [{"role": "assistant", "content": "Go away."}]},
]
IMPLICIT_CHAT = [
    {"chosen": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue"}],
     "rejected": [{"role": "user", "content": "Sky colour?"},
                  {"role": "assistant", "content": "Green"}]},
]
IMPLICIT_TEXT = [
    {"chosen": "The sky is blue.", "rejected": "The sky is green."},
    {"chosen": "Q: 1+1? A: 2", "rejected": "Q: 1+1? A: 3"},
]


@pytest.fixture(scope="module")
def models(tmp_path_factory, qwen2_tokenizer_dir):
    """A policy and a different reference (tiny, random) with the real Qwen2 tokenizer."""
    root = tmp_path_factory.mktemp("dpo")
    out = {}
    for name, seed in (("policy", 0), ("ref", 1)):
        folder = root / name
        out[name] = make_hf_model(folder, seed=seed, **SMALL)
        out[name + "_dir"] = folder
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(qwen2_tokenizer_dir / f, folder / f)
    out["root"] = root
    return out


@pytest.fixture(scope="module")
def trl_trainer(models):
    """TRL's DPOTrainer on the same models (max_length 24, so some pairs truncate)."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(models["root"] / "trl"), report_to=[], use_cpu=True,
                     per_device_train_batch_size=4, max_length=24, beta=0.1,
                     bf16=False)  # float32 throughout, as ours on CPU
    return DPOTrainer(model=models["policy"], ref_model=models["ref"], args=args,
                      train_dataset=Dataset.from_list(STANDARD),
                      processing_class=AutoTokenizer.from_pretrained(models["policy_dir"]))


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL, IMPLICIT_CHAT, IMPLICIT_TEXT],
                         ids=["standard", "conversational", "implicit-chat", "implicit-text"])
def test_tokens_and_completion_masks_equal_trl(tmp_path, models, trl_trainer, rows):
    from datasets import Dataset

    trainer = trl_trainer
    prepared = trainer._prepare_dataset(Dataset.from_list(rows), trainer.processing_class,
                                        trainer.args, "test")
    theirs = trainer.data_collator([prepared[i] for i in range(len(rows))])
    pairs, stats = load_pairs(write_jsonl(tmp_path / "d.jsonl", rows),
                              Tokenizer(str(models["policy_dir"])), max_len=24)
    for pair, example in zip(pairs, prepared, strict=True):
        assert pair.prompt == example["prompt_ids"][:len(pair.prompt)]
    ours = pair_batch(pairs, np.arange(len(rows)), 1, 24)
    ids, mask = theirs["input_ids"].numpy(), theirs["completion_mask"].numpy()
    n = ids.shape[1]
    assert stats.truncated == sum(
        len(e["prompt_ids"]) + max(len(e["chosen_ids"]), len(e["rejected_ids"])) > 24
        for e in prepared)
    np.testing.assert_array_equal(ours["tokens"][0, :, :n] * ours["segment_ids"][0, :, :n],
                                  ids * theirs["attention_mask"].numpy())
    np.testing.assert_array_equal(ours["weights"][0, :, :n - 1], mask[:, 1:])
    assert not ours["segment_ids"][0, :, n:].any()
    np.testing.assert_array_equal(ours["completion_lengths"][0], mask.sum(1))


def torch_logps(model, batch):
    """Summed completion log-probs [2B] of TRL's collated batch, by plain autograd."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    token = logp.gather(2, batch["input_ids"][:, 1:, None])[..., 0]
    return (token * batch["completion_mask"][:, 1:]).sum(1)


def our_gradients(models, config, params, ref_params, pairs, objective):
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, np.arange(len(pairs)), 1, 24).items()}
    batch["ref_logps"] = (jnp.zeros((1, len(pairs), 2)) if ref_params is None else
                          sequence_logps(config, jnp.float32, None, (), ref_params, batch))
    return jax.jit(batch_gradients, static_argnums=0)(objective, params, batch)


# (our objective's options, TRL's loss_type / loss_weights / beta / label_smoothing)
TRL_CASES = {
    "sigmoid": (dict(loss="sigmoid", beta=0.1), (["sigmoid"], [1.0], 0.1, 0.0)),
    "robust": (dict(loss="robust", beta=0.3, label_smoothing=0.2), (["robust"], [1.0], 0.3, 0.2)),
    "hinge": (dict(loss="hinge", beta=0.02), (["hinge"], [1.0], 0.02, 0.0)),
    "ipo": (dict(loss="ipo", beta=0.5), (["ipo"], [1.0], 0.5, 0.0)),
    "rpo": (dict(loss="sigmoid", beta=0.1, rpo_alpha=0.5), (["sigmoid", "sft"], [1.0, 0.5], 0.1,
                                                           0.0)),
}


@pytest.mark.parametrize("case", list(TRL_CASES))
def test_loss_metrics_and_gradients_equal_trl(tmp_path, models, trl_trainer, case):
    ours_kwargs, (loss_types, weights, beta, smoothing) = TRL_CASES[case]
    trainer, model = trl_trainer, models["policy"]
    trainer.loss_types, trainer.loss_weights = loss_types, weights
    trainer.beta, trainer.label_smoothing = beta, smoothing
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(STANDARD))])
    model.zero_grad(set_to_none=True)
    model.train()
    loss = trainer._compute_loss(model, batch, False)
    loss.backward()
    model.eval()
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}

    config, params = qwen2_jax.load(models["policy_dir"])
    _, ref_params = qwen2_jax.load(models["ref_dir"])
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", STANDARD),
                          Tokenizer(str(models["policy_dir"])), max_len=24)
    metrics, grads = our_gradients(models, config, params, ref_params, pairs,
                                   DPOObjective(config, **ours_kwargs))
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5, atol=1e-6)
    for name in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                 "logps/chosen", "logps/rejected"):
        np.testing.assert_allclose(float(metrics[name]), logged[name], rtol=1e-5, atol=1e-5,
                                   err_msg=name)
    assert_grads_equal_torch(config, grads, model, atol=2e-4)


@pytest.mark.parametrize("case", ["sigmoid", "cdpo", "reference-free"])
def test_conservative_and_reference_free_equal_an_independent_torch_dpo(tmp_path, models,
                                                                         trl_trainer, case):
    """trl 1.x has neither (conservative DPO is trl 0.x's sigmoid with label smoothing):
    checked against TRL's formulas in plain PyTorch, itself checked against TRL at e = 0."""
    beta, e = 0.1, (0.25 if case == "cdpo" else 0.0)
    trainer, model = trl_trainer, models["policy"]
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(STANDARD))])
    model.zero_grad(set_to_none=True)
    policy = torch_logps(model, batch)
    with torch.no_grad():
        ref = torch.zeros_like(policy) if case == "reference-free" else torch_logps(
            models["ref"], batch)
    chosen, rejected = (policy - ref).chunk(2)
    delta = beta * (chosen - rejected)
    loss = (-(1 - e) * F.logsigmoid(delta) - e * F.logsigmoid(-delta)).mean()
    loss.backward()
    if case == "sigmoid":  # the plain PyTorch DPO is TRL's
        trainer.loss_types, trainer.loss_weights, trainer.beta = ["sigmoid"], [1.0], beta
        with torch.no_grad():
            np.testing.assert_allclose(trainer._compute_loss(model, batch, False).item(),
                                       loss.item(), rtol=1e-6)

    config, params = qwen2_jax.load(models["policy_dir"])
    ref_params = None if case == "reference-free" else qwen2_jax.load(models["ref_dir"])[1]
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", STANDARD),
                          Tokenizer(str(models["policy_dir"])), max_len=24)
    metrics, grads = our_gradients(models, config, params, ref_params, pairs,
                                   DPOObjective(config, beta=beta, label_smoothing=e))
    np.testing.assert_allclose(float(metrics["loss"]), loss.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["rewards/chosen"]),
                               beta * chosen.mean().item(), rtol=1e-5)
    assert_grads_equal_torch(config, grads, model, atol=2e-4)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards(tmp_path, models):
    config, params = qwen2_jax.load(models["policy_dir"])
    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", STANDARD),
                          Tokenizer(str(models["policy_dir"])), max_len=64)
    metrics, _ = our_gradients(models, config, params, params, pairs, DPOObjective(config))
    assert float(metrics["loss"]) == pytest.approx(math.log(2), rel=1e-6)
    # (not exactly 0: the reference's forward compiles apart from the differentiated one)
    assert abs(float(metrics["rewards/margins"])) < 1e-5


def test_malformed_lines_and_lengths_are_reported(tmp_path, models):
    tokenizer = Tokenizer(str(models["policy_dir"]))
    path = write_jsonl(tmp_path / "d.jsonl", [
        STANDARD[0],
        "{oops",
        {"prompt": "a", "chosen": "b"},
        {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
        {"prompt": [{"role": "user", "content": "a"}], "chosen": [{"role": "bot", "content": "b"}],
         "rejected": [{"role": "assistant", "content": "c"}]},
        {"chosen": "same", "rejected": "same"},
        {"prompt": "word " * 40, "chosen": " yes", "rejected": " no"},
        {"prompt": "short", "chosen": " word" * 80, "rejected": " no"},
    ])
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_pairs(path, tokenizer, 64)
    pairs, stats = load_pairs(path, tokenizer, 64, skip_bad_lines=True)
    lines = (tmp_path / "d.jsonl").read_text().splitlines()
    assert stats.skipped_bad_lines == 5 and stats.pairs == 3 and stats.truncated == 1
    for bad, message in [(2, "expected 'chosen' and 'rejected'"),
                         (3, "prompt, chosen, rejected must all be strings or all be message lists"),
                         (4, r"'chosen'\[0\] must be \{'role'"),
                         (5, "chosen and rejected are identical")]:
        single = write_jsonl(tmp_path / f"bad{bad}.jsonl", [lines[bad]])
        with pytest.raises(DataError, match=rf"bad{bad}\.jsonl:1: {message}"):
            load_pairs(single, tokenizer, 64)
    cut, stats = load_pairs(path, tokenizer, 64, max_prompt_len=8, skip_bad_lines=True)
    assert stats.prompt_truncated == 1 and cut[1].prompt == pairs[1].prompt[-8:]  # the end
    _, stats = load_pairs(path, tokenizer, 24, skip_bad_lines=True)
    assert stats.dropped_prompt_too_long == 1
    _, stats = load_pairs(path, tokenizer, 64, overflow="drop", skip_bad_lines=True)
    assert stats.dropped_too_long == 1 and stats.pairs == 2


# ----- the trainer ---------------------------------------------------------------------------

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


def records(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_precomputed_reference_gives_the_losses_of_the_frozen_copy(tmp_path, models, capsys):
    from qwen2_jax.train.dpo import DPOArgs, run

    data = write_jsonl(tmp_path / "d.jsonl", STANDARD + CONVERSATIONAL + IMPLICIT_TEXT)
    common = dict(model=str(models["policy_dir"]), data=data, steps=3, batch_size=2,
                  grad_accum=2, max_len=32, lr=1e-3, progress=False)
    frozen = run(DPOArgs(out=str(tmp_path / "frozen"), ref_model=str(models["ref_dir"]),
                         **common))
    run(DPOArgs(out=str(tmp_path / "pre"), ref_model=str(models["ref_dir"]),
                precompute_ref=True, **common))
    assert frozen["reference"].startswith("frozen copy of")
    a, b = records(tmp_path / "frozen"), records(tmp_path / "pre")
    assert [r["step"] for r in a] == [1, 2, 3]
    for name in METRICS:
        np.testing.assert_allclose([r[name] for r in b], [r[name] for r in a], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    assert a[0]["loss"] != a[2]["loss"]

    # the default reference is the starting policy: DPO starts at ln 2; the bar shows the
    # precompute pass and TRL's metrics
    capsys.readouterr()
    run(DPOArgs(out=str(tmp_path / "self"), precompute_ref=True,
                **{**common, "steps": 1, "progress": True}))
    assert records(tmp_path / "self")[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
    bar = capsys.readouterr().err
    assert "reference log-probs" in bar
    assert all(f"{label}=" in bar for label in ("loss", "acc", "margin", "r_c", "r_r", "lp_c",
                                                "lp_r"))


def dpo_command(model, data, out, *extra):
    return [str(SCRIPT), "dpo", "--model", str(model), "--data", str(data), "--out", str(out),
            "--steps", "4", "--save-every", "2", "--batch-size", "2", "--max-len", "32",
            "--lr", "1e-3", "--no-progress", *extra]


def test_cli_logs_trl_metrics_resumes_exactly_and_rejects_bad_options(tmp_path, models):
    data = write_jsonl(tmp_path / "d.jsonl", STANDARD + CONVERSATIONAL)
    out = tmp_path / "out"
    done = subprocess.run(dpo_command(models["policy_dir"], data, out, "--loss", "robust",
                                      "--label-smoothing", "0.1", "--rpo-alpha", "0.2",
                                      "--eval-data", data),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["data"]["pairs"] == 6 and summary["steps"] == 4
    expected = records(out)
    assert set(METRICS) | {"step", "nll_loss", "lr", "grad_norm", "tokens_per_s"} <= \
        set(expected[0])
    assert [r["step"] for r in expected if "eval_rewards/accuracies" in r] == [2, 4]
    assert expected[3]["eval_loss"] < expected[1]["eval_loss"]
    _, final = qwen2_jax.load(out / "final")
    _, start = qwen2_jax.load(models["policy_dir"])
    assert min(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()),
                                            final, start))) > 0

    # as if killed after step 3: step 4's checkpoint is gone, its metrics line dropped
    shutil.rmtree(out / "checkpoints" / "4")
    resumed = subprocess.run(dpo_command(models["policy_dir"], data, out, "--loss", "robust",
                                         "--label-smoothing", "0.1", "--rpo-alpha", "0.2",
                                         "--eval-data", data, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step 2" in resumed.stderr
    got = records(out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for name in (*METRICS, "nll_loss", "eval_loss"):
        np.testing.assert_allclose([r.get(name, 0) for r in got],
                                   [r.get(name, 0) for r in expected], rtol=1e-6, err_msg=name)

    for extra, message in [(["--reference-free", "--ref-model", "x"], "--reference-free uses no"),
                           (["--loss", "hinge", "--label-smoothing", "0.1"],
                            "--label-smoothing applies to the sigmoid and robust losses"),
                           (["--label-smoothing", "0.5"], r"must be in \[0, 0.5\)")]:
        bad = subprocess.run(dpo_command(models["policy_dir"], data, tmp_path / "bad", *extra),
                             capture_output=True, text=True, timeout=300)
        assert bad.returncode == 2 and re.search(message, bad.stderr), bad.stderr
        assert not (tmp_path / "bad").exists()


def test_dpo_learns_a_preferred_style_on_held_out_prompts(tmp_path):
    """Chosen answers start with "good", rejected with "bad": after DPO the reward accuracy is
    above 0.9 and greedy generation answers held-out prompts in the chosen style."""
    from qwen2_jax.train.dpo import DPOArgs, run

    make_word_chat_model(tmp_path, ["user", "assistant", "echo", "good", "bad",
                                    *map(str, range(10))])
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    train, held_out = pairs[:80], pairs[80:]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"echo {a} {b}"}],
        "chosen": [{"role": "assistant", "content": f"good {a} {b}"}],
        "rejected": [{"role": "assistant", "content": f"bad {b} {a}"}]}) + "\n"
        for a, b in train))

    chat = Tokenizer(str(tmp_path))
    prompts = [chat.encode(chat.apply_chat_template([{"role": "user", "content": f"echo {a} {b}"}]))
               for a, b in held_out]

    def first_words(folder):
        config, params = qwen2_jax.load(folder)
        answers = qwen2_jax.generate(config, params, prompts, max_new_tokens=1)
        return [chat.decode(x) for x in answers]

    assert set(first_words(tmp_path)) != {"good"}  # not already the chosen style
    run(DPOArgs(model=str(tmp_path), data=str(tmp_path / "train.jsonl"),
                out=str(tmp_path / "out"), max_len=32, batch_size=8, lr=2e-3, warmup=5,
                steps=60, save_every=1000, progress=False))
    log = records(tmp_path / "out")
    assert log[-1]["rewards/accuracies"] > 0.9 and log[-1]["rewards/margins"] > 1.0
    assert log[-1]["loss"] < 0.3 * log[0]["loss"]
    assert first_words(tmp_path / "out" / "final") == ["good"] * len(held_out)


def test_dpo_step_on_a_mesh_equals_one_device(tmp_path, models):
    """Reference log-probs and the DPO step under data=2,fsdp=2,tensor=2 (8 CPU devices)."""
    from qwen2_jax.sharding import DEFAULT_RULES, make_mesh
    from qwen2_jax.train.step import TrainConfig, optimizer, train_step

    pairs, _ = load_pairs(write_jsonl(tmp_path / "d.jsonl", STANDARD),
                          Tokenizer(str(models["policy_dir"])), max_len=24)
    batch = {k: jnp.asarray(v) for k, v in pair_batch(pairs, np.arange(4), 2, 24).items()}
    train = TrainConfig(learning_rate=1e-3, total_steps=10, grad_accum=2)
    results = []
    for mesh, rules in ((None, ()), (make_mesh("data=2,fsdp=2,tensor=2"), DEFAULT_RULES)):
        config, params = qwen2_jax.load(models["policy_dir"], mesh=mesh)
        _, ref = qwen2_jax.load(models["ref_dir"], mesh=mesh)
        step_batch = {**batch, "ref_logps": sequence_logps(config, jnp.float32, mesh, rules, ref,
                                                           batch)}
        objective = DPOObjective(config, mesh=mesh, rules=rules, rpo_alpha=0.3)
        shardings = jax.tree.map(lambda x: x.sharding, params)
        new, _, metrics = train_step(objective, train, params, optimizer(train).init(params),
                                     step_batch, 0)
        results.append((np.asarray(step_batch["ref_logps"]), metrics, new))
    (ref1, m1, p1), (ref8, m8, p8) = results
    np.testing.assert_allclose(ref8, ref1, rtol=1e-5)
    for name in ("loss", *METRICS[1:], "nll_loss"):
        np.testing.assert_allclose(float(m8[name]), float(m1[name]), rtol=1e-5, atol=1e-6)
    for x, y, s in zip(jax.tree.leaves(p8), jax.tree.leaves(p1), jax.tree.leaves(shardings),
                       strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-4)
