"""What the subcommands share: mesh flags, path checks, and one mapping from errors to exit
codes and one-line messages.

Exit codes: 0 done; 2 a usage or input error (a flag, a file, a config, a data line), found
before any output is written; 1 a failure while running (out of memory, a non-finite loss, a
full disk); 128 + N a signal (130 for Ctrl-C).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import re
import sys
from collections.abc import Callable, Iterator

MESH_HELP = """\
Parallelism (the same flags on every command that loads a model):
  --mesh data=2,fsdp=2,tensor=2   axes data, fsdp, sequence, expert, tensor; -1 fills the rest
  --rules heads=,mlp=fsdp+tensor  override the logical-axis rules (empty value = replicate)
  Several processes (a TPU pod slice: --distributed on every host; one machine:
  --coordinator 127.0.0.1:PORT --num-processes N --process-id I) form one job whose mesh
  spans all their devices.
"""

DTYPE_CHOICES = ("float32", "bfloat16", "float16")


# An OSError with one of these is a path the user gave that cannot be used: exit code 2.
PATH_ERRORS = (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES,
               errno.EPERM, errno.ENAMETOOLONG, errno.EROFS)


class UsageError(ValueError):
    """A flag value or combination that cannot work; exit code 2."""


class RunFailed(RuntimeError):
    """A failure while running (not the input's fault); exit code 1."""


def add_mesh_args(parser: argparse.ArgumentParser, processes: bool = True,
                  mesh_help: str = "device mesh over all devices of all processes") -> None:
    """--mesh/--rules and (with processes) the multi-process flags, shared by every command
    that loads a model."""
    group = parser.add_argument_group("parallelism")
    group.add_argument("--mesh", metavar="SPEC", default=None,
                       help=f"{mesh_help}, e.g. 'fsdp=-1' or 'data=2,fsdp=2,tensor=2' (axes: "
                       "data, fsdp, sequence, expert, tensor; -1 fills the rest). Default: no "
                       "mesh, one device")
    group.add_argument("--rules", metavar="RULES", default=None,
                       help="overrides of the logical-axis rules, e.g. 'heads=,embed=fsdp' "
                       "(an empty value replicates). Defaults: batch=data+fsdp, vocab, heads, "
                       "kv_heads, mlp=tensor, embed=fsdp, expert=expert, length=sequence")
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


QUANTIZE_HELP = ("weight-only quantization of every projection (q/k/v/o, gate/up/down): int8 "
                 "is symmetric with one scale per output channel; int4 is symmetric in groups "
                 "of 128 along the input dimension (fewer where it is smaller), two values a "
                 "byte. Norms, biases, and MoE routers and routed experts stay float. {when} "
                 "Default: float weights")
KV_CACHE_HELP = ("the KV cache's storage: 'auto' (default) keeps keys and values in the compute "
                 "dtype; 'int8' stores them as int8 with one float32 scale per token and head, "
                 "about half of bfloat16's memory (a quarter of float32's), so longer contexts "
                 "or more sequences fit")


def add_quantize_args(parser: argparse.ArgumentParser, kv_cache: bool = True,
                      when: str = "Quantized as the model loads, one parameter at a time, so "
                      "the float model is never whole in memory; an Orbax folder written by "
                      "`convert --quantize` is used as it is (the flag may then be left "
                      "out).") -> None:
    """--quantize and --quantize-embeddings (and with kv_cache, --kv-cache-dtype): one
    definition for every command that loads a model, so their names, choices and meaning
    never drift apart. Check them with `quantize_from_args`."""
    from qwen2_jax.quantize import KV_CACHE_DTYPES, MODES

    group = parser.add_argument_group("quantization")
    group.add_argument("--quantize", choices=MODES, default=None,
                       help=QUANTIZE_HELP.format(when=when))
    group.add_argument("--quantize-embeddings", action="store_true",
                       help="with --quantize: the token embedding and lm_head too (the largest "
                       "matrices of the small models; int8: a scale per row)")
    if kv_cache:
        group.add_argument("--kv-cache-dtype", choices=KV_CACHE_DTYPES, default="auto",
                           help=KV_CACHE_HELP)


def quantize_from_args(args: argparse.Namespace) -> dict:
    """`qwen2_jax.load`'s quantize keywords from the flags; a UsageError, before anything
    loads, for --quantize-embeddings without --quantize."""
    if args.quantize_embeddings and args.quantize is None:
        raise UsageError("--quantize-embeddings needs --quantize int8 or int4")
    return {"quantize": args.quantize, "quantize_embeddings": args.quantize_embeddings}


def quantization_text(params: dict, kv_cache_dtype: str = "auto") -> str:
    """How the loaded weights and the KV cache are stored, in words for a log line (from the
    params: an Orbax folder written quantized is so without --quantize)."""
    from qwen2_jax.quantize import quantization_of

    found = quantization_of(params)
    weights = "float" if found is None else found["weights"] + (
        " (embeddings too)" if found["embeddings"] else "")
    return f"weights {weights}, KV cache {kv_cache_dtype}"


def mesh_from_args(args: argparse.Namespace):
    """Initializes multi-process JAX if asked; returns (mesh or None without --mesh, rules)."""
    from qwen2_jax import sharding

    explicit = tuple(getattr(args, k, None) for k in ("coordinator", "num_processes",
                                                      "process_id"))
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise UsageError("--coordinator, --num-processes and --process-id go together")
        sharding.initialize_distributed(*explicit)
    elif getattr(args, "distributed", False):
        sharding.initialize_distributed()
    if args.mesh is None and args.rules is not None:
        raise UsageError("--rules needs --mesh")
    mesh = None if args.mesh is None else sharding.make_mesh(args.mesh)
    return mesh, sharding.resolve_rules(args.rules)


def require_path(flag: str, path: str | None, what: str = "model folder") -> None:
    """A UsageError unless `path` (given with `flag`) exists."""
    if path is not None and not os.path.exists(path):
        raise UsageError(f"{flag} {path}: no such file or folder (expected a {what})")


MODEL_HELP = ("a Hugging Face or Orbax model folder, or a .gguf file (default: the embedded "
              "Qwen2.5-Coder-0.5B-Instruct, installed by the model extra)")


def model_path(path: str | None, flag: str = "--model") -> str:
    """A --model value as a folder every command reads: the embedded default model when not
    given, and a .gguf file converted once into the cache (tokenizer and config included)."""
    from qwen2_jax import embedded
    from qwen2_jax.checkpoint.hf_io import is_gguf

    if path is None:
        return embedded.default_model()
    require_path(flag, path)
    return embedded.converted(path) if is_gguf(path) else path


def check_at_least(args: argparse.Namespace, minimum: int | float, *names: str) -> None:
    """A UsageError naming the flag when args.<name> is set and below `minimum`."""
    for name in names:
        value = getattr(args, name)
        if value is not None and not value >= minimum:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")


@contextlib.contextmanager
def stage(what: str) -> Iterator[None]:
    """Names the work inside the block in the message of an error raised in it (the
    innermost stage wins): what the memory was for, when it runs out."""
    try:
        yield
    except Exception as e:
        if not hasattr(e, "qwen2_jax_stage"):
            e.qwen2_jax_stage = what
        raise


def out_of_memory(e: BaseException, lower: str) -> str | None:
    """The one-line message for an XLA out-of-memory error (None for other errors): the bytes
    XLA asked for, what the command was doing, and what to lower."""
    text = str(e)
    if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
        return None
    found = re.search(r"allocat\w*\s+(\d+)\s+bytes", text)
    size = f"{int(found.group(1)) / 1e9:.2f} GB" if found else "more memory than there is"
    doing = getattr(e, "qwen2_jax_stage", None)
    return (f"out of memory{f' while {doing}' if doing else ''}: XLA could not allocate "
            f"{size}; lower {lower}")


def run_guarded(name: str, run: Callable[[], int], lower: str, cleaned: str = "") -> int:
    """run() with every error a user can cause turned into one line on stderr and an exit
    code (see the module docstring). `lower`: the flags to lower when memory runs out.
    `cleaned`: what a failure while writing leaves, e.g. "; removed the partial output"."""
    from qwen2_jax.checkpoint.output import Interrupted

    prefix = f"qwen2-jax {name}:"
    try:
        return run()
    except Interrupted as e:
        print(f"{prefix} interrupted by {e}{cleaned}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt as e:
        print(f"{prefix} {e or 'interrupted'}", file=sys.stderr)
        return 130
    except RunFailed as e:
        print(f"{prefix} {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # every input error of the library is a ValueError subclass
        print(f"{prefix} {e}", file=sys.stderr)
        return 2
    except OSError as e:
        full = e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
        print(f"{prefix} {e}{' (disk full?)' if full else ''}{cleaned}", file=sys.stderr)
        return 2 if e.errno in PATH_ERRORS else 1
    except Exception as e:
        message = out_of_memory(e, lower)
        if message is None:
            raise
        print(f"{prefix} {message}{cleaned}", file=sys.stderr)
        return 1
