"""Long context on CPU: prefill, decode, peak memory and passkey retrieval, qwen2-jax vs
transformers, on the real model (issue 17, item 7).

Same float32 weights for both: the embedded Qwen2.5-Coder-0.5B-Instruct in our format
(`qwen2_jax.default_model()`), exported once to HF safetensors (`qwen2-jax export`) for
transformers, so both compute on identical numbers. Prompts are tokenized once, by our
tokenizer and chat template; both libraries get the same ids.

- Passkey (REFERENCE_SERVING.md, "Long context"): a 5-digit key hidden at each depth of
  --depths in filler of each length of --lengths, asked for as a user message in the chat
  template. A prompt has L - --new-tokens tokens, so prompt and answer fill exactly L positions
  (our cache then has L slots). Greedy, no stop token: every call decodes --new-tokens tokens;
  the answer is the text before the first stop token, and its first integer is compared with
  the key. Agreement: the same first integer (or none) from both libraries, prompt by prompt.
- The passkey calls ARE the prefill and decode benchmark: in each generate call, the time to
  the first token is the prefill (ours via `on_tokens`, transformers via a streamer) and the
  rest of the call gives decode tokens/s at that context. Per length, the median over depths;
  prefill leaves out each process's first call, in which ours compiles (`prefill_s_each` has
  every call), except with one depth (as --quick): then it includes our compilation.
- transformers at its best on CPU: SDPA attention (a blockwise kernel with no mask, so its
  memory stays linear), float32 (torch bfloat16 matmuls on CPU are slower, not faster), its
  generate (prefill keeps the last position's logits only).
- Each (library, length) runs in its own fresh process, so each peak RSS is that length's
  alone: `peak_rss_mb` is the peak (VmHWM) of the generate calls, reset after loading, with the
  model resident; `load_peak_rss_mb` the loading's own peak. Our bound (issue 17): peak RSS <=
  float32 parameters + KV cache + 1.5 GB, KV cache = 2 x layers x slots x kv_heads x head_dim x
  4 bytes, slots = `decoding.bucket(prompt + new tokens)`.
- Tiny: a random model (hidden 64, 2 layers, 4/2 heads, vocab 1000, YaRN factor 4 over 32768,
  131,072 positions) written by transformers: prefill of 131,072 - --new-tokens tokens plus
  --new-tokens decoded. transformers runs it too, but is stopped after TINY_TIMEOUT_S seconds.
- YaRN perplexity (`yarn_perplexity`): the real model on ~1000 tokens of fixed text, plain,
  static YaRN (factor 4) and dynamic YaRN, through `qwen2-jax eval`'s scoring function.

Targets printed pass/fail: the RSS bound at each length (ours); prefill >= 1.0x transformers at
8K and 16K (at the longest length when no length reaches 8K, as with --quick); decode at the
longest length (16K) >= 1.2x; the tiny 131,072 completes; passkey agreement 100%.

Time (2 CPU cores, nothing else running): transformers' prefill is ~36 s at 4K (measured),
~120 s at 8K and ~440 s at 16K per prompt (a*L + b*L^2 through 4K and its 135 s at 8.7K), so
its 9 passkey prompts take ~30 minutes; ours at most as long if it meets the targets; the tiny
~1 minute for ours plus at most TINY_TIMEOUT_S for transformers; the perplexity ~1.5 minutes;
the export 10 s. The full run: about 65-70 minutes. --quick (1K and 2K, depth 0.5, tiny at
8K): 5-10 minutes.

    .venv/bin/python bench/long_context.py [--quick] [--lengths 4K,8K,16K]
        [--depths 0.1,0.5,0.9] [--new-tokens 16] [--skip-transformers]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time

from load import status_mb

PREFILL_CHUNK = 2048  # tokens per prefill step (`generate`'s default)
TINY_LENGTH = 131072
TINY_TIMEOUT_S = 180  # transformers' tiny run is optional: stopped past this
RSS_SLACK = 1.5e9  # bytes: the bound's allowance over parameters and KV cache
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
TINY = dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=TINY_LENGTH,
            rope_theta=1e6, rope_scaling=YARN, tie_word_embeddings=False)
PERPLEXITY_TOKENS = 1024

# The passkey prompt: YaRN's passkey.py (after landmark attention), as REFERENCE_SERVING.md.
TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
        "memorize it. I will quiz you about the important information there.")
FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
          "There and back again.")
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key?"
STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


# ----- the child processes: one generate job, or the perplexities --------------------------

def after_load() -> dict:
    """Memory after loading the model: the process's peak so far and its resident size. Then
    resets the peak (Linux's clear_refs 5), so that `peak_rss_mb` is the long-context work's
    own: the generate calls, with the model resident."""
    figures = {"load_peak_rss_mb": status_mb("VmHWM"), "rss_after_load_mb": status_mb("VmRSS")}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return figures


def clocked(start: float, times: list[float], tokens: list[int]) -> dict:
    """One call's figures from the times each new token reached the host."""
    return {"prefill_s": times[0] - start, "tokens": tokens,
            "decode_tokens_per_s": (len(times) - 1) / (times[-1] - times[0])
            if len(times) > 1 else None}


def run_ours(folder: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import jax

    import qwen2_jax
    from qwen2_jax.decoding import bucket

    jax.devices()
    config, params = qwen2_jax.load(folder, dtype="float32")
    jax.block_until_ready(params)
    result = after_load()
    runs = []
    for ids in prompts:
        times: list[float] = []
        start = time.perf_counter()
        (tokens,) = qwen2_jax.generate(
            config, params, [ids], max_new_tokens=new_tokens,
            on_tokens=lambda *_, times=times: times.append(time.perf_counter()),
            prefill_chunk=PREFILL_CHUNK)
        runs.append(clocked(start, times, tokens))
    slots = bucket(max(map(len, prompts)) + new_tokens)
    result.update(
        runs=runs,
        param_bytes=sum(x.nbytes for x in jax.tree.leaves(params)),
        kv_cache_bytes=2 * config.num_hidden_layers * slots * config.num_key_value_heads
        * config.head_size * 4)
    return result


def run_transformers(folder: str, prompts: list[list[int]], new_tokens: int) -> dict:
    import torch
    from transformers import Qwen2ForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        """Records when generate hands over the prompt (first), then each new token."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                             attn_implementation="sdpa").eval()
    with torch.no_grad():  # from_pretrained maps the file lazily: read every weight now
        sum(float(p.sum()) for p in model.parameters())
    model.generation_config.eos_token_id = None  # decode every token, as ours without stops
    result = after_load()
    runs = []
    for ids in prompts:
        clock = Clock()
        batch = torch.tensor([ids])
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(batch, attention_mask=torch.ones_like(batch), do_sample=False,
                                 max_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
        runs.append(clocked(start, clock.times[1:], out[0, len(ids):].tolist()))
    result.update(runs=runs, threads=torch.get_num_threads())
    return result


def yarn_perplexity(folder: str) -> dict:
    """Perplexity of the real model on the first PERPLEXITY_TOKENS tokens of Python's
    textwrap.py (fixed English and code), computed by `qwen2-jax eval`'s own scoring function
    with one window: plain RoPE; static YaRN factor 4 (what transformers and vLLM do with
    Qwen2.5's long-context config, at every length); dynamic YaRN (`eval --yarn dynamic`),
    s = clip(tokens / 32768, 1, 4) = 1 at this length, so it should equal plain: the point
    of dynamic YaRN.
    """
    import textwrap

    import jax.numpy as jnp
    import numpy as np

    import qwen2_jax
    from qwen2_jax.commands.evaluate import (
        perplexity_nll,
        score_windows,
        window_batches,
        windows,
    )
    from qwen2_jax.rope import dynamic_yarn_scale
    from qwen2_jax.tokenizer import Tokenizer

    config, params = qwen2_jax.load(folder, dtype="float32")
    with open(textwrap.__file__, encoding="utf-8") as f:
        tokens = np.asarray(Tokenizer(folder).encode(f.read())[:PERPLEXITY_TOKENS])
    spans = windows(len(tokens), len(tokens), len(tokens))  # one window, every token scored
    batch = next(window_batches(tokens, spans, len(tokens), 1))

    def perplexity(config, rope_scale=None) -> float:
        nll = score_windows(config, jnp.float32, None, (), params, *batch, rope_scale)
        return math.exp(perplexity_nll(spans, [float(nll[0])]))

    yarn = dataclasses.replace(config, rope_scaling=YARN)
    scale = dynamic_yarn_scale(yarn, [len(tokens)])
    return {"text": f"textwrap.py of Python {sys.version.split()[0]}", "tokens": len(tokens),
            "plain": perplexity(config), "static_yarn": perplexity(yarn),
            "dynamic_yarn": perplexity(yarn, jnp.asarray(scale)),
            "dynamic_rope_scale": float(scale[0])}


def child(job: str, spec_file: str) -> None:
    """Runs one job in this process and prints its JSON line."""
    with open(spec_file) as f:
        spec = json.load(f)
    if job == "yarn_perplexity":
        result = yarn_perplexity(spec["folder"])
    else:
        run = run_ours if job == "qwen2_jax" else run_transformers
        result = run(spec["folder"], spec["prompts"], spec["new_tokens"])
    result["peak_rss_mb"] = status_mb("VmHWM")
    print(json.dumps(result))


def measure(job: str, spec: dict, root: str, timeout: float | None = None) -> dict:
    """`job` in a fresh process; its result, or {"error": why} when it failed or ran out of
    time (a length that does not fit in memory is killed, and the run goes on)."""
    spec_file = os.path.join(root, "spec.json")
    with open(spec_file, "w") as f:
        json.dump(spec, f)
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, __file__, "--child", job, spec_file],
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"stopped after {timeout} s"}
    if done.returncode != 0:
        why = (f"killed by signal {-done.returncode} (out of memory?)" if done.returncode < 0
               else (done.stderr.strip().splitlines() or ["exit status"])[-1][-300:])
        return {"error": why}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["job_s"] = time.perf_counter() - start
    return result


# ----- the parent: prompts, jobs, report ---------------------------------------------------

def passkey_prompt(tokenizer, budget: int, depth: float, key: int) -> list[int]:
    """The chat-rendered passkey prompt with the most whole filler sentences that keep it
    within `budget` tokens, the key line after `depth` of them."""
    def render(count: int) -> list[int]:
        sentences = [FILLER[i % len(FILLER)] for i in range(count)]
        cut = round(depth * count)
        text = "\n".join([TASK, " ".join(sentences[:cut]), KEY_LINE.format(key=key),
                          " ".join(sentences[cut:]), QUESTION])
        return tokenizer.encode(tokenizer.apply_chat_template([{"role": "user",
                                                                "content": text}]))

    per_sentence = (len(render(100)) - len(render(0))) / 100
    count = max(0, int((budget - len(render(0))) / per_sentence))
    while count and len(render(count)) > budget:
        count -= 1
    while len(render(count + 1)) <= budget:
        count += 1
    ids = render(count)
    if len(ids) > budget:
        raise ValueError(f"a passkey prompt needs {len(ids)} tokens; the budget is {budget}")
    return ids


def answer(tokenizer, tokens: list[int]) -> tuple[str, int | None]:
    """The text before the first stop token, and its first integer (None if it has none)."""
    stops = {tokenizer.token_id(t) for t in STOP_TOKENS}
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    text = tokenizer.decode(tokens[:end], skip_special_tokens=True)
    number = re.search(r"\d+", text)
    return text, None if number is None else int(number.group())


def summary(result: dict, prompt_tokens: int) -> dict:
    """Per-length figures of one library: medians over the depths. Prefill: over the calls
    after the first (ours compiles in its first), unless there is only one
    (`prefill_includes_first_call`)."""
    if "error" in result:
        return result
    runs = result["runs"]
    prefill = statistics.median(r["prefill_s"] for r in runs[1:] or runs)
    out = {"prefill_s": round(prefill, 2),
           "prefill_tokens_per_s": round(prompt_tokens / prefill, 1),
           "prefill_s_each": [round(r["prefill_s"], 2) for r in runs],
           "prefill_includes_first_call": len(runs) == 1,
           "decode_tokens_per_s": round(statistics.median(r["decode_tokens_per_s"]
                                                          for r in runs), 2)}
    for key in ("peak_rss_mb", "load_peak_rss_mb", "rss_after_load_mb"):
        out[key] = round(result[key], 1)
    if "param_bytes" in result:
        bound = (result["param_bytes"] + result["kv_cache_bytes"] + RSS_SLACK) / 2**20
        out.update(kv_cache_mb=round(result["kv_cache_bytes"] / 2**20, 1),
                   rss_bound_mb=round(bound, 1), rss_bound_ok=result["peak_rss_mb"] <= bound)
    return out


def ratio(ours: dict, theirs: dict | None, key: str, higher_is_better: bool) -> float | None:
    """How many times better ours is at `key` (None when either side has no figure)."""
    if not theirs or key not in ours or key not in theirs:
        return None
    a, b = ours[key], theirs[key]
    return round(a / b if higher_is_better else b / a, 3)


def parse_length(text: str) -> int:
    """'4K' -> 4096, '131072' -> 131072."""
    text = text.strip().upper()
    return int(text[:-1]) * 1024 if text.endswith("K") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Prints one JSON line. See the module docstring for what each figure means.")
    parser.add_argument("--lengths", default="4K,8K,16K",
                        type=lambda s: [parse_length(x) for x in s.split(",")],
                        help="context lengths for the real model's passkey prompts, prefill and "
                        "decode, comma-separated; K = 1024 (default 4K,8K,16K)")
    parser.add_argument("--depths", default="0.1,0.5,0.9",
                        type=lambda s: [float(x) for x in s.split(",")],
                        help="where the key sits in the filler, as fractions (default "
                        "0.1,0.5,0.9)")
    parser.add_argument("--new-tokens", type=int, default=16,
                        help="tokens decoded per prompt, in the real and the tiny model; the "
                        "answer '12345' alone is 5 tokens (default 16)")
    parser.add_argument("--skip-transformers", action="store_true",
                        help="measure qwen2-jax only (no export, no ratios or agreement)")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: lengths 1K,2K, depth 0.5, tiny at 8K (a few minutes)")
    parser.add_argument("--child", nargs=2, metavar=("JOB", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    lengths, depths, tiny_length = args.lengths, args.depths, TINY_LENGTH
    if args.quick:
        lengths, depths, tiny_length = [1024, 2048], [0.5], 8192
    n = args.new_tokens
    if n < 2:
        parser.error("--new-tokens must be at least 2 (decode speed is timed between tokens)")
    if not all(0 <= d <= 1 for d in depths) or min(lengths) <= n:
        parser.error("--depths must be fractions in [0, 1] and --lengths longer than "
                     "--new-tokens")
    libraries = ["qwen2_jax"] + ([] if args.skip_transformers else ["transformers"])

    import numpy as np

    import qwen2_jax
    from qwen2_jax.embedded import NAME
    from qwen2_jax.tokenizer import Tokenizer

    folder = qwen2_jax.default_model()
    tokenizer = Tokenizer(folder)
    chunk = PREFILL_CHUNK
    report: dict = {"bench": "long_context", "model": NAME, "dtype": "float32",
                    "new_tokens": n, "depths": depths, "prefill_chunk": chunk, "lengths": {}}
    passkeys = []
    with tempfile.TemporaryDirectory() as root:
        hf, tiny = os.path.join(root, "hf"), os.path.join(root, "tiny")
        if not args.skip_transformers:
            from qwen2_jax.convert.orbax_to_hf import export

            export(folder, hf, progress=False)
        write_tiny(tiny)
        folders = {"qwen2_jax": folder, "transformers": hf}

        for length in lengths:
            entries = [{"length": length, "depth": depth,
                        "key": random.Random(f"{length}:{depth}").randint(10000, 99999)}
                       for depth in depths]
            prompts = [passkey_prompt(tokenizer, length - n, e["depth"], e["key"])
                       for e in entries]
            prompt_tokens = max(map(len, prompts))
            row: dict = {"prompt_tokens": prompt_tokens}
            for library in libraries:
                result = measure(library, {"folder": folders[library], "prompts": prompts,
                                           "new_tokens": n}, root)
                row[library] = summary(result, prompt_tokens)
                for entry, run in zip(entries, result.get("runs") or [None] * len(entries),
                                      strict=True):
                    entry[library] = None if run is None else answer(tokenizer, run["tokens"])
            passkeys.extend(entries)
            theirs = row.get("transformers")
            row["prefill_ratio"] = ratio(row["qwen2_jax"], theirs, "prefill_s", False)
            row["decode_ratio"] = ratio(row["qwen2_jax"], theirs, "decode_tokens_per_s", True)
            report["lengths"][str(length)] = row

        tiny_prompt = np.random.default_rng(0).integers(0, TINY["vocab_size"],
                                                        tiny_length - n).tolist()
        report["tiny"] = {"length": tiny_length}
        for library in libraries:
            result = measure(library, {"folder": tiny, "prompts": [tiny_prompt],
                                       "new_tokens": n}, root,
                             TINY_TIMEOUT_S if library == "transformers" else None)
            report["tiny"][library] = summary(result, len(tiny_prompt))
        report["yarn_perplexity"] = measure("yarn_perplexity", {"folder": folder}, root)

    report["passkey"] = passkey_report(passkeys, libraries)
    report["targets"] = targets(report, lengths)
    print(json.dumps(report))


def write_tiny(folder: str) -> None:
    """The tiny random model, written by transformers (both libraries read this folder)."""
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM

    import qwen2_jax

    torch.manual_seed(0)
    config = HFQwen2Config.from_dict(qwen2_jax.Qwen2Config(**TINY).to_hf())
    Qwen2ForCausalLM(config).save_pretrained(folder)


def passkey_report(passkeys: list[dict], libraries: list[str]) -> dict:
    """Found rates and agreement. An answer is (text, first integer); a library whose job
    failed at a length has None there, which counts as not found and as disagreeing."""
    out: dict = {"prompts": len(passkeys)}
    for library in libraries:
        found = [e[library] is not None and e[library][1] == e["key"] for e in passkeys]
        out[f"{library}_found_rate"] = round(sum(found) / len(passkeys), 3)
    if "transformers" in libraries:
        same = [e["qwen2_jax"] is not None and e["transformers"] is not None
                and e["qwen2_jax"][1] == e["transformers"][1] for e in passkeys]
        out["agreement"] = round(sum(same) / len(passkeys), 3)
    out["answers"] = [{"length": e["length"], "depth": e["depth"], "key": e["key"],
                       **{library: None if e[library] is None else e[library][0]
                          for library in libraries}} for e in passkeys]
    return out


def targets(report: dict, lengths: list[int]) -> dict:
    """Issue 17's targets, each True/False; None when transformers has no figure to compare
    with (skipped or failed). A length at which ours failed fails every target there."""
    rows = report["lengths"]
    prefill_at = [x for x in lengths if x >= 8192] or [max(lengths)]
    longest = max(lengths)

    def beats(length: int, key: str, factor: float) -> bool | None:
        row = rows[str(length)]
        if "error" in row["qwen2_jax"]:
            return False
        return None if row[key] is None else row[key] >= factor

    prefill = [beats(x, "prefill_ratio", 1.0) for x in prefill_at]
    return {
        "rss_bound_ok": {str(x): rows[str(x)]["qwen2_jax"].get("rss_bound_ok", False)
                         for x in lengths},
        "prefill_ge_1x_at": prefill_at,
        "prefill_ge_1x": False if False in prefill else None if None in prefill else True,
        "decode_ge_1.2x_at": longest,
        "decode_ge_1.2x": beats(longest, "decode_ratio", 1.2),
        "tiny_completes": "error" not in report["tiny"]["qwen2_jax"],
        "passkey_agreement_100": None if "agreement" not in report["passkey"]
        else report["passkey"]["agreement"] == 1.0,
    }


if __name__ == "__main__":
    main()
