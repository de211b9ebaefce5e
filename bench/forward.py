"""Prefill forward on the Qwen2-0.5B shape (random weights): qwen2-jax vs transformers.

Both read the same safetensors written by transformers in this run and compute in --dtype
(float32 on CPU; bfloat16 on an accelerator, where transformers runs on CUDA when torch sees
one). Prints one JSON line: tokens/s of each (median of --repeats timed runs after one
warm-up), their ratio, and our first-call latency including compilation.

    .venv/bin/python bench/forward.py [--length 512] [--batch 1] [--dtype float32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import qwen2_jax


def median_seconds(fn, repeats: int, warmup: int = 0) -> float:
    """Median wall seconds of fn() over `repeats` calls, after `warmup` untimed calls (the
    other benchmarks time with this too)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512, help="prompt tokens (batch 1)")
    parser.add_argument("--batch", type=int, default=1, help="prompts per forward")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="storage and compute dtype of both (default float32)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after warm-up")
    args = parser.parse_args()

    preset = qwen2_jax.PRESETS["Qwen2-0.5B"]
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = getattr(torch, args.dtype)
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(preset.to_hf())).to(torch_dtype).eval()
    ids = np.random.default_rng(0).integers(0, 151643, (args.batch, args.length))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config, params = qwen2_jax.load(folder, dtype=args.dtype)
    model = model.to(device)

    def ours():
        qwen2_jax.forward(config, params, ids).block_until_ready()

    start = time.perf_counter()
    ours()
    first_call_s = time.perf_counter() - start
    ours_s = median_seconds(ours, args.repeats)

    torch_ids = torch.as_tensor(ids).to(device)

    def reference():
        with torch.no_grad():
            model(torch_ids)
        if device == "cuda":
            torch.cuda.synchronize()

    reference()
    ref_s = median_seconds(reference, args.repeats)
    print(json.dumps({
        "bench": "prefill_forward", "shape": "Qwen2-0.5B", "dtype": args.dtype,
        "batch": args.batch, "length": args.length, "jax_device": str(jax.devices()[0]),
        "torch_device": device, "threads": torch.get_num_threads(),
        "qwen2_jax_tokens_per_s": round(args.batch * args.length / ours_s, 1),
        "transformers_tokens_per_s": round(args.batch * args.length / ref_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        "qwen2_jax_first_call_s": round(first_call_s, 2),
    }))


if __name__ == "__main__":
    main()
