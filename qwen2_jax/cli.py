"""The `qwen2-jax` command."""

from __future__ import annotations

import argparse
import logging
import sys

MESH_HELP = """\
Parallelism (the same flags on every command that loads a model):
  --mesh data=2,fsdp=2,tensor=2   mesh axes data, fsdp, expert, tensor; -1 fills the rest
  --rules heads=,mlp=fsdp+tensor  override the logical-axis rules (empty value = replicate)
  Several processes (a TPU pod slice: --distributed on every host; one machine:
  --coordinator 127.0.0.1:PORT --num-processes N --process-id I) form one job whose mesh
  spans all their devices.
"""


DTYPE_CHOICES = ("float32", "bfloat16", "float16")


def add_mesh_args(parser: argparse.ArgumentParser, processes: bool = True,
                  mesh_help: str = "device mesh over all devices of all processes") -> None:
    """--mesh/--rules and (with processes) the multi-process flags, shared by every command
    that loads a model."""
    group = parser.add_argument_group("parallelism")
    group.add_argument("--mesh", metavar="SPEC", default=None,
                       help=f"{mesh_help}, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' (axes: "
                       "data, fsdp, expert, tensor; -1 fills the rest). Default: no mesh, one "
                       "device")
    group.add_argument("--rules", metavar="RULES", default=None,
                       help="overrides of the logical-axis rules, e.g. 'heads=,embed=fsdp' "
                       "(an empty value replicates). Defaults: batch=data+fsdp, vocab, heads, "
                       "kv_heads, mlp=tensor, embed=fsdp, expert=expert")
    if not processes:
        return
    group.add_argument("--distributed", action="store_true",
                       help="join a multi-host job found by JAX (TPU pod slice, SLURM); run the "
                       "same command on every host")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                       help="join a job coordinated at HOST:PORT (process 0 listens there); "
                       "needs --num-processes and --process-id")
    group.add_argument("--num-processes", type=int, default=None, metavar="N",
                       help="processes in the --coordinator job")
    group.add_argument("--process-id", type=int, default=None, metavar="I",
                       help="this process's id in the --coordinator job, 0 to N-1")


def mesh_from_args(args: argparse.Namespace):
    """Initializes multi-process JAX if asked; returns (mesh or None without --mesh, rules)."""
    from qwen2_jax import sharding

    explicit = tuple(getattr(args, k, None) for k in ("coordinator", "num_processes",
                                                      "process_id"))
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise SystemExit("qwen2-jax: --coordinator, --num-processes and --process-id go "
                             "together")
        sharding.initialize_distributed(*explicit)
    elif getattr(args, "distributed", False):
        sharding.initialize_distributed()
    if args.mesh is None and args.rules is not None:
        raise SystemExit("qwen2-jax: --rules needs --mesh")
    try:
        mesh = None if args.mesh is None else sharding.make_mesh(args.mesh)
        return mesh, sharding.resolve_rules(args.rules)
    except sharding.ShardingError as e:
        raise SystemExit(f"qwen2-jax: {e}") from None


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
        epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--seed", type=int, default=0, help="seed for weights and tokens (default 0)")
    demo.add_argument("--out", metavar="DIR", default=None,
                      help="keep the tiny checkpoint in DIR (default: a temporary folder)")
    add_mesh_args(demo)
    _add_convert(sub)
    _add_export(sub)
    _add_generate(sub)
    _add_sft(sub)
    _add_dpo(sub)
    return parser


