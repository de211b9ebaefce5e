"""The real-model tier: the embedded Qwen2.5-Coder-0.5B-Instruct (the `model` extra) against
transformers' own dequantization of the same GGUF file, on real text the test writes.

Marked `real_model`; it runs wherever the extra is installed (CI installs it). Under CI a
missing extra fails instead of skipping, so the tier can never pass by not running.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import real_model_folder
from qwen2_jax import embedded

pytestmark = pytest.mark.real_model

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
TEXT = """\
The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps as
his father had taught him: one hundred and twelve, no more and no less. From the lantern room
he could see the whole bay, the fishing boats returning with their nets, and the long grey line
of the breakwater where the gulls gathered before a storm. On clear nights the beam reached
twenty miles out to sea, and the captains of the coastal steamers would blink their own lamps
twice in reply, a greeting that had passed between the tower and the ships for as long as
anyone in the village could remember.

def merge_sorted(a: list[int], b: list[int]) -> list[int]:
    \"\"\"Merge two sorted lists into one sorted list in linear time.\"\"\"
    out, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] <= b[j]:
            out.append(a[i]); i += 1
        else:
            out.append(b[j]); j += 1
    return out + a[i:] + b[j:]

class LRUCache:
    def __init__(self, capacity: int):
        self.capacity = capacity
        self.items = {}

    def get(self, key):
        if key not in self.items:
            return None
        value = self.items.pop(key)
        self.items[key] = value
        return value

春天来了，山上的桃花开得正盛。小河里的冰已经融化，清澈的水流过石头，发出叮咚的声音。
村里的孩子们在田野上放风筝，老人们坐在树下喝茶、下棋，谈论着今年的收成。
"""


@pytest.fixture(scope="module")
def folder() -> str:
    return real_model_folder()


@pytest.fixture(scope="module")
def reference(folder):
    """transformers' model and tokenizer from the same GGUF file, float32."""
    from transformers import AutoModelForCausalLM, Qwen2Tokenizer

    path = embedded.gguf_path(progress=False)
    directory, name = os.path.split(path)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                 dtype=torch.float32).eval()
    # AutoTokenizer's class for qwen2, without reading the file's config a second time (~30 s)
    tokenizer = Qwen2Tokenizer.from_pretrained(directory, gguf_file=name)
    return model, tokenizer


@pytest.fixture(scope="module")
def ours(folder):
    import qwen2_jax

    return qwen2_jax.load(folder, dtype="float32")


def test_tokens_and_logits_equal_transformers(folder, reference, ours):
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    model, hf_tokenizer = reference
    ids = Tokenizer(folder).encode(TEXT)
    assert ids == hf_tokenizer(TEXT)["input_ids"]
    assert len(ids) > 300  # several hundred tokens of prose, code and Chinese
    config, params = ours
    logits = np.asarray(qwen2_jax.forward(config, params, np.array([ids])))[0]
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].numpy()
    scale = float(np.abs(expected).max())
    difference = float(np.abs(logits - expected).max())
    print(json.dumps({"tokens": len(ids), "max_abs_logit": scale,
                      "max_abs_logit_diff": difference}))
    assert difference <= 1e-4 * scale


def test_greedy_chat_equals_transformers(folder, reference, ours):
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    model, _ = reference
    tokenizer = Tokenizer(folder)
    messages = [{"role": "user", "content": "Write a Python function that checks whether a "
                                            "string is a palindrome, ignoring case."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    stops = [151645, 151643]
    config, params = ours
    (tokens,) = qwen2_jax.generate(config, params, [prompt], max_new_tokens=80,
                                   stop_token_ids=stops, vocab_size=len(tokenizer))
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=80, do_sample=False,
                                  eos_token_id=stops, pad_token_id=151643)[0, len(prompt):]
    expected = [t for t in expected.tolist() if t not in stops]
    print(tokenizer.decode(tokens))
    assert len(tokens) >= 64
    assert tokens == expected
    assert "def " in tokenizer.decode(tokens)


def test_eval_perplexity_equals_transformers(tmp_path, capsys, folder, reference):
    from test_eval import hf_perplexity

    from qwen2_jax import cli

    model, hf_tokenizer = reference
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    assert cli.main(["eval", "--model", folder, "--data", str(tmp_path / "text.txt"),
                     "--max-len", "256", "--stride", "128", "--batch-size", "2",
                     "--no-progress"]) == 0
    report = json.loads(capsys.readouterr().out)
    tokens, perplexity = hf_perplexity(model, hf_tokenizer, TEXT, 256, 128)
    print(json.dumps({"ours": report, "transformers_perplexity": perplexity}))
    assert report["tokens"] == tokens
    assert report["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert 1 < report["perplexity"] < 100  # a real model, not random weights (~151936)


def test_demo_streams_a_real_answer(folder):
    import subprocess

    out = subprocess.run([str(SCRIPT), "demo", "--no-compare", "--max-new-tokens", "48"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert report["model"] == folder and report["answer_tokens"] == 48
    assert report["decode_tokens_per_s"] > 0 and report["generate_matches_transformers"] is None
    assert lines[0].startswith(">>> Write a Python function") and "def " in out.stdout
