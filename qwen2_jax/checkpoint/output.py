"""Output folders that appear complete or not at all, and the files that travel with a model.

Everything is written into a temporary sibling of the output folder, renamed into place only
when complete. An exception, SIGINT or SIGTERM removes the temporary folder; `kill -9` leaves
it behind under a hidden `.NAME.partial-*` name, holding a marker file (INCOMPLETE_MARKER) that
makes `qwen2_jax.load` refuse it.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import tempfile
import threading

from qwen2_jax.checkpoint.orbax_io import STOP, is_orbax_folder, stop_writers

logger = logging.getLogger("qwen2_jax")

# What a model folder carries besides weights and config.json; copied when present.
MODEL_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
               "special_tokens_map.json", "added_tokens.json", "generation_config.json",
               "chat_template.jinja")


# Present in an output folder from its creation until just before it is renamed into place.
INCOMPLETE_MARKER = ".qwen2_jax_incomplete"


class OutputError(ValueError):
    """An output folder that cannot be written (exists without --force, not a folder)."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while writing an output folder."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def is_model_folder(folder: str) -> bool:
    """Ours (qwen2_jax.json, or an Orbax params/ folder) or Hugging Face's (config.json with
    safetensors): the only folders --force may replace."""
    names = os.listdir(folder)
    weights = any(n.endswith(".safetensors") or n == "model.safetensors.index.json"
                  for n in names)
    return is_orbax_folder(folder) or ("config.json" in names and weights)


def _inside(path: str, folder: str) -> bool:
    return os.path.commonpath([path, folder]) == folder


def check_replaceable(out: str, force: bool, sources: tuple[str, ...] = ()) -> None:
    """An OutputError unless `out` may be written: it is none of `sources`, neither holds nor
    lies inside one, and if it exists, it is a folder that `force` may replace (empty, or a
    model folder: see is_model_folder)."""
    real = os.path.realpath(out)
    for source in sources:
        source_real = os.path.realpath(source)
        relation = ("is the source" if real == source_real else
                    "lies inside the source" if _inside(real, source_real) else
                    "holds the source" if _inside(source_real, real) else None)
        if relation:
            raise OutputError(f"{out} {relation} {source}; write to a folder outside it")
    parent = os.path.dirname(os.path.abspath(out))
    while not os.path.lexists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise OutputError(f"{out}: {parent} is a file, not a folder")
    if not os.path.lexists(out):
        return
    if not os.path.isdir(out):
        raise OutputError(f"{out} exists and is not a folder")
    if not force:
        raise OutputError(f"{out} already exists; pass --force to replace it")
    entries = sorted(os.listdir(out))
    if entries and not is_model_folder(out):
        shown = ", ".join(e + "/" * os.path.isdir(os.path.join(out, e)) for e in entries[:8])
        more = f" and {len(entries) - 8} more" if len(entries) > 8 else ""
        raise OutputError(f"{out} is not a model folder (no qwen2_jax.json, no config.json with "
                          f"safetensors), so --force will not replace it; it holds {shown}{more}")


def copy_model_files(source: str, destination: str) -> list[str]:
    """Copies the tokenizer and generation files `source` has; returns their names."""
    copied = []
    for name in MODEL_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(destination, name))
            copied.append(name)
    return copied


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str) -> None:
    """Flushes every file and folder under `folder` to disk, so that the rename that
    publishes it can never expose data still in flight after a crash."""
    for root, _, files in os.walk(folder):
        for name in files:
            _fsync(os.path.join(root, name))
        _fsync(root)


def _interrupt(signum, frame):
    STOP.set()
    raise Interrupted(signum)


@contextlib.contextmanager
def atomic_folder(out: str, force: bool = False, sources: tuple[str, ...] = ()):
    """Yields an empty temporary folder next to `out`; it becomes `out` when the block ends
    normally and is removed otherwise. An existing `out` is replaced only with force, and
    only when check_replaceable allows it (never a source, never a folder not a model's)."""
    check_replaceable(out, force, sources)
    out = os.path.abspath(out)
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    for leftover in glob.glob(os.path.join(parent, f".{glob.escape(name)}.partial-*")):
        logger.warning("%s: left by an interrupted run; remove it to reclaim the space", leftover)
    temp = tempfile.mkdtemp(prefix=f".{name}.partial-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    marker = os.path.join(temp, INCOMPLETE_MARKER)
    with open(marker, "w") as f:
        f.write("written by qwen2-jax; removed only once this folder is complete\n")
    STOP.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {s: signal.signal(s, _interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield temp
        os.remove(marker)
        sync_tree(temp)  # durable before it takes the final name
        if os.path.lexists(out):
            old = temp + ".replaced"
            os.rename(out, old)
            os.rename(temp, out)
            shutil.rmtree(old)
        else:
            os.rename(temp, out)
        _fsync(parent)
    except BaseException:
        for s in handlers:  # a second signal must not cut the clean-up short
            signal.signal(s, lambda signum, frame: STOP.set())
        stop_writers()
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