def _add_train_args(parser: argparse.ArgumentParser, unit: str, max_len: int,
                    lr: float) -> None:
    """The flags sft and dpo share (TrainArgs)."""
    parser.add_argument("--model", required=True, metavar="PATH", help="HF or Orbax model folder")
    parser.add_argument("--data", required=True, metavar="FILE", help="training JSONL")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder")
    parser.add_argument("--eval-data", metavar="FILE", help="JSONL evaluated at every save")
    parser.add_argument("--max-len", type=int, default=max_len,
                        help=f"tokens per sequence (default {max_len})")
    parser.add_argument("--drop-long", action="store_true",
                        help="drop examples longer than --max-len (default: truncate); counted")
    parser.add_argument("--skip-bad-lines", action="store_true",
                        help="skip and count malformed lines instead of stopping at the first")
    parser.add_argument("--batch-size", type=int, default=8,
                        help=f"{unit} per micro-batch (default 8)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step")
    parser.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr})")
    parser.add_argument("--warmup", type=int, default=0, help="linear warmup steps")
    parser.add_argument("--decay", choices=("cosine", "linear"), default="cosine")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--clip-norm", type=float, default=1.0, help="global-norm clipping")
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=int, default=1)
    length.add_argument("--steps", type=int, default=None, help="optimizer steps in all")
    parser.add_argument("--save-every", type=int, default=100,
                        help="checkpoint interval (steps)")
    parser.add_argument("--keep", type=int, default=3, help="checkpoints kept")
    parser.add_argument("--seed", type=int, default=0, help="data order seed")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the last checkpoint")
    parser.add_argument("--remat", default="none", help="none, full, dots, dots_no_batch")
    parser.add_argument("--compute-dtype", choices=DTYPE_CHOICES, default="float32",
                        help="matmul dtype (master weights stay float32); bfloat16 on "
                        "accelerators")
    parser.add_argument("--no-progress", action="store_true")
    add_mesh_args(parser)


TRAIN_OUTPUT = ("saves Orbax checkpoints in OUT/checkpoints every --save-every steps and at the "
                "end (the last --keep), and writes the trained model to OUT/final, which load, "
                "generate and export accept. --resume continues from the latest checkpoint "
                "exactly.")


