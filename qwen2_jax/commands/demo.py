"""`qwen2-jax demo`: the embedded real model answers a chat question, streamed, then one JSON
line: speed, and whether the greedy tokens equal transformers' on the same GGUF weights (when
transformers and gguf are installed). `--tiny` runs the old end-to-end check on a tiny random
model instead (commands/tiny_demo.py)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from qwen2_jax.commands.common import (
    MESH_HELP,
    MODEL_HELP,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    mesh_from_args,
    model_path,
    quantize_from_args,
    run_guarded,
    stage,
)

NAME = "demo"
QUESTION = ("Write a Python function that checks whether a string is a palindrome, ignoring "
            "case and punctuation. Keep it short.")
STOPS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="the embedded real model answers a chat question (or --tiny: a parity check)",
        description="Loads the embedded Qwen2.5-Coder-0.5B-Instruct (the model extra; converted "
        "from its GGUF file into the cache on first use), answers a chat question greedily with "
        "the text streamed, and prints one JSON line: prompt and answer tokens, seconds, decode "
        "tokens/s, and generate_matches_transformers (the same greedy tokens from transformers' "
        "own dequantization of the same file; null when transformers is not installed or with "
        "--no-compare). --tiny instead builds a tiny random Qwen2 with transformers and compares "
        "logits and a chat turn (needs the test extra); exit 1 if they differ. With --quantize "
        "or --kv-cache-dtype int8 (or a folder from `convert --quantize`) the comparison is "
        "skipped (null): transformers runs the float weights, whose tokens may differ.",
        epilog=MESH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--question", default=QUESTION, help="the user message")
    parser.add_argument("--max-new-tokens", type=int, default=200, metavar="N",
                        help="answer length at most (default 200)")
    parser.add_argument("--no-compare", action="store_true",
                        help="skip the comparison with transformers (it loads the GGUF file "
                        "again, about 2 minutes on 2 CPU cores)")
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny random-model parity check instead of the real model")
    parser.add_argument("--seed", type=int, default=0, help="--tiny: seed (default 0)")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="--tiny: keep the tiny checkpoint in DIR")
    add_quantize_args(parser)
    add_mesh_args(parser)


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _demo(args), "--max-new-tokens, or use --mesh")


def _demo(args: argparse.Namespace) -> int:
    quantize_from_args(args)
    quantized = args.quantize is not None or args.kv_cache_dtype != "auto"
    if args.tiny and quantized:
        raise UsageError("--tiny checks float parity with transformers; it takes no "
                         "--quantize or --kv-cache-dtype")
    mesh, rules = mesh_from_args(args)
    if args.tiny:
        from qwen2_jax.commands.tiny_demo import compare

        report = compare(args.seed, args.out, mesh=mesh, rules=rules)
        print(json.dumps(report, ensure_ascii=False))
        return 0 if report["ok"] else 1
    report = _answer(args, mesh, rules)
    print(json.dumps(report, ensure_ascii=False))
    return 0 if report["generate_matches_transformers"] is not False else 1


def _answer(args: argparse.Namespace, mesh, rules) -> dict:
    import qwen2_jax
    from qwen2_jax.quantize import quantization_of
    from qwen2_jax.tokenizer import StreamDecoder, Tokenizer

    folder = model_path(args.model)
    tokenizer = Tokenizer(folder)
    prompt = tokenizer.encode(tokenizer.apply_chat_template(
        [{"role": "user", "content": args.question}]))
    with stage("loading the model"):
        start = time.perf_counter()
        config, params = qwen2_jax.load(folder, mesh=mesh, rules=rules,
                                        **quantize_from_args(args))
        load_s = time.perf_counter() - start
    # transformers runs float weights and a float cache: not comparable token for token.
    quantized = quantization_of(params) is not None or args.kv_cache_dtype != "auto"
    stream, times = StreamDecoder(tokenizer), []
    print(f">>> {args.question}", flush=True)

    def on_tokens(tokens, live):
        times.append(time.perf_counter())
        if live[0]:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    start = time.perf_counter()
    with stage("generating"):
        (tokens,) = qwen2_jax.generate(config, params, [prompt], args.max_new_tokens,
                                       stop_token_ids=list(STOPS), vocab_size=len(tokenizer),
                                       mesh=mesh, rules=rules, on_tokens=on_tokens,
                                       kv_cache_dtype=args.kv_cache_dtype)
    seconds = time.perf_counter() - start
    sys.stdout.write(stream.flush() + "\n")
    decode = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else None
    return {"model": folder, "prompt_tokens": len(prompt), "answer_tokens": len(tokens),
            "load_s": round(load_s, 2), "generate_s": round(seconds, 2),
            "decode_tokens_per_s": decode and round(decode, 1),
            "quantize": quantization_of(params), "kv_cache_dtype": args.kv_cache_dtype,
            "generate_matches_transformers": None if args.no_compare or quantized else
            _matches_transformers(folder, prompt, tokens, args.max_new_tokens)}


def _matches_transformers(folder: str, prompt: list[int], tokens: list[int],
                          max_new_tokens: int) -> bool | None:
    """Whether transformers, from its own dequantization of the model's GGUF file, generates
    the same greedy tokens; None when it cannot run here (not installed, or not a GGUF model)."""
    import os

    from qwen2_jax.checkpoint.orbax_io import read_metadata

    source = read_metadata(folder).get("source", "")
    try:
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    if not source.endswith(".gguf") or not os.path.isfile(source):
        return None
    print("comparing with transformers (it dequantizes the GGUF file itself)...",
          file=sys.stderr, flush=True)
    directory, name = os.path.split(source)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                 dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=list(STOPS), pad_token_id=STOPS[1])
    reference = [t for t in out[0, len(prompt):].tolist() if t not in STOPS]
    return reference == tokens
