"""Data at scale: `qwen2-jax tokenize` and the SFT training feed on 100k and 1M examples.

Synthetic SFT JSONL (short random chats: one or two turns of random words, some with a system
message) is tokenized with the real Qwen2 tokenizer and chat template into a model folder that
has only the 0.5B preset's config.json and the tokenizer (no weights: neither step loads
them). Each tokenize runs as `qwen2-jax tokenize` in its own process, timed, with its peak RSS
(the child's ru_maxrss); 10k and 100k examples show whether its memory grows with the data,
and 100k again with --workers 2 what a second process gives on this 2-core machine.
Tokenizing 1M takes ~10x the 100k time, so by default the 1M folder is the 100k folder
replicated 10 times (said in the JSON; --tokenize-1m tokenizes a real 1M file instead, with 2
workers).

The feed is what `sft --data DIR` does for each step without the model: open the folder
(lengths from the offsets), plan the epoch's packing (plan_rows), then build every batch of the
epoch (batch_rows: rows of 2048 tokens, batch 8) and place it on the device (Feeder.place).
Each size runs in a fresh process; its peak RSS is that process's VmHWM, and `growth_mb` the
1M figure minus the 100k one (target <= 50 MB). The feed's tokens/s is set against the
training step's consumption: the fastest 0.5B-shape CPU step this project measured (README,
bench/lora.py: LoRA, 52.2 tokens/s; the full fine-tune 33.6), target >= 20x. Prints one JSON
line.

    .venv/bin/python bench/data.py [--work DIR] [--tokenize-1m]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time

import numpy as np
from load import status_mb

STEP_TOKENS_PER_S = 52.2  # README, bench/lora.py: the 0.5B shape's LoRA step, 2-core CPU
STEP_SOURCE = ("README bench/lora.py: Qwen2-0.5B shape, 1 x 512 tokens, float32, 2-core CPU: "
               "LoRA 52.2 tokens/s (the faster of it and the full fine-tune's 33.6)")
MAX_LEN, BATCH = 2048, 8
SCRIPT = os.path.join(os.path.dirname(sys.executable), "qwen2-jax")


def write_model(folder: str) -> None:
    """config.json of the 0.5B preset and the real Qwen2 tokenizer; no weights."""
    from qwen2_jax.config import PRESETS
    from qwen2_jax.tokenizer import write_qwen2_tokenizer

    write_qwen2_tokenizer(folder)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(PRESETS["Qwen2-0.5B"].to_hf(), f)


def write_chats(path: str, count: int, seed: int) -> None:
    """`count` random chats, one JSON line each."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    words = ["".join(rng.choices(letters, k=rng.randint(2, 8))) for _ in range(3000)]

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choices(words, k=rng.randint(lo, hi))).capitalize() + "."

    with open(path, "w", encoding="utf-8") as f:
        for _ in range(count):
            if rng.random() < 0.5:
                record = {"prompt": text(3, 25), "completion": text(3, 50)}
            else:
                messages = [{"role": "system", "content": text(3, 10)}] * (rng.random() < 0.3)
                for _ in range(rng.randint(1, 2)):
                    messages += [{"role": "user", "content": text(3, 20)},
                                 {"role": "assistant", "content": text(3, 40)}]
                record = {"messages": messages}
            f.write(json.dumps(record) + "\n")


def tokenize(model: str, data: str, out: str, workers: int) -> dict:
    """Runs `qwen2-jax tokenize` in a child process: seconds, examples/s, and the peak RSS of
    the largest of its processes (wait4's ru_maxrss covers the child's own children)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([SCRIPT, "tokenize", "--model", model, "--data", data, "--out",
                                  out, "--max-len", str(MAX_LEN), "--workers", str(workers),
                                  "--no-progress"],
                                 stdout=subprocess.PIPE, stderr=err, text=True)
        printed = child.stdout.read()
        _, status, usage = os.wait4(child.pid, 0)  # the child's own rusage
        seconds = time.perf_counter() - start
        child.stdout.close()
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode:
            err.seek(0)
            raise RuntimeError(f"tokenize failed: {err.read()}")
    manifest = json.loads(printed)
    examples = manifest["stats"]["examples"]
    return {"examples": examples, "tokens": manifest["tokens"], "seconds": round(seconds, 1),
            "examples_per_s": round(examples / seconds),
            "peak_rss_mb": round(usage.ru_maxrss / 1024)}


def replicate(source: str, out: str, times: int) -> None:
    """A tokenize folder holding `source`'s examples `times` over (counts scaled to match)."""
    from qwen2_jax.train.token_store import MANIFEST

    os.makedirs(out)
    offsets = np.load(os.path.join(source, "offsets.npy"))
    total = int(offsets[-1])
    for name in ("tokens", "targets"):
        part = np.load(os.path.join(source, f"{name}.npy"), mmap_mode="r")
        whole = np.lib.format.open_memmap(os.path.join(out, f"{name}.npy"), "w+", part.dtype,
                                          (total * times,))
        for i in range(times):
            whole[i * total:(i + 1) * total] = part
        whole.flush()
        del whole
    shifted = [offsets[:-1] + i * total for i in range(times)] + [[total * times]]
    np.save(os.path.join(out, "offsets.npy"), np.concatenate(shifted))
    with open(os.path.join(source, MANIFEST), encoding="utf-8") as f:
        manifest = json.load(f)
    manifest["stats"] = {k: v * times for k, v in manifest["stats"].items()}
    manifest["tokens"] *= times
    manifest["source"] = f"{manifest['source']} x {times} (replicated by bench/data.py)"
    with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f)


