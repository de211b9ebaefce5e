"""`qwen2-jax tokenize`: SFT or DPO JSONL -> memory-mapped token arrays that training reads."""

from __future__ import annotations

import argparse
import json
import os

from qwen2_jax.commands.common import (
    MODEL_HELP,
    UsageError,
    check_at_least,
    model_path,
    require_path,
    run_guarded,
)
from qwen2_jax.commands.training import add_reading_args

NAME = "tokenize"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="tokenize SFT or DPO JSONL once, for sft/dpo --data DIR",
        description="Reads JSONL as `sft` or `dpo` reads it (same formats, chat template, "
        "length limits, counts and errors) and writes OUT: tokens.npy, targets.npy (SFT) and "
        "offsets.npy, arrays that training reads a row at a time, and manifest.json (the "
        "format, the model's vocab_size and tokenizer hash, the flags below, the counts). The file is "
        "read line by line and the arrays written as it goes, so memory stays flat with its "
        "size. `sft --data OUT` or `dpo --data OUT` then trains on it with the same losses as "
        "on the JSONL file. They refuse (exit 2) a folder made for the other command, for a "
        "model with another vocab_size or tokenizer, or with other length flags: a folder "
        "made with --max-len 4096 is not cut to a run's --max-len 2048 but refused, unless no "
        "example reaches either length; give training the flags given here. A bad line stops "
        "with file:line and leaves no OUT; OUT appears complete or not at all. Prints the "
        "manifest as one JSON line.")
    parser.add_argument("--model", default=None, metavar="PATH",
                        help=MODEL_HELP + "; its tokenizer and chat template tokenize, its "
                        "vocab_size bounds the ids")
    parser.add_argument("--data", required=True, metavar="FILE", help="JSONL file (UTF-8)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="the folder to write; it must not exist")
    parser.add_argument("--format", choices=("sft", "dpo"), default=None,
                        help="the training command the data is for (default: from the first "
                        "line that is a JSON object: 'chosen' and 'rejected' make it dpo, "
                        "'messages' or 'prompt' sft)")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="tokens per sequence, as sft/dpo --max-len: give training the same "
                        "(default: theirs, 2048 for sft, 1024 for dpo, or the model's "
                        "max_position_embeddings if smaller)")
    add_reading_args(parser)
    parser.add_argument("--train-on-prompt", action="store_true",
                        help="sft: train on every token, not only the assistant's")
    parser.add_argument("--max-prompt-len", type=int, default=None, metavar="N",
                        help="dpo: keep only the last N prompt tokens (counted)")
    parser.add_argument("--workers", type=int, default=1, metavar="N",
                        help="processes that tokenize, each a chunk of lines at a time (default "
                        "1); the same output, up to N times faster on N free cores")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _tokenize(args), "--max-len",
                       cleaned="; removed the partial output")


def _tokenize(args: argparse.Namespace) -> int:
    from qwen2_jax.config import Qwen2Config
    from qwen2_jax.decoding import position_limit
    from qwen2_jax.train import token_store
    from qwen2_jax.train.dpo import DPOArgs
    from qwen2_jax.train.trainer import TrainArgs

    model = model_path(args.model)
    require_path("--data", args.data, "JSONL file")
    if os.path.isdir(args.data):
        raise UsageError(f"--data {args.data} is a folder; tokenize reads a JSONL file")
    if os.path.lexists(args.out):
        raise UsageError(f"--out {args.out} already exists; remove it or choose another folder")
    form = args.format or token_store.detect_format(args.data)
    if args.train_on_prompt and form != "sft":
        raise UsageError("--train-on-prompt applies to sft data")
    if args.max_prompt_len is not None and form != "dpo":
        raise UsageError("--max-prompt-len applies to dpo data")
    check_at_least(args, 1, "workers")
    config = Qwen2Config.from_file(model)
    default = (TrainArgs if form == "sft" else DPOArgs).DEFAULT_MAX_LEN
    max_len = min(default, position_limit(config)) if args.max_len is None else args.max_len
    if max_len < 2:
        raise UsageError(f"--max-len must be >= 2 (a token and the one it predicts), got "
                         f"{max_len}")
    if args.max_prompt_len is not None and not 0 < args.max_prompt_len < max_len:
        raise UsageError(f"--max-prompt-len must be in [1, --max-len), got "
                         f"{args.max_prompt_len}")
    flags = {"max_len": max_len, "overflow": "drop" if args.drop_long else "truncate",
             "train_on_prompt": args.train_on_prompt, "skip_bad_lines": args.skip_bad_lines,
             "max_prompt_len": args.max_prompt_len}
    settings = {name: flags[name] for name in token_store.SETTINGS[form]}
    manifest = token_store.write(args.data, args.out, model, config.vocab_size, form, settings,
                                 progress=not args.no_progress, workers=args.workers)
    print(json.dumps(manifest))
    return 0
