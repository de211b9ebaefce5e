"""`qwen2-jax convert`: a Hugging Face safetensors folder -> our Orbax checkpoint folder."""

from __future__ import annotations

import argparse
import json
import sys

from qwen2_jax.commands.common import (
    DTYPE_CHOICES,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    mesh_from_args,
    quantize_from_args,
    require_path,
    run_guarded,
)

NAME = "convert"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="Hugging Face safetensors folder or GGUF file -> Orbax checkpoint folder",
        description="Writes a Hugging Face Qwen2 folder (config.json + *.safetensors), or a "
        "llama.cpp GGUF file (qwen2, qwen2moe; dequantized to float32 as transformers does, "
        "with config.json, tokenizer.json and the chat template from its metadata), as an Orbax "
        "checkpoint folder: params/ (the parameter pytree, Orbax), config.json, the tokenizer "
        "and generation files the source has, and qwen2_jax.json (format version, dtype, "
        "source). Streams: each chunk is read, transposed, cast and written in turn, so memory "
        "holds a few chunks (4 MiB each at most), never the model. Everything goes into a "
        "hidden temporary folder beside OUT_DIR, renamed to OUT_DIR when complete; on an error, "
        "Ctrl-C or SIGTERM it is removed. Prints one JSON line. With --quantize the folder "
        "holds the weight-only quantized params (int8: half of bfloat16's bytes, int4: a "
        "quarter), which every command then loads as they are; the source is read and "
        "quantized one parameter at a time, so memory holds the quantized model and one float "
        "parameter (not the streaming of a float conversion, and no --mesh).")
    parser.add_argument("hf_dir", metavar="SOURCE",
                        help="Hugging Face model folder, or a .gguf file")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="Orbax checkpoint folder to write")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="storage dtype (default: the source's; float32 for GGUF)")
    add_output_args(parser)
    add_quantize_args(parser, kv_cache=False, when="Written quantized into OUT_DIR (--dtype: "
                      "the storage of the parameters that stay float), which every command "
                      "then loads as it is.")
    add_mesh_args(parser, processes=False,
                  mesh_help="write chunks no larger than this mesh's shards, so that a restore "
                  "onto it reads only what each device holds (a mesh over this process's "
                  "devices; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N)")


def add_output_args(parser: argparse.ArgumentParser) -> None:
    """--force, --verify and --no-progress, shared with export."""
    parser.add_argument("--force", action="store_true",
                        help="replace OUT if it is a model folder (ours, or config.json with "
                        "weights), only once the new one is complete; any other folder, the "
                        "source and a folder holding or inside the source are never replaced")
    parser.add_argument("--verify", action="store_true",
                        help="afterwards, run the same prompt through the source and the written "
                        "checkpoint (qwen2-jax's loader for both, same dtype; with --quantize "
                        "the source quantized as it loads) and report the max logit "
                        "difference; exit 1 unless it is 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def report(args: argparse.Namespace, summary: dict, source: str, written: str, mesh=None,
           rules=None, quantize: dict | None = None) -> int:
    """Prints the summary line (after --verify's comparison); 1 if verify found a difference.
    quantize: load's quantize keywords for the source (a quantized conversion is faithful when
    it equals the source quantized at load time)."""
    if args.verify:
        from qwen2_jax.convert.verify import max_logit_difference

        difference = max_logit_difference(source, written, summary["dtype"], mesh, rules,
                                          **(quantize or {}))
        summary["verify"] = {"max_abs_logit_diff": difference, "ok": difference == 0.0}
    print(json.dumps(summary))
    if args.verify and not summary["verify"]["ok"]:
        print(f"qwen2-jax {args.command}: verify failed: {written} gives logits up to "
              f"{summary['verify']['max_abs_logit_diff']:.3g} away from {source}'s",
              file=sys.stderr)
        return 1
    return 0


def run(args: argparse.Namespace) -> int:
    def convert() -> int:
        from qwen2_jax.checkpoint.to_orbax import write_orbax as convert
        from qwen2_jax.checkpoint.to_orbax import write_quantized

        quantize = quantize_from_args(args)
        if args.quantize is not None and args.mesh is not None:
            raise UsageError("--mesh is not supported with --quantize: a quantized folder is "
                             "written in whole parameters; leave out --mesh (any mesh can "
                             "still load it)")
        require_path("SOURCE", args.hf_dir, "Hugging Face model folder or .gguf file")
        if args.quantize is not None:
            summary = write_quantized(args.hf_dir, args.out_dir, args.quantize,
                                      args.quantize_embeddings, args.dtype, args.force)
            return report(args, summary, args.hf_dir, args.out_dir, quantize=quantize)
        mesh, rules = mesh_from_args(args)
        summary = convert(args.hf_dir, args.out_dir, args.dtype, mesh, rules, args.force,
                          progress=not args.no_progress)
        return report(args, summary, args.hf_dir, args.out_dir, mesh, rules)

    return run_guarded(NAME, convert, "nothing: convert streams; free memory on this machine",
                       cleaned="; removed the partial output")
