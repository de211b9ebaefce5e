"""Generation speed on the Qwen2-0.5B shape: qwen2-jax vs transformers, in one run.

Random weights: qwen2-jax in --dtype (default float32 on CPU, bfloat16 on an accelerator);
transformers on the same device (CUDA when torch sees one) in float32 and in bfloat16, its
better figure counts. Greedy, no stop tokens, so every run produces all its tokens.

- prefill: one 512-token prompt, logits for the last position only (transformers:
  logits_to_keep=1, as its generate does); tokens/s.
- decode batch 1: a 32-token prompt, --new-tokens new tokens; tokens/s over the whole call.
- decode batch 16: 16 such prompts; generated tokens/s.
- first call: qwen2-jax's first generate call at batch 1, compilation included.
- roofline: a decode step reads every parameter once, so batch-1 decode can go no faster
  than (bandwidth / parameter bytes) tokens/s; bandwidth is measured here with a jitted
  matrix-vector product over as many bytes as the parameters.

Prints one JSON line. Takes a few minutes on 2 CPU cores.

    .venv/bin/python bench/generate.py [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from forward import median_seconds
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import qwen2_jax
from qwen2_jax.decoding import bucket, init_cache, prefill

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def synced(fn):
    """fn, then a wait for the GPU's queued work (torch timings)."""
    def run():
        fn()
        if DEVICE == "cuda":
            torch.cuda.synchronize()
    return run


def matvec_bandwidth(nbytes: int, dtype) -> float:
    """Bytes/s of a jitted matrix-vector product reading `nbytes` of matrix."""
    cols = 4096
    matrix = jnp.ones((nbytes // jnp.dtype(dtype).itemsize // cols, cols), dtype)
    vector = jnp.ones((cols,), dtype)
    product = jax.jit(lambda m, v: m @ v)
    seconds = median_seconds(lambda: product(matrix, vector).block_until_ready(), 5,
                             warmup=1)
    return matrix.nbytes / seconds


def measure_ours(config, long_prompt, prompts, n: int, repeats: int,
                 dtype) -> tuple[dict, int, float]:
    """(tokens/s by figure, parameter bytes, first-call seconds) for qwen2-jax."""
    params = qwen2_jax.init(config, jax.random.key(0), dtype=dtype)
    length = long_prompt.shape[1]
    start = time.perf_counter()
    qwen2_jax.generate(config, params, prompts[:1], max_new_tokens=n)
    first_call = time.perf_counter() - start

    def run_prefill():
        cache = init_cache(config, 1, bucket(length), jnp.dtype(dtype))
        logits, _ = prefill(config, jnp.dtype(dtype), None, (), params, cache, long_prompt,
                            jnp.asarray([length], jnp.int32))
        logits.block_until_ready()

    def run_generate(batch):
        qwen2_jax.generate(config, params, batch, max_new_tokens=n)

    speeds = {"prefill": length / median_seconds(run_prefill, repeats, warmup=1),
              "decode_b1": n / median_seconds(lambda: run_generate(prompts[:1]), 1, warmup=1),
              "decode_b16": 16 * n / median_seconds(lambda: run_generate(prompts), 1, warmup=1)}
    return speeds, sum(x.nbytes for x in jax.tree.leaves(params)), first_call


def measure_transformers(config, long_prompt, prompts, n: int, repeats: int, dtype) -> dict:
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(config.to_hf())).to(DEVICE, dtype).eval()
    ids = torch.tensor(long_prompt, dtype=torch.long, device=DEVICE)

    def run_prefill():
        with torch.no_grad():
            model(ids, logits_to_keep=1)

    def run_generate(batch):
        batch = torch.tensor(batch, device=DEVICE)
        with torch.no_grad():
            model.generate(batch, attention_mask=torch.ones_like(batch), max_new_tokens=n,
                           min_new_tokens=n, do_sample=False, pad_token_id=0)

    return {"prefill": long_prompt.shape[1] / median_seconds(synced(run_prefill), repeats,
                                                             warmup=1),
            "decode_b1": n / median_seconds(synced(lambda: run_generate(prompts[:1])), 1,
                                            warmup=1),
            "decode_b16": 16 * n / median_seconds(synced(lambda: run_generate(prompts)), 1,
                                                  warmup=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prefill-length", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs for prefill")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="qwen2-jax's dtype (default: float32 on CPU, else bfloat16)")
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    config = qwen2_jax.PRESETS["Qwen2-0.5B"]
    rng = np.random.default_rng(0)
    long_prompt = rng.integers(0, 151643, (1, args.prefill_length)).astype(np.int32)
    prompts = rng.integers(0, 151643, (16, 32)).tolist()
    n = args.new_tokens

    ours, param_bytes, first_call = measure_ours(config, long_prompt, prompts, n, args.repeats,
                                                 dtype)
    bandwidth = matvec_bandwidth(param_bytes, dtype)
    theirs = {str(d).removeprefix("torch."): measure_transformers(config, long_prompt, prompts, n,
                                                                  args.repeats, d)
              for d in (torch.float32, torch.bfloat16)}

    roofline = bandwidth / param_bytes
    report = {"bench": "generate", "shape": "Qwen2-0.5B", "device": jax.devices()[0].device_kind,
              "dtype": dtype, "transformers_device": DEVICE, "new_tokens": n,
              "param_mb": round(param_bytes / 2**20, 1),
              "qwen2_jax_first_call_s": round(first_call, 2)}
    for key in ("prefill", "decode_b1", "decode_b16"):
        best = max(theirs, key=lambda d, key=key: theirs[d][key])
        report[f"qwen2_jax_{key}_tokens_per_s"] = round(ours[key], 2)
        report[f"transformers_{key}_tokens_per_s"] = round(theirs[best][key], 2)
        report[f"transformers_{key}_dtype"] = best
        report[f"{key}_ratio"] = round(ours[key] / theirs[best][key], 3)
    report["matvec_bandwidth_gb_per_s"] = round(bandwidth / 1e9, 2)
    report["roofline_decode_b1_tokens_per_s"] = round(roofline, 2)
    report["decode_b1_fraction_of_roofline"] = round(ours["decode_b1"] / roofline, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
