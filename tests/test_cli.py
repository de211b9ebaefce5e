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
