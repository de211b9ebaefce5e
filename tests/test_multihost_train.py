"""SFT and DPO as a real 2-process job (2 x 4 CPU devices, gloo) on fsdp=4,tensor=2: the
losses of one process on one device, exact resume after one process is killed, one OUT/final."""

from __future__ import annotations

import json
import os
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
from test_multihost import free_port, run_processes

import qwen2_jax
from conftest import make_hf_model

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
SMALL = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
STEPS = 8
JOB_ENV = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random model with Qwen2's tokenizer, an SFT and a DPO dataset."""
    folder = tmp_path_factory.mktemp("pod_model")
    make_hf_model(folder, seed=3, **SMALL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(qwen2_tokenizer_dir / name, folder / name)
    rng = random.Random(0)
    sft, dpo = [], []
    for _ in range(40):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        sft.append({"prompt": f"{a}+{b}=", "completion": str(a + b)})
        dpo.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a * b)})
    for name, rows in (("sft.jsonl", sft), ("dpo.jsonl", dpo)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def command(kind: str, model: Path, out: Path, *extra) -> list[str]:
    """`sft` or `dpo`, 8 steps of 4 rows (or pairs) x 2 micro-batches, saving every 2."""
    return [str(SCRIPT), kind, "--model", str(model), "--data", str(model / f"{kind}.jsonl"),
            "--out", str(out), "--steps", str(STEPS), "--save-every", "2", "--batch-size", "4",
            "--grad-accum", "2", "--max-len", "32", "--lr", "1e-3", "--no-progress", *extra]


def job(kind: str, model: Path, out: Path, *extra):
    """command(...) as process i of a 2-process job on fsdp=4,tensor=2."""
    return lambda port, i: [*command(kind, model, out, *extra), "--mesh", "fsdp=4,tensor=2",
                            "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2",
                            "--process-id", str(i)]


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_mid_run(start, metrics: Path, after: int) -> None:
    """Starts the job, SIGKILLs process 1 once `after` steps are logged, then process 0 (left
    waiting in a collective for its peer)."""
    port = free_port()
    procs = [subprocess.Popen(start(port, i), env=JOB_ENV, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not (metrics.exists() and
                                              len(metrics.read_text().splitlines()) >= after):
            assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
            time.sleep(0.01)
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert len(metrics.read_text().splitlines()) < STEPS, "the run finished before the kill"


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_two_processes_train_as_one_and_resume_after_one_is_killed(tmp_path, model, kind):
    single = subprocess.run(command(kind, model, tmp_path / "single"), capture_output=True,
                            text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    expected = records(tmp_path / "single")

    outs = run_processes(job(kind, model, tmp_path / "pod"))
    got = records(tmp_path / "pod")
    assert [r["step"] for r in got] == list(range(1, STEPS + 1))  # logged once, by process 0
    for name in ("loss", "grad_norm", *(("rewards/margins",) if kind == "dpo" else ())):
        np.testing.assert_allclose([r[name] for r in got], [r[name] for r in expected],
                                   rtol=1e-5, atol=1e-6, err_msg=name)  # margins start at 0
    summaries = [json.loads(stdout.strip().splitlines()[-1]) for stdout, _ in outs]
    assert summaries[0] == summaries[1]
    assert sorted(os.listdir(tmp_path / "pod")) == ["checkpoints", "final", "metrics.jsonl",
                                                    "run.json"]
    _, trained = qwen2_jax.load(tmp_path / "pod" / "final")
    _, alone = qwen2_jax.load(tmp_path / "single" / "final")
    # Adam's normalized updates of near-zero gradients magnify float rounding: 8 steps of lr
    # 1e-3 move weights by up to 8e-3, and the two runs' differ by under 1e-4
    for a, b in zip(jax_leaves(trained), jax_leaves(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)

    killed = tmp_path / "killed"
    kill_mid_run(job(kind, model, killed), killed / "metrics.jsonl", after=5)
    run_processes(job(kind, model, killed, "--resume"))
    resumed = records(killed)
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    np.testing.assert_allclose([r["loss"] for r in resumed], [r["loss"] for r in got],
                               rtol=1e-6)
    assert sorted(os.listdir(killed)) == ["checkpoints", "final", "metrics.jsonl", "run.json"]


def jax_leaves(params) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(params)]
