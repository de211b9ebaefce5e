"""The `qwen2-jax` console script, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "qwen2-jax"


def run(*args):
    return subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


def test_help_lists_commands():
    out = run("--help")
    assert out.returncode == 0 and "demo" in out.stdout
    assert run("demo", "--help").returncode == 0


def test_demo_prints_one_json_line_within_tolerance(tmp_path):
    out = run("demo", "--out", str(tmp_path / "tiny"))
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["max_abs_logit_diff"] <= 1e-4
    assert (tmp_path / "tiny" / "model.safetensors").exists()


def test_unknown_command_fails():
    out = run("frobnicate")
    assert out.returncode == 2 and "invalid choice" in out.stderr


def test_demo_on_a_mesh_logs_what_it_replicates():
    out = run("demo", "--mesh", "data=2,fsdp=-1,tensor=2")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["ok"] and report["mesh"] == {"data": 2, "fsdp": 2, "expert": 1, "tensor": 2}
    assert "vocab of size 151 does not divide over tensor (2 devices); replicating it" in out.stderr


def test_bad_mesh_and_rules_are_clear_errors():
    out = run("demo", "--mesh", "tensor=3")
    assert out.returncode != 0 and "uses 3 devices but 8 are available" in out.stderr
    out = run("demo", "--mesh", "tensor=8", "--rules", "heads=model")
    assert out.returncode != 0 and "'heads' maps to unknown mesh axes ['model']" in out.stderr
    out = run("demo", "--coordinator", "127.0.0.1:1")
    assert out.returncode != 0 and "go together" in out.stderr
