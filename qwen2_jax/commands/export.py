"""`qwen2-jax export`: our Orbax checkpoint folder -> a Hugging Face safetensors folder."""

from __future__ import annotations

import argparse

from qwen2_jax.commands.common import DTYPE_CHOICES, require_path, run_guarded
from qwen2_jax.commands.convert import add_output_args, report

NAME = "export"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="Orbax checkpoint folder -> Hugging Face safetensors folder",
        description="Writes an Orbax checkpoint folder (from `qwen2-jax convert` or training) as "
        "a Hugging Face folder that transformers' from_pretrained loads: safetensors with HF's "
        "tensor names and shapes (one file, or shards and model.safetensors.index.json past "
        "--max-shard-size), config.json and the tokenizer files. Reads one layer's tensor at a "
        "time. Written into a temporary folder renamed when complete. Prints one JSON line.")
    parser.add_argument("orbax_dir", metavar="ORBAX_DIR", help="Orbax checkpoint folder")
    parser.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="safetensors dtype (default: the stored one)")
    parser.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB (10^9 bytes, as transformers), "
                        "2GiB, 500MB (default 5GB)")
    add_output_args(parser)


def run(args: argparse.Namespace) -> int:
    def export() -> int:
        from qwen2_jax.convert.orbax_to_hf import export

        require_path("ORBAX_DIR", args.orbax_dir, "checkpoint folder written by qwen2-jax")
        summary = export(args.orbax_dir, args.hf_dir, args.dtype, args.max_shard_size,
                         args.force, progress=not args.no_progress)
        return report(args, summary, args.orbax_dir, args.hf_dir)

    return run_guarded(NAME, export, "nothing: export reads one tensor at a time; free memory",
                       cleaned="; removed the partial output")