def _add_sft(sub) -> None:
    sft = sub.add_parser(
        "sft", help="supervised fine-tuning on chat JSONL",
        description="Fine-tunes on JSONL lines {\"messages\": [...]} or {\"prompt\", "
        "\"completion\"}, rendered with the model's chat template; the loss is on assistant "
        "tokens only unless --train-on-prompt. Examples are packed several per row (attention "
        "never crosses them). Logs OUT/metrics.jsonl (step, loss, lr, grad_norm, tokens_per_s, "
        "eval_loss), " + TRAIN_OUTPUT,
        epilog=MESH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(sft, "rows", 2048, 1e-5)
    sft.add_argument("--train-on-prompt", action="store_true",
                     help="train on every token, not only the assistant's")


def _add_dpo(sub) -> None:
    dpo = sub.add_parser(
        "dpo", help="Direct Preference Optimization on preference JSONL",
        description="DPO as trl 1.16's DPOTrainer computes it. Data: JSONL lines {\"prompt\", "
        "\"chosen\", \"rejected\"} as strings (EOS appended) or message lists (chat template), "
        "or {\"chosen\", \"rejected\"} alone with the prompt shared by both. Only completion "
        "tokens are scored; chosen and rejected go through one forward. The reference is a "
        "frozen copy of --ref-model (default: --model) sharded like the policy, or with "
        "--precompute-ref a pass before training that stores its log-probs (it then leaves "
        "memory). Logs OUT/metrics.jsonl (step, loss, rewards/chosen, rewards/rejected, "
        "rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, nll_loss with "
        "--rpo-alpha, lr, grad_norm, tokens_per_s, and eval_* at each save with --eval-data), "
        + TRAIN_OUTPUT,
        epilog=MESH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_args(dpo, "preference pairs", 1024, 1e-6)
    group = dpo.add_argument_group("DPO")
    group.add_argument("--max-prompt-len", type=int, default=None, metavar="N",
                       help="keep only the last N prompt tokens (counted); default: no limit "
                       "beyond --max-len")
    group.add_argument("--loss", choices=("sigmoid", "robust", "hinge", "ipo"),
                       default="sigmoid", help="DPO loss (default sigmoid)")
    group.add_argument("--beta", type=float, default=0.1,
                       help="deviation from the reference: higher stays closer (default 0.1)")
    group.add_argument("--label-smoothing", type=float, default=0.0, metavar="E",
                       help="probability that a label is flipped, in [0, 0.5): conservative "
                       "DPO with sigmoid, robust DPO with robust (default 0)")
    group.add_argument("--rpo-alpha", type=float, default=None, metavar="ALPHA",
                       help="add ALPHA times the mean NLL of the chosen completions (RPO)")
    group.add_argument("--ref-model", metavar="PATH", default=None,
                       help="reference model folder (default: --model)")
    group.add_argument("--precompute-ref", action="store_true",
                       help="compute the reference log-probs once before training, so the "
                       "reference is not in memory while training")
    group.add_argument("--reference-free", action="store_true",
                       help="no reference: its log-probs are taken as 0")


def _add_generate(sub) -> None:
    gen = sub.add_parser(
        "generate", help="generate text from a prompt, streamed to stdout",
        description="Generates from a prompt with the model folder's tokenizer (tokenizer.json) "
        "and, with --chat, its chat template. Sampling defaults come from the folder's "
        "generation_config.json (greedy without one, or when it does not say do_sample); the "
        "flags override them. Stops at the generation config's and tokenizer's eos tokens. One "
        "prompt streams its text as tokens arrive; --prompts-file runs one batch and prints a "
        "JSON line per prompt.", epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    gen.add_argument("--model", required=True, metavar="PATH",
                     help="a Hugging Face or Orbax model folder with a tokenizer")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt")
    source.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per non-empty line, generated as one batch")
    gen.add_argument("--chat", action="store_true",
                     help="wrap each prompt as a user message in the chat template")
    gen.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    gen.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                     help="tokens to generate at most (default: generation_config or 128)")
    gen.add_argument("--temperature", type=float, default=None,
                     help="0 = greedy; > 0 samples (default: generation_config)")
    gen.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens")
    gen.add_argument("--top-p", type=float, default=None, help="keep the nucleus of mass p")
    gen.add_argument("--min-p", type=float, default=None,
                     help="drop tokens below min_p x the top probability")
    gen.add_argument("--repetition-penalty", type=float, default=None,
                     help="divide (multiply, if negative) the logits of seen tokens")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_mesh_args(gen)


def _add_convert(sub) -> None:
    convert = sub.add_parser(
        "convert", help="Hugging Face safetensors folder -> Orbax checkpoint folder",
        description="Writes a Hugging Face Qwen2 folder (config.json + *.safetensors) as an Orbax "
        "checkpoint folder: params/ (the parameter pytree, Orbax), config.json, the tokenizer "
        "and generation files the source has, and qwen2_jax.json (format version, dtype, "
        "source). Streams: each chunk is read, transposed, cast and written in turn, so memory "
        "holds a few chunks (4 MiB each at most), never the model. Everything goes into a "
        "hidden temporary folder beside OUT_DIR, renamed to OUT_DIR when complete; on an error, "
        "Ctrl-C or SIGTERM it is removed. Prints one JSON line.")
    convert.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face model folder")
    convert.add_argument("out_dir", metavar="OUT_DIR", help="Orbax checkpoint folder to write")
    convert.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                         help="storage dtype (default: the source's)")
    _add_output_args(convert)
    add_mesh_args(convert, processes=False,
                  mesh_help="write chunks no larger than this mesh's shards, so that a restore "
                  "onto it reads only what each device holds (a mesh over this process's "
                  "devices; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N gives N)")


def _add_export(sub) -> None:
    export = sub.add_parser(
        "export", help="Orbax checkpoint folder -> Hugging Face safetensors folder",
        description="Writes an Orbax checkpoint folder (from `qwen2-jax convert` or training) as "
        "a Hugging Face folder that transformers' from_pretrained loads: safetensors with HF's "
        "tensor names and shapes (one file, or shards and model.safetensors.index.json past "
        "--max-shard-size), config.json and the tokenizer files. Reads one layer's tensor at a "
        "time. Written into a temporary folder renamed when complete. Prints one JSON line.")
    export.add_argument("orbax_dir", metavar="ORBAX_DIR", help="Orbax checkpoint folder")
    export.add_argument("hf_dir", metavar="HF_DIR", help="Hugging Face folder to write")
    export.add_argument("--dtype", choices=DTYPE_CHOICES, default=None,
                        help="safetensors dtype (default: the stored one)")
    export.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                        help="largest safetensors file, e.g. 5GB (10^9 bytes, as transformers), "
                        "2GiB, 500MB (default 5GB)")
    _add_output_args(export)


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--force", action="store_true",
                        help="replace the output folder if it exists (only once the new one is "
                        "complete)")
    parser.add_argument("--verify", action="store_true",
                        help="afterwards, run the same prompt through the source and the written "
                        "checkpoint (qwen2-jax's loader for both, same dtype) and report the max "
                        "logit difference; exit 1 unless it is 0")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _convert_or_export(args: argparse.Namespace) -> int:
    """Runs convert or export; prints one JSON line; bad input, a full disk or a signal end it
    with a specific message, a non-zero status and no output folder."""
    import json

    from qwen2_jax.config import ConfigError
    from qwen2_jax.convert.output import Interrupted, OutputError
    from qwen2_jax.hf_io import CheckpointError
    from qwen2_jax.orbax_io import OrbaxCheckpointError

    name = f"qwen2-jax {args.command}"
    try:
        if args.command == "convert":
            from qwen2_jax.convert.hf_to_orbax import convert

            mesh, rules = mesh_from_args(args)
            source, written = args.hf_dir, args.out_dir
            summary = convert(source, written, args.dtype, mesh, rules, args.force,
                              progress=not args.no_progress)
        else:
            from qwen2_jax.convert.orbax_to_hf import export

            mesh, rules = None, None
            source, written = args.orbax_dir, args.hf_dir
            summary = export(source, written, args.dtype, args.max_shard_size, args.force,
                             progress=not args.no_progress)
        if args.verify:
            from qwen2_jax.convert.verify import max_logit_difference

            difference = max_logit_difference(source, written, summary["dtype"], mesh, rules)
            summary["verify"] = {"max_abs_logit_diff": difference, "ok": difference == 0.0}
    except Interrupted as e:
        print(f"{name}: interrupted by {e}; removed the partial output", file=sys.stderr)
        return 128 + e.signum
    except (ConfigError, CheckpointError, OrbaxCheckpointError, OutputError, ValueError) as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{name}: {e} (disk full?); removed the partial output", file=sys.stderr)
        return 1
    print(json.dumps(summary))
    if args.verify and not summary["verify"]["ok"]:
        print(f"{name}: verify failed: {written} gives logits up to "
              f"{summary['verify']['max_abs_logit_diff']:.3g} away from {source}'s",
              file=sys.stderr)
        return 1
    return 0


