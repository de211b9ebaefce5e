"""The flags and the run wrapper that `sft` and `dpo` share (train/trainer.py's TrainArgs)."""

from __future__ import annotations

import argparse
import json

from qwen2_jax.commands.common import (
    DTYPE_CHOICES,
    MODEL_HELP,
    RunFailed,
    add_mesh_args,
    mesh_from_args,
    model_path,
    require_path,
    run_guarded,
    stage,
)

TRAIN_OUTPUT = ("Saves Orbax checkpoints in OUT/checkpoints every --save-every steps and at the "
                "end (the last --keep), and writes the trained model to OUT/final, which load, "
                "generate and export accept. --resume continues from the latest checkpoint "
                "exactly. An OUT that already holds a run is refused unless --resume or "
                "--overwrite; other files in OUT are never touched. A non-finite loss stops the "
                "run (exit 1) and keeps the last good checkpoint.")
REMAT_CHOICES = ("none", "full", "dots", "dots_no_batch")  # model.REMAT_POLICIES
LOWER = "--batch-size (raise --grad-accum to keep the global batch) or --max-len, use --remat " \
        "full, or spread the model over more devices with --mesh"
TRAIN_FIELDS = ("model", "data", "out", "eval_data", "max_len", "skip_bad_lines", "batch_size",
                "grad_accum", "lr", "warmup", "decay", "weight_decay", "clip_norm", "epochs",
                "steps", "save_every", "keep", "seed", "resume", "overwrite", "allow_long",
                "remat", "compute_dtype", "lora_rank", "lora_alpha", "lora_dropout",
                "lora_targets", "rslora", "quantize")


def add_train_args(parser: argparse.ArgumentParser, unit: str, max_len: int, lr: float) -> None:
    """The flags sft and dpo share (TrainArgs)."""
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="training JSONL (UTF-8), or a folder written by `qwen2-jax "
                        "tokenize` from it (memory-mapped, for data too large to tokenize at "
                        "each start; the same losses; its length flags must be this run's)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--eval-data", metavar="PATH",
                        help="JSONL or tokenize folder evaluated at every save")
    parser.add_argument("--max-len", type=int, default=None,
                        help=f"tokens per sequence (default {max_len}, or the model's "
                        "max_position_embeddings if smaller; past it is refused unless "
                        "--allow-long)")
    parser.add_argument("--allow-long", action="store_true",
                        help="allow --max-len past the model's max_position_embeddings (warned)")
    add_reading_args(parser)
    parser.add_argument("--batch-size", type=int, default=8,
                        help=f"{unit} per micro-batch (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1,
                        help="micro-batches per step (default 1)")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps (default 0)")
    parser.add_argument("--decay", choices=("cosine", "linear"), default="cosine",
                        help="learning-rate decay after warmup, to 0 (default cosine)")
    parser.add_argument("--weight-decay", type=float, default=0.0,
                        help="AdamW weight decay (default 0)")
    parser.add_argument("--clip-norm", type=float, default=1.0,
                        help="global-norm gradient clipping (default 1.0)")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1, help="passes over the data (default 1)")
    length.add_argument("--steps", type=int, default=None,
                        help="optimizer steps in all (instead of --epochs)")
    parser.add_argument("--save-every", type=int, default=100,
                        help="checkpoint interval in steps (default 100)")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="data order seed")
    out = parser.add_mutually_exclusive_group()
    out.add_argument("--resume", action="store_true",
                     help="continue OUT's run from its last checkpoint (same model and shape "
                     "flags)")
    out.add_argument("--overwrite", action="store_true",
                     help="start afresh in an OUT that holds a run: its checkpoints, "
                     "metrics.jsonl and final/ are removed once training starts")
    parser.add_argument("--remat", choices=REMAT_CHOICES, default="none",
                        help="what the backward pass recomputes instead of storing (default "
                        "none; full saves the most memory)")
    parser.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default="float32",
                        help="matmul dtype (master weights stay float32); bfloat16 on "
                        "accelerators")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_lora_args(parser)
    add_mesh_args(parser)


def add_reading_args(parser: argparse.ArgumentParser) -> None:
    """How JSONL lines that do not fit are handled (train/data.py), for sft, dpo and tokenize."""
    parser.add_argument("--drop-long", action="store_true",
                        help="drop examples longer than --max-len (default: truncate); counted")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed lines instead of stopping at the first")


def add_lora_args(parser: argparse.ArgumentParser) -> None:
    """LoRA: train adapters on a frozen base instead of every weight (train/trainer.py)."""
    from qwen2_jax.lora import TARGETS

    group = parser.add_argument_group(
        "LoRA", "train low-rank adapters only (PEFT's LoRA); OUT/final is then a PEFT adapter "
        "folder that peft, `load(adapter=)`, `merge` and `serve --lora` read")
    group.add_argument("--lora-rank", type=int, default=None, metavar="R",
                       help="adapter rank; enables LoRA (default: full fine-tune)")
    group.add_argument("--lora-alpha", type=float, default=8.0, metavar="A",
                       help="scaling alpha: updates are scaled by alpha / R (default 8, PEFT's)")
    group.add_argument("--lora-dropout", type=float, default=0.0, metavar="P",
                       help="dropout on each adapter's input (default 0)")
    group.add_argument("--lora-targets", default=",".join(TARGETS), metavar="NAMES",
                       help=f"comma-separated projections to adapt (default {','.join(TARGETS)})")
    group.add_argument("--rslora", action="store_true",
                       help="rank-stabilized LoRA: scale by alpha / sqrt(R)")
    group.add_argument("--quantize", choices=("int8",), default=None,
                       help="keep the frozen base int8 (QLoRA-style; needs --lora-rank)")


def run_training(args: argparse.Namespace, args_class, run, fields: tuple[str, ...]) -> int:
    """Builds args_class from the flags and runs `run(options, mesh, rules)`, printing its
    summary as one JSON line."""

    def train() -> int:
        import jax

        from qwen2_jax import sharding
        from qwen2_jax.train.trainer import TrainingFailed

        args.model = model_path(args.model)
        require_path("--data", args.data, "JSONL file or tokenize folder")
        require_path("--eval-data", args.eval_data, "JSONL file or tokenize folder")
        # with --reference-free, --ref-model is the error to report
        if getattr(args, "ref_model", None) is not None and not args.reference_free:
            args.ref_model = model_path(args.ref_model, "--ref-model")
        mesh, rules = mesh_from_args(args)
        if mesh is None and jax.process_count() > 1:  # a job's processes share one mesh
            mesh = sharding.make_mesh()
        options = args_class(**{k: getattr(args, k) for k in fields},
                             overflow="drop" if args.drop_long else "truncate",
                             progress=not args.no_progress)
        micro = f"{args.batch_size} x {args.max_len or 'max-len'}"
        try:
            with stage(f"training (micro-batches of {micro} tokens)"):
                print(json.dumps(run(options, mesh, rules)))
        except TrainingFailed as e:
            raise RunFailed(str(e)) from None
        return 0

    return run_guarded(args.command, train, LOWER)
