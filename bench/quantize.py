"""Quantized inference on the real model: qwen2-jax in float32, bfloat16 (off CPU), int8 and
int4 against transformers at its best dtype, in one run.

The model is the embedded Qwen2.5-Coder-0.5B-Instruct (`qwen2_jax.default_model()`);
transformers reads its HF export (made once, cached beside it). For each of our dtypes:

- resident weight bytes, and the bytes a decode step reads (every weight once; an untied
  input table only by row);
- decode batch 1 and batch 16: random 32-token prompts, --new-tokens greedy tokens each,
  generated tokens/s over the whole call (median of --repeats);
- prefill: one 512-token prompt, tokens/s;
- perplexity of tests/data/textwrap_excerpt.py.txt (2,646 tokens), scored through the KV
  cache 512 tokens at a time (`decoding.cached_logprobs`); for float32 also with the int8
  KV cache;
- the batch-1 roofline: matrix-vector bandwidth (measured here, float32 matvec over as many
  bytes) / bytes read per token.

Prints one JSON line with the figures, the ratios the issue targets and whether each is met.
About 10 minutes on 2 CPU cores.

    .venv/bin/python bench/quantize.py [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np
import torch
from forward import median_seconds
from generate import matvec_bandwidth, synced

import qwen2_jax
from qwen2_jax.decoding import cached_logprobs
from qwen2_jax.quantize import weight_bytes
from qwen2_jax.tokenizer import Tokenizer

TEXT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "textwrap_excerpt.py.txt")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def log(message: str) -> None:
    print(f"[bench/quantize] {message}", file=sys.stderr, flush=True)


def bytes_per_token(config, params) -> int:
    """What a decode step reads: every weight, except an untied input table (one row)."""
    total = weight_bytes(params)
    if not config.tie_word_embeddings:
        total -= weight_bytes(params["embed_tokens"])
    return total


def perplexity(logprobs: np.ndarray) -> float:
    return float(np.exp(-logprobs.mean()))


def measure_ours(folder, dtype, quantize, text_ids, prompts, long_prompt, n, repeats) -> dict:
    start = time.perf_counter()
    config, params = qwen2_jax.load(folder, dtype=dtype, quantize=quantize)
    loaded = time.perf_counter() - start

    def run_generate(batch):
        qwen2_jax.generate(config, params, batch, max_new_tokens=n)

    def run_prefill():
        qwen2_jax.generate(config, params, long_prompt, max_new_tokens=1)

    figures = {
        "load_s": round(loaded, 1),
        "weight_mb": round(weight_bytes(params) / 2**20, 1),
        "bytes_per_token_mb": round(bytes_per_token(config, params) / 2**20, 1),
        "decode_b1": n / median_seconds(lambda: run_generate(prompts[:1]), repeats, warmup=1),
        "decode_b16": 16 * n / median_seconds(lambda: run_generate(prompts), repeats,
                                              warmup=1),
        "prefill_512": 512 / median_seconds(run_prefill, repeats, warmup=1),
        "perplexity": perplexity(cached_logprobs(config, params, [text_ids])),
    }
    if quantize is None and dtype == "float32":
        figures["perplexity_int8_kv"] = perplexity(
            cached_logprobs(config, params, [text_ids], kv_cache_dtype="int8"))
    figures["bytes_per_token"] = bytes_per_token(config, params)
    return figures


def measure_transformers(folder, dtype, text_ids, prompts, long_prompt, n, repeats) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(DEVICE).eval()

    def run_generate(batch):
        batch = torch.tensor(batch, device=DEVICE)
        with torch.no_grad():
            model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)

    def run_prefill():
        with torch.no_grad():
            model(torch.tensor(long_prompt, device=DEVICE), logits_to_keep=1)

    with torch.no_grad():
        logits = model(torch.tensor([text_ids], device=DEVICE)).logits[0, :-1].float()
        logprobs = torch.log_softmax(logits, -1).gather(
            1, torch.tensor(text_ids[1:], device=DEVICE)[:, None])[:, 0].cpu().numpy()
    return {"decode_b1": n / median_seconds(synced(lambda: run_generate(prompts[:1])), repeats,
                                            warmup=1),
            "decode_b16": 16 * n / median_seconds(synced(lambda: run_generate(prompts)),
                                                  repeats, warmup=1),
            "prefill_512": 512 / median_seconds(synced(run_prefill), repeats, warmup=1),
            "perplexity": perplexity(logprobs)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, os.path.dirname(__file__))
    from serve import hf_folder

    folder = qwen2_jax.default_model()
    hf = hf_folder(folder, os.path.join(os.path.dirname(folder), "bench-hf"))
    with open(TEXT, encoding="utf-8") as f:
        text_ids = Tokenizer(folder).encode(f.read())
    rng = np.random.default_rng(0)
    prompts = rng.integers(0, 151643, (16, 32)).tolist()
    long_prompt = rng.integers(0, 151643, (1, 512)).tolist()
    n = args.new_tokens
    cpu = jax.default_backend() == "cpu"

    ours = {}
    for name, dtype, quantize in (("float32", "float32", None),
                                  ("bfloat16", "bfloat16", None),
                                  ("int8", None, "int8"), ("int4", None, "int4")):
        if cpu and name == "bfloat16":
            continue  # XLA:CPU bfloat16 matmuls are ~15x slower than float32
        log(f"qwen2-jax {name}")
        ours[name] = measure_ours(folder, dtype, quantize, text_ids, prompts, long_prompt, n,
                                  args.repeats)
    theirs = {}
    for dtype in (torch.float32, torch.bfloat16):
        log(f"transformers {dtype}")
        theirs[str(dtype).removeprefix("torch.")] = measure_transformers(
            hf, dtype, text_ids, prompts, long_prompt, n, args.repeats)
    best = max(theirs, key=lambda d: theirs[d]["decode_b1"])
    bandwidth = matvec_bandwidth(ours["float32"]["bytes_per_token"], "float32")

    report = {"bench": "quantize", "model": "Qwen2.5-Coder-0.5B-Instruct",
              "device": jax.devices()[0].device_kind, "new_tokens": n,
              "matvec_bandwidth_gb_per_s": round(bandwidth / 1e9, 2)}
    base = ours["float32"]
    for name, figures in ours.items():
        roofline = bandwidth / figures.pop("bytes_per_token")
        figures["roofline_decode_b1"] = round(roofline, 2)
        figures["fraction_of_roofline"] = round(figures["decode_b1"] / roofline, 3)
        figures["perplexity_increase"] = round(figures["perplexity"] / base["perplexity"] - 1, 5)
        report[name] = {k: round(v, 3) if isinstance(v, float) else v
                        for k, v in figures.items()}
    report["transformers"] = {d: {k: round(v, 3) for k, v in f.items()} for d, f in theirs.items()}
    report["transformers_best_dtype"] = best
    b1 = {name: figures["decode_b1"] for name, figures in ours.items()}
    kv_increase = base["perplexity_int8_kv"] / base["perplexity"] - 1
    targets = {
        "int8_vs_float32_decode_b1": (b1["int8"] / b1["float32"], 2.0),
        "int8_vs_transformers_decode_b1": (b1["int8"] / theirs[best]["decode_b1"], 1.5),
        "int4_vs_int8_decode_b1": (b1["int4"] / b1["int8"], 1.3),
        **{f"{name}_fraction_of_roofline": (report[name]["fraction_of_roofline"], 0.8)
           for name in ours},
    }
    if "bfloat16" in ours:
        targets["int8_vs_bfloat16_decode_b1"] = (b1["int8"] / b1["bfloat16"], 1.6)
    report["targets"] = {k: {"value": round(v, 3), "target": t, "met": v >= t}
                         for k, (v, t) in targets.items()}
    for name, limit in (("int8", 0.01), ("int4", 0.10)):
        increase = report[name]["perplexity_increase"]
        report["targets"][f"{name}_perplexity_increase"] = {
            "value": increase, "target_at_most": limit, "met": increase <= limit}
    report["targets"]["int8_kv_perplexity_increase"] = {
        "value": round(kv_increase, 5), "target_at_most": 0.005, "met": kv_increase <= 0.005}
    print(json.dumps(report))


if __name__ == "__main__":
    main()