def feed(model: str, folder: str) -> dict:
    """One epoch of `sft --data folder`'s batches without the model step, in this process."""
    import jax

    from qwen2_jax.train import token_store
    from qwen2_jax.train.data import plan_rows
    from qwen2_jax.train.feed import Feeder
    from qwen2_jax.train.sft import batch_rows

    settings = token_store.read_manifest(folder)["settings"]
    feeder = Feeder(BATCH)
    jax.block_until_ready(feeder.place({"x": np.zeros((1, BATCH, 1), np.int32)}))  # start-up
    before = status_mb("VmRSS")
    start = time.perf_counter()
    data, _ = token_store.open_examples(folder, settings, 151936, model)
    plan = plan_rows(data.lengths, MAX_LEN, seed=0)
    planned = time.perf_counter()
    rows, tokens = len(plan[1]) - 1, 0
    for index in range(math.ceil(rows / BATCH)):
        which = (index * BATCH + np.arange(BATCH))[None, feeder.rows]  # [1, B]
        batch = feeder.place(batch_rows(data, plan, which, MAX_LEN))
        tokens += int(jax.block_until_ready(batch["segment_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    return {"examples": len(data), "rows": rows, "fill": round(tokens / (rows * MAX_LEN), 4),
            "plan_seconds": round(planned - start, 2), "seconds": round(seconds, 2),
            "examples_per_s": round(len(data) / seconds), "tokens_per_s": round(tokens / seconds),
            "rss_before_mb": round(before), "peak_rss_mb": round(status_mb("VmHWM"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=None, help="folder for the files (default: a temp one)")
    parser.add_argument("--tokenize-1m", action="store_true",
                        help="tokenize a real 1M-example file (about 10x the 100k time) instead "
                        "of replicating the 100k folder")
    parser.add_argument("--feed", nargs=2, metavar=("MODEL", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feed:
        print(json.dumps(feed(*args.feed)))
        return
    work = args.work or tempfile.mkdtemp(prefix="bench-data-")
    model = os.path.join(work, "model")
    write_model(model)
    result = {"max_len": MAX_LEN, "batch_size": BATCH, "tokenize": {}, "feed": {}}
    runs = [(10_000, 1), (100_000, 1), (100_000, 2)] + [(1_000_000, 2)] * args.tokenize_1m
    for count, workers in runs:
        data = os.path.join(work, f"chats-{count}.jsonl")
        if not os.path.exists(data):
            write_chats(data, count, seed=count)
        out = os.path.join(work, f"t{count}" + (f"-workers{workers}" if workers > 1 else ""))
        result["tokenize"][f"{count}, {workers} worker(s)"] = tokenize(model, data, out, workers)
    if args.tokenize_1m:
        os.rename(os.path.join(work, "t1000000-workers2"), os.path.join(work, "t1000000"))
    if not args.tokenize_1m:
        replicate(os.path.join(work, "t100000"), os.path.join(work, "t1000000"), 10)
        result["note"] = ("the 1M folder is the tokenized 100k folder replicated 10x; "
                          "tokenizing 1M takes about 10x the 100k time (--tokenize-1m)")
    for count in (100_000, 1_000_000):
        done = subprocess.run([sys.executable, __file__, "--feed", model,
                               os.path.join(work, f"t{count}")], check=True,
                              capture_output=True, text=True)
        result["feed"][str(count)] = json.loads(done.stdout)
    small, large = result["feed"]["100000"], result["feed"]["1000000"]
    result["feed_rss_growth_100k_to_1m_mb"] = large["peak_rss_mb"] - small["peak_rss_mb"]
    result["step_consumption_tokens_per_s"] = STEP_TOKENS_PER_S
    result["step_consumption_source"] = STEP_SOURCE
    result["feed_vs_step"] = round(min(small["tokens_per_s"], large["tokens_per_s"])
                                   / STEP_TOKENS_PER_S)
    result["targets"] = {"rss_growth_mb<=50": result["feed_rss_growth_100k_to_1m_mb"] <= 50,
                         "feed_vs_step>=20": result["feed_vs_step"] >= 20}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
