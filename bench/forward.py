"""Prefill forward on the Qwen2-0.5B shape (random weights, float32 on CPU): qwen2-jax vs transformers.

Both read the same safetensors written by transformers in this run. Prints one JSON line:
tokens/s of each (median of --repeats timed runs after one warm-up), their ratio, and our
first-call latency including compilation.

    .venv/bin/python bench/forward.py [--length 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import qwen2_jax


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=512, help="prompt tokens (batch 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs after warm-up")
    args = parser.parse_args()

    preset = qwen2_jax.PRESETS["Qwen2-0.5B"]
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(preset.to_hf())).float().eval()
    ids = np.random.default_rng(0).integers(0, 151643, (1, args.length))
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        config, params = qwen2_jax.load(folder, dtype="float32")

    def ours():
        qwen2_jax.forward(config, params, ids).block_until_ready()

    start = time.perf_counter()
    ours()
    first_call_s = time.perf_counter() - start
    ours_s = median_seconds(ours, args.repeats)

    torch_ids = torch.as_tensor(ids)

    def reference():
        with torch.no_grad():
            model(torch_ids)

    reference()
    ref_s = median_seconds(reference, args.repeats)
    print(json.dumps({
        "bench": "prefill_forward", "shape": "Qwen2-0.5B", "dtype": "float32", "batch": 1,
        "length": args.length, "threads": torch.get_num_threads(),
        "qwen2_jax_tokens_per_s": round(args.length / ours_s, 1),
        "transformers_tokens_per_s": round(args.length / ref_s, 1),
        "ratio": round(ref_s / ours_s, 3),
        "qwen2_jax_first_call_s": round(first_call_s, 2),
    }))


if __name__ == "__main__":
    main()
