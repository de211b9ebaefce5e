"""The engine's compiled programs, kept on disk so that a restart neither traces nor compiles.

jax's persistent compilation cache skips XLA's compile on a restart, but not Python's trace and
lowering, which for the unrolled 24-layer model cost about as much as the compile itself
(~4 s a program). So the store serializes each compiled executable
(`jax.experimental.serialize_executable`) under a key covering everything the program depends
on: its name and static arguments, the shapes, dtypes and shardings of its inputs, the jax and
jaxlib versions, XLA_FLAGS, the devices, and the source of the qwen2_jax package. A restart
with the same flags deserializes every program instead. A stale or unreadable file is compiled
again and replaced; files are written to a temporary name and renamed, so several servers may
share a folder.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import logging
import os
import pickle
import tempfile
from pathlib import Path

import jax
from jax._src import config as jax_config
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

import qwen2_jax

logger = logging.getLogger("qwen2_jax.serve")

SUFFIX = ".xla"


@functools.cache
def source_fingerprint() -> str:
    """sha256 of every .py file of the qwen2_jax package (serve/ included): a program compiled
    by other code is never reused."""
    digest = hashlib.sha256()
    roots = {Path(qwen2_jax.__file__).parent, Path(__file__).parent}
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _describe(value) -> str:
    """A stable text for a static argument or an input (arrays by shape, dtype, sharding)."""
    if isinstance(value, jax.sharding.Mesh):
        return repr((value.axis_names, value.devices.shape, [d.id for d in value.devices.flat]))
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        sharding = getattr(value, "sharding", None)
        return f"{value.dtype}{list(value.shape)}@{sharding}"
    return repr(value)


@contextlib.contextmanager
def _without_jax_cache():
    """jax's persistent compilation cache neither read nor written inside. jax decides once
    per process whether it uses the cache (at its first compile, e.g. while the model loads),
    so the setting alone would not turn it off here: the decision is reset on the way in and
    out."""
    compilation_cache.reset_cache()
    try:
        with jax_config.enable_compilation_cache(False):
            yield
    finally:
        compilation_cache.reset_cache()


class ProgramStore:
    """Compiled programs by key, from `folder` when it holds them (None: compile every time),
    for running on `devices` (one, or a mesh's, in its order).

    `compiled` and `loaded` count the programs this process compiled and read back."""

    def __init__(self, folder: str | None, devices: list):
        self.folder = folder
        self.devices = devices
        self.compiled = 0
        self.loaded = 0

    def get(self, name: str, fn, static: tuple, args: tuple):
        """The compiled `fn(*static, *args)` (fn jitted, static its static arguments), as a
        callable of `*args` that never compiles again."""
        path = None
        if self.folder is not None:
            path = os.path.join(self.folder, f"{name}-{self._key(name, static, args)}{SUFFIX}")
            program = self._load(path)
            if program is not None:
                self.loaded += 1
                return program
        if path is None:
            program = fn.lower(*static, *args).compile()
        else:
            # Compiled afresh: an executable that jax's own compilation cache hands back
            # serializes without the kernels it was built with (the restart then fails with
            # "NOT_FOUND: Function wrapped_broadcast.2 not found").
            with _without_jax_cache():
                program = fn.lower(*static, *args).compile()
        self.compiled += 1
        if path is not None:
            self._save(path, program)
        return program

    def _key(self, name: str, static: tuple, args: tuple) -> str:
        leaves, tree = jax.tree.flatten(args)
        parts = [name, jax.__version__, importlib.metadata.version("jaxlib"),
                 os.environ.get("XLA_FLAGS", ""), self.devices[0].device_kind,
                 repr([(d.platform, d.id) for d in self.devices]), source_fingerprint(),
                 str(tree),
                 *map(_describe, static), *map(_describe, leaves)]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]

    def _load(self, path: str):
        try:
            with open(path, "rb") as f:
                payload, in_tree, out_tree = pickle.load(f)
            return serialize_executable.deserialize_and_load(
                payload, in_tree, out_tree, execution_devices=self.devices)
        except FileNotFoundError:
            return None
        except Exception as e:  # truncated, or from another jaxlib build: compile again
            logger.warning("%s: unreadable (%s: %s); compiling it again", path,
                           type(e).__name__, e)
            return None

    @staticmethod
    def _save(path: str, program) -> None:
        folder = os.path.dirname(path)
        try:
            blob = pickle.dumps(serialize_executable.serialize(program))
            fd, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=SUFFIX)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(temporary, path)
            except BaseException:
                os.unlink(temporary)
                raise
        except (OSError, ValueError) as e:  # full disk, or a backend that cannot serialize
            logger.warning("could not keep the compiled program in %s (%s)", path, e)


_compilations = [0]  # every XLA compilation in this process since import


def _count_compilation(event: str, duration: float, **kwargs) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        _compilations[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compilation)


def xla_compilations() -> int:
    """XLA compilations in this process so far (jax.monitoring's backend-compile event): a
    serving loop that compiled behind the engine's back would show here."""
    return _compilations[0]
