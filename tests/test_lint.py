"""ruff runs with the suite, so style cannot drift from what CI checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", str(ROOT)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_the_core_imports_neither_the_converter_nor_the_trainer():
    """The library under qwen2_jax/ owns every checkpoint format; convert/ and train/ build on
    it, never the other way round. Only the command line (cli.py, commands/) runs them."""
    import ast

    offenders = []
    for path in sorted((ROOT / "qwen2_jax").rglob("*.py")):
        relative = path.relative_to(ROOT / "qwen2_jax")
        if relative.parts[0] == "commands" or relative.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            names += [f"{node.module}.{a.name}" for a in getattr(node, "names", [])
                      if isinstance(node, ast.ImportFrom) and node.module == "qwen2_jax"]
            offenders += [f"{relative}: {n}" for n in names
                          if n.startswith(("qwen2_jax.convert", "qwen2_jax.train"))]
    assert offenders == []
    assert (ROOT / "qwen2_jax" / "commands").is_dir()  # the exemption names a real folder
