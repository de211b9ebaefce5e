"""`qwen2-jax merge`: a base model and a PEFT LoRA adapter -> one model with the adapter folded in."""

from __future__ import annotations

import argparse
import json
import os
import time

from qwen2_jax.commands.common import (
    DTYPE_CHOICES,
    MODEL_HELP,
    model_path,
    require_path,
    run_guarded,
    stage,
)

NAME = "merge"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="fold a LoRA adapter into its base model",
        description="Loads the base model, adds scale * A @ B of every adapted projection of a "
        "PEFT LoRA adapter folder (adapter_config.json, adapter_model.safetensors: from "
        "`sft`/`dpo --lora-rank`, or from peft) to its kernel in float32, and writes an Orbax "
        "checkpoint folder that load, generate, serve and `export` (to Hugging Face "
        "safetensors) accept, with the base's config and tokenizer files. The result runs at "
        "the base's speed; to keep several adapters beside one base instead, use `serve "
        "--lora` or `load(path, adapter=DIR)`. Written into a temporary folder renamed when "
        "complete. Prints one JSON line.")
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--adapter", required=True, metavar="DIR",
                        help="PEFT LoRA adapter folder")
    parser.add_argument("out", metavar="OUT", help="Orbax checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="float32",
                        help="dtype of the merged weights (default float32)")
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a model folder, once the new one is complete")


def run(args: argparse.Namespace) -> int:
    def merge() -> int:
        import qwen2_jax
        from qwen2_jax import lora
        from qwen2_jax.checkpoint.output import check_replaceable
        from qwen2_jax.train.trainer import write_params

        start = time.perf_counter()
        args.model = model_path(args.model)
        require_path("--adapter", args.adapter, "PEFT adapter folder")
        check_replaceable(args.out, args.force, (args.model, args.adapter))
        config = qwen2_jax.Qwen2Config.from_file(args.model)
        settings, adapters = lora.load_adapter(args.adapter, config)
        with stage("loading the base"):
            _, params = qwen2_jax.load(args.model, dtype=args.dtype)
        merged = lora.merge(config, params, adapters, settings)
        del params
        write_params(args.out, merged, args.model, force=args.force, guard_source=True,
                     merged_adapter=os.path.abspath(args.adapter))
        print(json.dumps({"out": os.path.abspath(args.out), "dtype": args.dtype,
                          "adapter": {"r": settings.rank, "alpha": settings.alpha,
                                      "targets": list(settings.targets),
                                      "rslora": settings.rslora},
                          "seconds": round(time.perf_counter() - start, 3)}))
        return 0

    return run_guarded(NAME, merge, "nothing: merge holds the base model once; free memory",
                       cleaned="; removed the partial output")
