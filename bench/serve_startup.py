"""Server start-up on CPU: `qwen2-jax serve` started twice on one --compile-cache (the first
start compiles every program and keeps it; the restart reads them back), beside
`transformers serve --continuous-batching` on the same weights, on the real model.

For each start: `ready_s`, from launching the process to /health answering 200 (loading the
model included), and for ours `warm_up_s`, the engine's own warm-up as its log reports it
("warm-up: N programs ready in X s (C compiled, L read from DIR)"). Then one short greedy
request: `first_request_s`, so a server that put off compiling until the first request would
show it here. transformers runs eagerly (nothing to compile), so its ready_s is model loading.

Target (issue 18): the restart's warm-up at least 3x faster than the first
(`warm_up_ratio` = first warm_up_s / restart warm_up_s); `ready_ratio` is the same for
ready_s. One JSON line to stdout; progress to stderr. About 4 minutes.

    .venv/bin/python bench/serve_startup.py [--max-batch 8] [--max-model-len 4096]
        [--prefill-chunk 512] [--servers ours,transformers]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time

import httpx

from serve import NAME, free_port, hf_folder, log, server

TARGET = 3.0
WARM_UP = re.compile(r"warm-up: (\d+) programs ready in ([\d.]+) s \((\d+) compiled, (\d+) read")


def first_request(base: str, model: str) -> tuple[float, str]:
    """Seconds for one short greedy completion, and its text."""
    start = time.perf_counter()
    reply = httpx.post(f"{base}/v1/completions", timeout=600, json={
        "model": model, "prompt": "def fibonacci(n):", "max_tokens": 8, "temperature": 0})
    reply.raise_for_status()
    return round(time.perf_counter() - start, 2), reply.json()["choices"][0]["text"]


def start(command: list[str], base: str, model: str, log_path: str) -> dict:
    with server(command, base, log_path, 900) as (_, ready_s):
        seconds, text = first_request(base, model)
    figures = {"ready_s": round(ready_s, 1), "first_request_s": seconds, "text": text}
    with open(log_path, errors="replace") as f:
        found = WARM_UP.search(f.read())
    if found:
        figures.update(programs=int(found[1]), warm_up_s=float(found[2]),
                       compiled=int(found[3]), read=int(found[4]))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-batch", type=int, default=8, help="(default 8, serve's)")
    parser.add_argument("--max-model-len", type=int, default=4096,
                        help="(default 4096, serve's)")
    parser.add_argument("--prefill-chunk", type=int, default=512, help="(default 512, serve's)")
    parser.add_argument("--servers", default="ours,transformers",
                        help="ours and/or transformers (default both)")
    parser.add_argument("--cb-num-blocks", type=int, default=64,
                        help="transformers' --cb-num-blocks (default 64, as bench/serve.py)")
    args = parser.parse_args()

    import qwen2_jax
    from qwen2_jax.embedded import cache_dir

    venv = os.path.dirname(sys.executable)
    report: dict = {"bench": "serve_startup", "cpus": os.cpu_count(),
                    "flags": {"max_batch": args.max_batch, "max_model_len": args.max_model_len,
                              "prefill_chunk": args.prefill_chunk}}
    with tempfile.TemporaryDirectory(prefix="serve-startup-") as root:
        if "ours" in args.servers:
            for run in ("first", "restart"):
                port = free_port()
                command = [os.path.join(venv, "qwen2-jax"), "serve", "--port", str(port),
                           "--served-model-name", NAME, "--max-batch", str(args.max_batch),
                           "--max-model-len", str(args.max_model_len), "--prefill-chunk",
                           str(args.prefill_chunk), "--compile-cache",
                           os.path.join(root, "programs")]
                log(f"ours ({run}): {' '.join(command[1:])}")
                report[f"ours_{run}"] = start(command, f"http://127.0.0.1:{port}", NAME,
                                              os.path.join(root, f"ours-{run}.log"))
                log(f"ours ({run}): {report[f'ours_{run}']}")
            first, restart = report["ours_first"], report["ours_restart"]
            report["same_text"] = first["text"] == restart["text"]
            report["warm_up_ratio"] = round(first["warm_up_s"] / restart["warm_up_s"], 2)
            report["ready_ratio"] = round(first["ready_s"] / restart["ready_s"], 2)
            report["target_warm_up_ratio"] = TARGET
            report["met"] = report["warm_up_ratio"] >= TARGET
        if "transformers" in args.servers:
            folder = hf_folder(qwen2_jax.default_model(), os.path.join(cache_dir(), "bench-hf"))
            port = free_port()
            command = [os.path.join(venv, "transformers"), "serve", folder,
                       "--continuous-batching", "--host", "127.0.0.1", "--port", str(port),
                       "--dtype", "float32", "--device", "cpu", "--cb-num-blocks",
                       str(args.cb_num_blocks)]
            log(f"transformers: {' '.join(command[1:])}")
            report["transformers"] = start(command, f"http://127.0.0.1:{port}", folder,
                                           os.path.join(root, "transformers.log"))
            log(f"transformers: {report['transformers']}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
