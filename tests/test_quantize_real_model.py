"""Quantization quality on the real model (the embedded Qwen2.5-Coder-0.5B-Instruct): perplexity
through `qwen2-jax eval` on a fixed 2,646-token text, and greedy chat agreement with float32.

Marked `real_model` (see test_real_model.py): under CI a missing model extra fails.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import real_model_folder

pytestmark = pytest.mark.real_model

TEXT = Path(__file__).parent / "data" / "textwrap_excerpt.py.txt"
PROMPTS = [
    "Write a Python function that checks whether a string is a palindrome, ignoring case.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts the orders per customer in a table `orders`.",
    "Write a bash one-liner that prints the ten largest files under the current folder.",
]


@pytest.fixture(scope="module")
def folder() -> str:
    return real_model_folder()


def perplexity(capsys, folder: str, *flags: str) -> dict:
    from qwen2_jax import cli

    assert cli.main(["eval", "--model", folder, "--data", str(TEXT), "--max-len", "512",
                     "--stride", "512", "--batch-size", "1", "--no-progress", *flags]) == 0
    return json.loads(capsys.readouterr().out.splitlines()[-1])  # eval's one JSON line


def test_eval_perplexity_increase_per_quantization(capsys, folder):
    """int8 weights <= 1%, int4 <= 10%, the int8 KV cache <= 0.5% above float32."""
    base = perplexity(capsys, folder)
    assert base["tokens"] >= 2000
    assert 1 < base["perplexity"] < 20  # real code, a real model
    figures = {"float32": base["perplexity"]}
    for name, flags, limit in (("int8", ("--quantize", "int8"), 0.01),
                               ("int4", ("--quantize", "int4"), 0.10),
                               ("int8_kv", ("--kv-cache-dtype", "int8"), 0.005)):
        report = perplexity(capsys, folder, *flags)
        assert report["tokens"] == base["tokens"]
        figures[name] = report["perplexity"]
        increase = report["perplexity"] / base["perplexity"] - 1
        print(json.dumps({"quantization": name, "perplexity": report["perplexity"],
                          "float32": base["perplexity"], "increase": increase}))
        assert increase <= limit, (name, increase)
    # Quantizing really happened: each figure differs from float32's.
    assert len(set(figures.values())) == len(figures), figures


def test_int8_greedy_chat_agrees_with_float32(folder):
    """At least 90% of the first 32 greedy tokens agree, position by position, over the
    prompts (one batch each)."""
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer(folder)
    prompts = [tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": text}])) for text in PROMPTS]
    outputs = {}
    for quantize in (None, "int8"):
        config, params = qwen2_jax.load(folder, dtype="float32", quantize=quantize)
        outputs[quantize] = qwen2_jax.generate(config, params, prompts, max_new_tokens=32,
                                               vocab_size=len(tokenizer))
        del params
    agree = total = 0
    for ours, reference in zip(outputs["int8"], outputs[None], strict=True):
        assert len(reference) == 32  # no stop tokens given: 32 each
        agree += int(np.sum(np.array(ours[:32]) == np.array(reference)))
        total += 32
        print(json.dumps({"float32": tokenizer.decode(reference), "int8": tokenizer.decode(ours)}))
    print(json.dumps({"agreement": agree / total}))
    assert agree / total >= 0.9
