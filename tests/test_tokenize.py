"""`qwen2-jax tokenize` and training from its folder: the same examples, counts, errors and
losses as reading the JSONL file; a folder that does not fit the run is refused."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_bad_input import run_cli

from conftest import make_hf_model
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import DataError, load_examples
from qwen2_jax.train.preference import load_pairs

SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)
LONG = "a very long answer that goes on " * 8


def chat(*turns: str) -> dict:
    roles = ("user", "assistant")
    return {"messages": [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]}


SFT = [chat("2+2?", "4", "and 3+3?", "6"), {"prompt": "Hi", "completion": "Hello!"},
       {"prompt": "Tell me", "completion": LONG},  # past --max-len 48: truncated or dropped
       {"prompt": LONG * 2, "completion": "ok"},  # its answer is cut off: no targets
       '{"prompt": 3}', *({"prompt": f"{a}*2=", "completion": str(2 * a)} for a in range(9))]
DPO = [{"prompt": "2+2?", "chosen": " 4", "rejected": " 5"},
       {"prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "Go away."}]},
       {"prompt": LONG, "chosen": " yes", "rejected": " no"},  # a prompt past --max-prompt-len
       {"prompt": "Say", "chosen": LONG, "rejected": " no"},  # past --max-len
       "not json", *({"chosen": f"{a}+{a}={2 * a}", "rejected": f"{a}+{a}={a}"} for a in range(1, 8))]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir) -> Path:
    """A tiny model with the Qwen2 tokenizer, and sft.jsonl and dpo.jsonl beside it."""
    folder = tmp_path_factory.mktemp("model")
    make_hf_model(folder, **SMALL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen2_tokenizer_dir / name, folder / name)
    write_jsonl(folder / "sft.jsonl", SFT)
    write_jsonl(folder / "dpo.jsonl", DPO)
    return folder


def tokenize(capsys, model, data, out, *flags) -> dict:
    status, printed, err = run_cli(capsys, "tokenize", "--model", model, "--data", data, "--out",
                                   out, "--no-progress", *flags)
    assert status == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(printed) == manifest
    return manifest


def arrays(folder: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p, mmap_mode="r") for p in folder.glob("*.npy")}


@pytest.mark.parametrize("flags", [(), ("--drop-long", "--train-on-prompt", "--workers", "2")],
                         ids=["truncate", "drop-long-train-on-prompt-2-workers"])
def test_sft_folder_holds_the_readers_examples_and_counts(tmp_path, capsys, model, flags):
    manifest = tokenize(capsys, model, model / "sft.jsonl", tmp_path / "t", "--max-len", "48",
                        "--skip-bad-lines", *flags)  # the format is told by the first line
    examples, stats = load_examples(str(model / "sft.jsonl"), Tokenizer(str(model)), 48,
                                    "drop" if flags else "truncate", bool(flags), True,
                                    SMALL["vocab_size"])
    assert manifest["format"] == "sft" and manifest["stats"] == dataclasses.asdict(stats)
    assert stats.skipped_bad_lines == 1
    assert (stats.dropped_too_long, stats.truncated, stats.dropped_no_targets) == (
        (2, 0, 0) if flags else (0, 2, 1))
    assert manifest["settings"] == {"max_len": 48, "overflow": "drop" if flags else "truncate",
                                    "train_on_prompt": bool(flags), "skip_bad_lines": True}
    got = arrays(tmp_path / "t")
    assert got["tokens"].dtype == np.int32 and got["offsets"].dtype == np.int64
    assert got["offsets"].shape == (len(examples) + 1,)
    o = got["offsets"]
    for i, e in enumerate(examples):
        assert got["tokens"][o[i]:o[i + 1]].tolist() == e.tokens
        assert got["targets"][o[i]:o[i + 1]].tolist() == e.targets


def test_dpo_folder_holds_the_readers_pairs_and_counts(tmp_path, capsys, model):
    from qwen2_jax.train.token_store import open_pairs

    manifest = tokenize(capsys, model, model / "dpo.jsonl", tmp_path / "t", "--max-len", "24",
                        "--max-prompt-len", "12", "--skip-bad-lines")
    pairs, stats = load_pairs(str(model / "dpo.jsonl"), Tokenizer(str(model)), 24, 12,
                              skip_bad_lines=True, vocab_size=SMALL["vocab_size"])
    assert manifest["format"] == "dpo" and manifest["stats"] == dataclasses.asdict(stats)
    assert stats.skipped_bad_lines == stats.truncated == 1 and stats.prompt_truncated >= 1
    settings = {"max_len": 24, "max_prompt_len": 12, "overflow": "truncate",
                "skip_bad_lines": True}
    stored, _ = open_pairs(str(tmp_path / "t"), settings, SMALL["vocab_size"], str(model))
    assert [stored[i] for i in range(len(stored))] == pairs


@pytest.mark.parametrize("data, workers", [("sft.jsonl", "1"), ("dpo.jsonl", "2")])
def test_a_bad_line_stops_as_the_reader_does_and_leaves_nothing(tmp_path, capsys, model, data,
                                                                workers):
    path = tmp_path / "bad.jsonl"
    path.write_bytes((model / data).read_bytes())
    with pytest.raises(DataError) as expected:
        read = load_examples if data == "sft.jsonl" else load_pairs
        read(str(path), Tokenizer(str(model)), 48)
    status, _, err = run_cli(capsys, "tokenize", "--model", model, "--data", path, "--out",
                             tmp_path / "t", "--no-progress", "--workers", workers)
    assert status == 2
    assert err == f"qwen2-jax tokenize: {expected.value}\n"
    assert "bad.jsonl:5: " in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl"]  # no folder, no partial


def losses(out: Path) -> list[dict]:
    """metrics.jsonl without the timings."""
    return [{k: v for k, v in json.loads(x).items() if k != "tokens_per_s"}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("command, extra", [
    ("sft", ("--max-len", "32", "--eval-data", "{data}", "--save-every", "3")),
    # rows of 16 tokens only, and no reference: each a compile fewer
    ("dpo", ("--max-len", "16", "--reference-free"))])
def test_training_on_the_folder_logs_the_losses_of_the_jsonl_file(tmp_path, capsys, model,
                                                                   command, extra):
    data = model / f"{command}.jsonl"
    flags = ["--skip-bad-lines", *extra[:2]]
    tokenize(capsys, model, data, tmp_path / "t", *flags)
    metrics = {}
    for name, source in (("file", data), ("folder", tmp_path / "t")):
        status, out, err = run_cli(
            capsys, command, "--model", model, "--data", source, "--out", tmp_path / name,
            "--steps", "3", "--batch-size", "2", "--grad-accum", "2", "--lr", "1e-3",
            "--no-progress", *flags, *(x.format(data=source) for x in extra[2:]))
        assert status == 0, err
        metrics[name] = (losses(tmp_path / name), json.loads(out)["data"])
    assert metrics["folder"] == metrics["file"]  # the same rows in the same order, bit for bit
    assert metrics["file"][1]["truncated"] >= 1
    assert command == "dpo" or "eval_loss" in metrics["file"][0][-1]


def test_a_folder_that_does_not_fit_the_run_is_refused(tmp_path, capsys, model):
    tokenize(capsys, model, model / "sft.jsonl", tmp_path / "t", "--max-len", "48",
             "--skip-bad-lines")

    def train(command, *flags):
        status, _, err = run_cli(capsys, command, "--model", model, "--data", tmp_path / "t",
                                 "--out", tmp_path / "o", "--steps", "1", "--no-progress",
                                 "--skip-bad-lines", *flags)
        assert status == 2 and not (tmp_path / "o").exists()
        return err

    assert f"--data {tmp_path / 't'} holds sft data; dpo needs dpo data (tokenize --format " \
        "dpo)" in train("dpo", "--max-len", "48")
    assert (f"--data {tmp_path / 't'} was tokenized with --max-len 48 and this run has "
            "--max-len 64; its examples would differ from the JSONL file's") in train("sft", "--max-len", "64")
    assert "tokenized with no --train-on-prompt and this run has --train-on-prompt" in train(
        "sft", "--max-len", "48", "--train-on-prompt")
    manifest = json.loads((tmp_path / "t" / "manifest.json").read_text())
    (tmp_path / "t" / "manifest.json").write_text(json.dumps({**manifest, "vocab_size": 1000}))
    assert (f"--data {tmp_path / 't'} was tokenized for a model with vocab_size 1000; --model "
            f"{model} has {SMALL['vocab_size']}: tokenize again with --model {model}"
            ) in train("sft", "--max-len", "48")
