"""The SFT command end to end: metrics, checkpoints, exact resume after kill -9, final model."""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import qwen2_jax
from conftest import make_hf_model, make_word_chat_model

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random model with Qwen2's vocabulary and tokenizer, and an arithmetic dataset."""
    folder = tmp_path_factory.mktemp("sft_model")
    make_hf_model(folder, **SMALL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen2_tokenizer_dir / name, folder / name)
    rng = random.Random(0)
    lines = []
    for _ in range(24):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(json.dumps({"prompt": f"{a}+{b}=", "completion": str(a + b)}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sft_command(model, out, *extra):
    return [str(SCRIPT), "sft", "--model", str(model), "--data", str(model / "train.jsonl"),
            "--out", str(out), "--steps", "8", "--save-every", "2", "--batch-size", "2",
            "--max-len", "64", "--lr", "1e-3", "--warmup", "2", "--no-progress", *extra]


def losses(out) -> dict[int, float]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines)}


def test_resume_after_kill_logs_the_same_losses(tmp_path, chat_model):
    whole = subprocess.run(sft_command(chat_model, tmp_path / "a", "--eval-data",
                                       str(chat_model / "train.jsonl")),
                           capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(1, 9))
    records = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert {"step", "loss", "lr", "tokens_per_s", "grad_norm"} <= set(records[0])
    assert records[0]["lr"] == 0.0 and records[1]["lr"] == pytest.approx(5e-4)  # warmup
    evaluated = [r["step"] for r in records if "eval_loss" in r]
    assert evaluated == [2, 4, 6, 8]  # at every save
    assert records[7]["eval_loss"] < records[1]["eval_loss"]

    killed = subprocess.Popen(sft_command(chat_model, tmp_path / "b"), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)  # between saves: steps 4 saved, 5 logged, 6 not
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    assert len(metrics.read_text().splitlines()) < 8, "the run finished before the kill"

    resumed = subprocess.run(sft_command(chat_model, tmp_path / "b", "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from step" in resumed.stderr
    again = subprocess.run(sft_command(chat_model, tmp_path / "b"), capture_output=True,
                           text=True, timeout=600)
    assert again.returncode == 2 and "already holds a training run (checkpoints" in again.stderr
    got = losses(tmp_path / "b")
    assert sorted(got) == list(range(1, 9))
    np.testing.assert_allclose([got[s] for s in range(1, 9)],
                               [expected[s] for s in range(1, 9)], rtol=1e-6)

    # The final model is a checkpoint folder the other commands accept.
    config, trained = qwen2_jax.load(tmp_path / "a" / "final")
    _, start = qwen2_jax.load(chat_model)
    assert config.model_type == "qwen2"
    moved = jax.tree.map(lambda x, y: float(np.abs(np.asarray(x) - np.asarray(y)).max()),
                         trained, start)
    assert min(jax.tree.leaves(moved)) > 0
    exported = subprocess.run([str(SCRIPT), "export", str(tmp_path / "a" / "final"),
                               str(tmp_path / "hf"), "--no-progress"], capture_output=True,
                              text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "hf" / "tokenizer.json").exists()


def test_bad_data_line_stops_with_file_and_line(tmp_path, chat_model):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": 3}\n')
    out = subprocess.run([str(SCRIPT), "sft", "--model", str(chat_model), "--data", str(data),
                          "--out", str(tmp_path / "o"), "--steps", "1", "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "bad.jsonl:2: expected 'messages', or 'prompt' and 'completion'" in out.stderr


def test_a_tiny_model_learns_a_chat_task_and_answers_held_out_prompts(tmp_path):
    """Swap two digits ("echo 3 7" -> "7 3"): trained on 80 pairs, asked the 20 others."""
    from qwen2_jax.tokenizer import Tokenizer
    from qwen2_jax.train.sft import SFTArgs, run

    make_word_chat_model(tmp_path, ["system", "user", "assistant", "echo", *map(str, range(10))])
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    train, held_out = pairs[:80], pairs[80:]
    (tmp_path / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"echo {a} {b}", "completion": f"{b} {a}"}) + "\n"
        for a, b in train))

    run(SFTArgs(model=str(tmp_path), data=str(tmp_path / "train.jsonl"), out=str(tmp_path / "out"),
                max_len=64, batch_size=8, lr=3e-3, warmup=10, steps=150, save_every=1000,
                progress=False))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["loss"] < 0.05 * records[0]["loss"]

    chat = Tokenizer(str(tmp_path))
    config, params = qwen2_jax.load(tmp_path / "out" / "final")
    prompts = [chat.encode(chat.apply_chat_template([{"role": "user", "content": f"echo {a} {b}"}]))
               for a, b in held_out]
    answers = qwen2_jax.generate(config, params, prompts, max_new_tokens=4,
                                 stop_token_ids=[chat.token_id("<|im_end|>")])
    assert [chat.decode(x) for x in answers] == [f"{b} {a}" for a, b in held_out]
