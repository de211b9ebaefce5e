"""The `qwen2-jax` command."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2-jax",
        description="Qwen2 in JAX/Flax: the same model as Hugging Face transformers' Qwen2.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="build a tiny random Qwen2 with transformers, load it here, compare logits",
        description="Builds a tiny random Qwen2 with transformers (14 query heads on 2 kv heads, "
        "tied embeddings, a sliding-window layer), saves it as safetensors, loads it with "
        "qwen2_jax.load, runs a left-padded ragged batch through qwen2_jax.forward and compares "
        "with transformers on each unpadded row. Prints one JSON line; exits 1 if the max "
        "absolute logit difference exceeds 1e-4. Needs the test extra (torch, transformers).",
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default 0)")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="keep the tiny checkpoint in DIR (default: a temporary folder)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from qwen2_jax import demo

        return demo.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