def _generate(args: argparse.Namespace) -> int:
    from qwen2_jax.config import ConfigError
    from qwen2_jax.generate_command import run
    from qwen2_jax.hf_io import CheckpointError
    from qwen2_jax.orbax_io import OrbaxCheckpointError
    from qwen2_jax.tokenizer import TokenizerError

    if args.system and not args.chat:
        raise SystemExit("qwen2-jax generate: --system needs --chat")
    mesh, rules = mesh_from_args(args)
    try:
        return run(args, mesh, rules)
    except (ConfigError, CheckpointError, OrbaxCheckpointError, TokenizerError, ValueError,
            OSError) as e:
        print(f"qwen2-jax generate: {e}", file=sys.stderr)
        return 2


TRAIN_FIELDS = ("model", "data", "out", "eval_data", "max_len", "skip_bad_lines", "batch_size",
                "grad_accum", "lr", "warmup", "decay", "weight_decay", "clip_norm", "epochs",
                "steps", "save_every", "keep", "seed", "resume", "remat", "compute_dtype")
DPO_FIELDS = ("max_prompt_len", "loss", "beta", "label_smoothing", "rpo_alpha", "ref_model",
              "precompute_ref", "reference_free")


def _train(args: argparse.Namespace) -> int:
    import json

    from qwen2_jax.config import ConfigError
    from qwen2_jax.train.data import DataError

    if args.command == "sft":
        from qwen2_jax.train.sft import SFTArgs as Args
        from qwen2_jax.train.sft import run
        fields = (*TRAIN_FIELDS, "train_on_prompt")
    else:
        from qwen2_jax.train.dpo import DPOArgs as Args
        from qwen2_jax.train.dpo import run
        fields = (*TRAIN_FIELDS, *DPO_FIELDS)
    mesh, rules = mesh_from_args(args)
    options = Args(**{k: getattr(args, k) for k in fields},
                   overflow="drop" if args.drop_long else "truncate",
                   progress=not args.no_progress)
    try:
        print(json.dumps(run(options, mesh, rules)))
    except (DataError, ConfigError, ValueError, OSError) as e:
        print(f"qwen2-jax {args.command}: {e}", file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s", force=True)
    logging.getLogger("qwen2_jax").setLevel(logging.INFO)
    # Orbax logs a failed background write with its whole TensorStore spec; we report it.
    logging.getLogger("absl").setLevel(logging.CRITICAL)
    if args.command == "demo":
        from qwen2_jax import demo

        return demo.main(args)
    if args.command in ("convert", "export"):
        return _convert_or_export(args)
    if args.command == "generate":
        return _generate(args)
    if args.command in ("sft", "dpo"):
        return _train(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
