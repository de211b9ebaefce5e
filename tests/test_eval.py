"""`qwen2-jax eval`: the perplexity of transformers' sliding-window guide, to float32 rounding."""

from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from conftest import make_hf_model
from qwen2_jax.commands import evaluate as eval_command

TEXT = """The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the
steps as his father had taught him: one hundred and twelve, never more, never fewer. Ships
passing the headland saw the lamp turn and knew the rocks were near.

def fibonacci(n: int) -> list[int]:
    a, b = 0, 1
    out = []
    for _ in range(n):
        out.append(a)
        a, b = b, a + b
    return out

print({"first": fibonacci(10), "sum": sum(fibonacci(10))})

In the morning he wrote the log: wind from the north-west, force six, visibility four miles,
two freighters and a fishing boat, all well. Then he slept until noon, ate bread with salted
butter, and mended the nets he no longer used, because his hands liked the work.

class Lamp:
    def __init__(self, period_s: float = 7.5):
        self.period_s = period_s
        self.angle = 0.0

    def step(self, dt: float) -> float:
        self.angle = (self.angle + 360.0 * dt / self.period_s) % 360.0
        return self.angle

灯塔守护者每天黄昏都会爬上螺旋楼梯，数着台阶，就像他父亲教他的那样。经过海岬的船只看到灯光旋转，
就知道礁石就在附近。春眠不觉晓，处处闻啼鸟。夜来风雨声，花落知多少。
"""


def hf_perplexity(model, tokenizer, text: str, max_length: int, stride: int):
    """The loop of https://huggingface.co/docs/transformers/perplexity, as published."""
    encodings = tokenizer(text, return_tensors="pt")
    seq_len = encodings.input_ids.size(1)

    nll_sum = 0.0
    n_tokens = 0
    prev_end_loc = 0
    for begin_loc in range(0, seq_len, stride):
        end_loc = min(begin_loc + max_length, seq_len)
        trg_len = end_loc - prev_end_loc  # may be different from stride on last loop
        input_ids = encodings.input_ids[:, begin_loc:end_loc]
        target_ids = input_ids.clone()
        target_ids[:, :-trg_len] = -100

        with torch.no_grad():
            outputs = model(input_ids, labels=target_ids)
            neg_log_likelihood = outputs.loss

        num_valid_tokens = (target_ids != -100).sum().item()
        batch_size = target_ids.size(0)
        num_loss_tokens = num_valid_tokens - batch_size
        nll_sum += neg_log_likelihood * num_loss_tokens
        n_tokens += num_loss_tokens

        prev_end_loc = end_loc
        if end_loc == seq_len:
            break

    avg_nll = nll_sum / n_tokens
    return seq_len, float(torch.exp(avg_nll))


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random Qwen2 with the real vocabulary and tokenizer; and transformers' tokenizer."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("eval_model")
    torch_model = make_hf_model(folder, vocab_size=151936, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2,
                                num_key_value_heads=1, max_position_embeddings=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    return folder, torch_model, AutoTokenizer.from_pretrained(folder)


def run_eval(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    eval_command.add_parser(parser.add_subparsers(dest="command"))
    return eval_command.run(parser.parse_args(["eval", *argv]))


@pytest.mark.parametrize("max_len, stride, batch, data", [
    (64, 24, 3, "text.txt"),  # overlapping windows; the last batch padded
    (64, 64, 2, "texts.jsonl"),  # no overlap; JSONL texts joined by "\n\n"
    (1024, None, 1, "text.txt"),  # the text is shorter than one window
])
def test_perplexity_equals_the_transformers_guide(tmp_path, capsys, model, max_len, stride,
                                                  batch, data):
    folder, torch_model, tokenizer = model
    paragraphs = TEXT.split("\n\n")
    (tmp_path / "text.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "texts.jsonl").write_text(
        "".join(json.dumps({"text": p, "id": i}, ensure_ascii=False) + "\n\n"
                for i, p in enumerate(paragraphs)), encoding="utf-8")  # blank lines skipped
    text = TEXT if data == "text.txt" else "\n\n".join(paragraphs)
    args = ["--model", str(folder), "--data", str(tmp_path / data), "--max-len", str(max_len),
            "--batch-size", str(batch), "--no-progress"]
    assert run_eval(*args, *(["--stride", str(stride)] if stride else [])) == 0
    report = json.loads(capsys.readouterr().out)
    tokens, perplexity = hf_perplexity(torch_model, tokenizer, text, max_len,
                                       stride or max_len // 2)
    assert 300 < tokens < 1024  # a few hundred: several windows of 64, one of 1024
    assert report["tokens"] == tokens
    assert report["perplexity"] == pytest.approx(perplexity, rel=1e-4)
    assert report["nll"] == pytest.approx(math.log(perplexity), rel=1e-4)
    assert set(report) == {"tokens", "nll", "perplexity", "tokens_per_s"}


def test_windows_follow_the_guide():
    assert eval_command.windows(10, 4, 4) == [(0, 4, 4), (4, 8, 4), (8, 10, 2)]
    assert eval_command.windows(10, 4, 2) == [(0, 4, 4), (2, 6, 2), (4, 8, 2), (6, 10, 2)]
    assert eval_command.windows(3, 8, 4) == [(0, 3, 3)]


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory, qwen2_tokenizer_dir):
    """The real tokenizer beside a model of 101 tokens: the two do not belong together."""
    folder = tmp_path_factory.mktemp("small_vocab_model")
    make_hf_model(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    return folder


@pytest.mark.parametrize("name, content, flags, message", [
    ("missing.txt", None, [], "--data {data}: no such file or folder (expected a text or JSONL "
                              "file)"),
    ("empty.txt", b"", [], "{data}: 0 token(s) of text; perplexity needs at least 2"),
    ("latin1.txt", b"first line\ncaf\xe9 au lait\n", [],
     "{data}:2: not UTF-8 text (invalid continuation byte at byte 3 of the line)"),
    ("bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n', [],
     "{data}:2: invalid JSON: Expecting value (column 10)"),
    ("no_text.jsonl", b'{"text": "fine"}\n\n{"content": "x"}\n', [],
     "{data}:3: expected a JSON object with a 'text' string, found ['content']"),
    ("text.txt", TEXT.encode(), ["--max-len", "32", "--stride", "33"],
     "--stride 33 is larger than --max-len 32: the tokens between windows would never be "
     "scored"),
    ("text.txt", TEXT.encode(), ["--max-len", "2048"],
     "--max-len 2048 is past the model's max_position_embeddings 1024"),
    ("text.txt", TEXT.encode(), ["--max-len", "1"], "--max-len must be >= 2, got 1"),
    ("text.txt", TEXT.encode(), ["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_input_exits_2_with_file_and_line(tmp_path, capsys, model, name, content, flags,
                                              message):
    data = tmp_path / name
    if content is not None:
        data.write_bytes(content)
    assert run_eval("--model", str(model[0]), "--data", str(data), *flags) == 2
    assert capsys.readouterr().err == f"qwen2-jax eval: {message.format(data=data)}\n"


def test_ids_past_the_model_vocabulary(tmp_path, capsys, small_vocab_model):
    data = tmp_path / "text.txt"
    data.write_text("Hello world", encoding="utf-8")
    assert run_eval("--model", str(small_vocab_model), "--data", str(data)) == 2
    assert capsys.readouterr().err == (
        f"qwen2-jax eval: {data}: token id 9707 ('Hello') is past the model's vocabulary: the "
        f"tokenizer ({small_vocab_model}/tokenizer.json) has 151646 tokens, the model's "
        "vocab_size is 101; they do not belong together\n")
