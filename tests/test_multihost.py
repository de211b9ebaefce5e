"""A real multi-host job on one machine: 2 processes x 4 CPU devices, gloo collectives."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax.checkpoint.to_orbax import write_orbax as convert
from qwen2_jax.sharding import make_mesh

WORKER = Path(__file__).with_name("multihost_worker.py")
DIMS = dict(vocab_size=1024, hidden_size=128, intermediate_size=384, num_attention_heads=8,
            num_key_value_heads=4, num_hidden_layers=2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_processes(command, processes: int = 2, devices_each: int = 4) -> list[tuple[str, str]]:
    """Starts command(port, i) for each process i with `devices_each` CPU devices; returns
    each process's (stdout, stderr) once all exited 0."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_each}"}
    port = free_port()
    procs = [subprocess.Popen([str(a) for a in command(port, i)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for i in range(processes)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for i, (p, (_, stderr)) in enumerate(zip(procs, outs, strict=True)):
        assert p.returncode == 0, f"process {i} failed:\n{stderr[-4000:]}"
    return outs


@pytest.mark.parametrize("orbax", [False, True])
def test_two_processes_load_half_each_and_match_one_process(tmp_path, orbax):
    """Each process reads from disk about its half: HF slices, or Orbax chunks (converted
    with the job's mesh as layout, so chunks are the shards)."""
    folder = tmp_path / "model"
    make_hf_model(folder, seed=5, **DIMS)
    if orbax:
        convert(str(folder), str(tmp_path / "orbax"), mesh=make_mesh("fsdp=4,tensor=2"),
                progress=False)
        folder = tmp_path / "orbax"
    rng = np.random.default_rng(1)
    ids = rng.integers(0, DIMS["vocab_size"], (4, 10))
    mask = np.ones_like(ids)
    mask[1, :3] = 0
    mask[3, :6] = 0
    np.save(tmp_path / "ids.npy", ids)
    np.save(tmp_path / "mask.npy", mask)

    run_processes(lambda port, i: [sys.executable, WORKER, port, i, 2, folder, "fsdp=4,tensor=2",
                                   tmp_path])
    stats = [json.loads((tmp_path / f"stats{i}.json").read_text()) for i in range(2)]

    config, params = qwen2_jax.load(folder)
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    for i, s in enumerate(stats):
        assert (s["local_devices"], s["global_devices"]) == (4, 8)
        np.testing.assert_allclose(np.load(tmp_path / f"logits{i}.npy"), expected, rtol=0,
                                   atol=1e-5 * max(1.0, float(np.abs(expected).max())))
        # Each process reads its half of the split tensors plus the small replicated ones.
        assert 0.45 * total < s["bytes_read"] < 0.55 * total, (s["bytes_read"], total)
        assert s["bytes_on_devices"] < 0.6 * total  # 4 devices, each with ~1/8 of the model


def test_cli_demo_as_two_processes():
    """The README's several-local-processes command: each process prints a passing report."""
    script = Path(sys.executable).parent / "qwen2-jax"
    outs = run_processes(lambda port, i: [script, "demo", "--tiny", "--mesh", "fsdp=-1,tensor=2",
                                          "--coordinator", f"127.0.0.1:{port}",
                                          "--num-processes", 2, "--process-id", i])
    for stdout, stderr in outs:
        report = json.loads(stdout.strip().splitlines()[-1])
        assert report["ok"] and report["mesh"] == {"data": 1, "fsdp": 4, "sequence": 1,
                                                    "expert": 1, "tensor": 2}
        assert "of 2: 4 local devices, 8 in all" in stderr
