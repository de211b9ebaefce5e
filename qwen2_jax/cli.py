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


def add_mesh_args(parser: argparse.ArgumentParser) -> None:
    """--mesh/--rules and the multi-process flags, shared by every command that loads a model."""
    group = parser.add_argument_group("parallelism")
    group.add_argument("--mesh", metavar="SPEC", default=None,
                       help="device mesh over all devices of all processes, e.g. "
                       "'fsdp=-1' or 'data=2,fsdp=2,tensor=2' (axes: data, fsdp, expert, "
                       "tensor; -1 fills the rest). Default: no mesh, one device")
    group.add_argument("--rules", metavar="RULES", default=None,
                       help="overrides of the logical-axis rules, e.g. 'heads=,embed=fsdp' "
                       "(an empty value replicates). Defaults: batch=data+fsdp, vocab, heads, "
                       "kv_heads, mlp=tensor, embed=fsdp, expert=expert")
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

    explicit = (args.coordinator, args.num_processes, args.process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise SystemExit("qwen2-jax: --coordinator, --num-processes and --process-id go "
                             "together")
        sharding.initialize_distributed(*explicit)
    elif args.distributed:
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    logging.getLogger("qwen2_jax").setLevel(logging.INFO)
    if args.command == "demo":
        from qwen2_jax import demo

        return demo.main(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
