"""The `qwen2-jax` subcommands: one module each, with `NAME`, `add_parser(subparsers)` (its
flags and --help beside its code) and `run(args) -> exit code`. cli.py only dispatches."""

from qwen2_jax.commands import (
    chat,
    convert,
    demo,
    dpo,
    evaluate,
    export,
    generate,
    merge,
    serve,
    sft,
    tokenize,
)

COMMANDS = (demo, convert, export, merge, generate, chat, serve, evaluate, tokenize, sft,
            dpo)
