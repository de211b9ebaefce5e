"""The `qwen2-jax` command: parses the subcommand and hands over to its module in
qwen2_jax/commands/."""

from __future__ import annotations

import argparse
import logging
import sys

from qwen2_jax.commands import COMMANDS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen2-jax",
        description="Qwen2 in JAX/Flax: the same model as Hugging Face transformers' Qwen2. "
        "Exit codes: 0 done, 2 a usage or input error, 1 a failure while running, 130 Ctrl-C.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", force=True)
    logging.getLogger("qwen2_jax").setLevel(logging.INFO)
    # Orbax logs a failed background write with its whole TensorStore spec; we report it.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    return {c.NAME: c for c in COMMANDS}[args.command].run(args)


if __name__ == "__main__":
    sys.exit(main())
