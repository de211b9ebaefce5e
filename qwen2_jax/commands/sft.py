"""`qwen2-jax sft`: supervised fine-tuning on chat JSONL."""

from __future__ import annotations

import argparse

from qwen2_jax.commands.common import MESH_HELP
from qwen2_jax.commands.training import TRAIN_FIELDS, TRAIN_OUTPUT, add_train_args, run_training

NAME = "sft"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="supervised fine-tuning on chat JSONL",
        description="Fine-tunes on JSONL lines {\"messages\": [...]} or {\"prompt\", "
        "\"completion\"}, rendered with the model's chat template; the loss is on assistant "
        "tokens only unless --train-on-prompt. Examples are packed several per row (attention "
        "never crosses them). Logs OUT/metrics.jsonl (step, loss, lr, grad_norm, tokens_per_s, "
        "eval_loss). " + TRAIN_OUTPUT,
        epilog=MESH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser, "rows", 2048, 1e-5)
    parser.add_argument("--train-on-prompt", action="store_true",
                        help="train on every token, not only the assistant's")


def run(args: argparse.Namespace) -> int:
    from qwen2_jax.train.sft import SFTArgs, run

    return run_training(args, SFTArgs, run, (*TRAIN_FIELDS, "train_on_prompt"))
