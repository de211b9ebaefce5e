"""Reading a Hugging Face model folder (config.json + safetensors) into our parameter pytree.

No PyTorch: `SafetensorsFile` maps just the byte ranges a read needs (bfloat16 through
ml_dtypes).
Every tensor is checked against the name table before any data is read, so a wrong
checkpoint fails in milliseconds with the tensor's name, file and the expected shape.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import mmap
import os

import jax
import numpy as np

from qwen2_jax.checkpoint.mapping import (
    TensorRule,
    is_ignorable,
    stacked_groups,
    stacked_shape,
    tensor_rules,
)
from qwen2_jax.checkpoint.output import MODEL_FILES
from qwen2_jax.checkpoint.safetensors_file import SafetensorsFile, SafetensorsFormatError
from qwen2_jax.config import ConfigError, Qwen2Config

INDEX_FILE = "model.safetensors.index.json"
logger = logging.getLogger("qwen2_jax")


class CheckpointError(ValueError):
    """A checkpoint folder whose files disagree with its config or with the Qwen2 layout."""


def safetensors_files(folder: str) -> list[str]:
    """The safetensors files of a model folder: those the index names, else all of them."""
    index = os.path.join(folder, INDEX_FILE)
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: expected JSON with a 'weight_map' object ({e})") from e
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {missing}")
    else:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    if not names:
        raise CheckpointError(f"{folder}: no *.safetensors files (and no {INDEX_FILE})")
    return [os.path.join(folder, n) for n in names]


def _open(path: str) -> SafetensorsFile:
    try:
        return SafetensorsFile(path)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e})") from e
    except SafetensorsFormatError as e:
        raise CheckpointError(str(e)) from e


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def _bounds(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """(start, stop) of each slice of `index` over `shape`."""
    return tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))


class HFCheckpoint:
    """An open model folder whose tensor names and shapes were checked against the config.

    `read(rule, index)` returns one slice of one tensor, in our layout, reading from disk only
    the rows (and columns) that slice needs; `bytes_read` counts them.
    Raises CheckpointError for a missing, unexpected, duplicated or misshapen tensor, or an
    unreadable file, before any data is read.
    """

    def __init__(self, folder: str, config: Qwen2Config, files: list | None = None):
        self.folder = folder
        self.rules = tensor_rules(config)
        self.bytes_read = 0
        if files is None:
            files = [_open(path) for path in safetensors_files(folder)]
        self._where = self._check(config, files)

    def _check(self, config: Qwen2Config, files: list) -> dict[str, SafetensorsFile]:
        """files: SafetensorsFile, or anything with its reading interface (GGUFTensors)."""
        where: dict[str, SafetensorsFile] = {}
        for handle in files:
            path = handle.path
            for name in handle.tensors:
                if name in where:
                    raise CheckpointError(f"tensor {name} is in both {where[name].path} and "
                                          f"{path}")
                where[name] = handle
        expected = {r.hf_name for r in self.rules}
        missing = [r.hf_name for r in self.rules if r.hf_name not in where]
        if missing:
            raise CheckpointError(f"{self.folder}: missing tensors: {_listing(missing)}")
        unexpected = sorted(n for n in where if n not in expected and not is_ignorable(n, config))
        if unexpected:
            raise CheckpointError(
                f"{self.folder}: unexpected tensors (not part of a {config.model_type} model with "
                f"this config): {_listing(unexpected)}"
            )
        for r in self.rules:
            shape = where[r.hf_name].shape(r.hf_name)
            if shape != r.hf_shape:
                raise CheckpointError(
                    f"tensor {r.hf_name} in {where[r.hf_name].path} has shape {shape}; config expects "
                    f"{r.hf_shape} ({r.dims})"
                )
        return where

    def dtype(self, rule: TensorRule) -> np.dtype:
        """The tensor's dtype in its file."""
        return self._where[rule.hf_name].tensors[rule.hf_name][0]

    def read(self, rule: TensorRule, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """The tensor in our layout, `[index]` (one slice per dim of our per-layer shape), as a
        read-only view of the file: copy what you keep. Only the HF rows/columns that the
        first sliced dim of each group covers are touched, and counted in `bytes_read`."""
        handle = self._where[rule.hf_name]
        groups = rule.hf_groups()  # our dims behind each HF dim, in HF order
        index = tuple(index or ()) + (slice(None),) * (len(rule.our_shape) - len(index or ()))
        bounds = _bounds(index, rule.our_shape)
        hf_index, block_shape = [], [0] * len(rule.our_shape)
        for dims in groups:
            inner = math.prod(rule.our_shape[d] for d in dims[1:])
            start, stop = bounds[dims[0]]
            hf_index.append(slice(start * inner, stop * inner))
            block_shape[dims[0]] = stop - start
            for d in dims[1:]:
                block_shape[d] = rule.our_shape[d]
        try:
            block = handle.read(rule.hf_name, tuple(hf_index))
        except OSError as e:
            raise CheckpointError(f"{handle.path}: cannot read tensor {rule.hf_name} ({e})") from e
        self.bytes_read += block.nbytes
        block = (block.T if rule.transpose else block).reshape(block_shape)
        firsts = {dims[0] for dims in groups}  # already cut by hf_index
        inner_index = tuple(slice(None) if d in firsts else slice(*bounds[d])
                            for d in range(len(block_shape)))
        return block[inner_index]


def host_buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialized array in fresh anonymous memory, page-aligned and backed by huge pages
    where the kernel allows.

    Page alignment lets the CPU backend's device_put use the buffer in place instead of
    copying it; huge pages make first-touch page faults, which dominate filling a fresh
    gigabyte on virtual machines, ~7x cheaper (measured 2.1 s -> 0.3 s per GiB).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype)
    memory = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        memory.madvise(mmap.MADV_HUGEPAGE)
    return np.frombuffer(memory, dtype).reshape(shape)


def read_hf_params(ckpt: HFCheckpoint, dtype: np.dtype, shardings: dict,
                   transform=None) -> tuple[dict, int]:
    """The parameter pytree as jax arrays in `dtype`, placed by `shardings` (same tree).

    Each distinct shard this process's devices hold is read once, straight from the files,
    and put on those devices; nothing else of the tensor is read. transform(path, array):
    the {name: array} entries that replace each parameter as soon as it is read (quantizing,
    so the float model is never whole), or None. Returns (params, bytes read).
    """
    params: dict = {}
    for path, group in stacked_groups(ckpt.rules).items():
        shape = stacked_shape(group)
        depth = len(next(iter(group)))  # leading stacked axes
        sharding = shardings
        for key in path:
            sharding = sharding[key]
        shards: dict[tuple, np.ndarray] = {}
        arrays = []
        for device, index in sharding.addressable_devices_indices_map(shape).items():
            key = _bounds(index, shape)
            if key not in shards:
                # Each read is a view of the file's bytes; this is the one copy (and cast).
                buffer = host_buffer(tuple(b - a for a, b in key), dtype)
                starts = [a for a, _ in key[:depth]]
                for item in itertools.product(*(range(a, b) for a, b in key[:depth])):
                    # one read per stacked item (layer, expert) of the shard
                    at = tuple(i - s for i, s in zip(item, starts, strict=True))
                    buffer[at] = ckpt.read(group[item], index[depth:])
                shards[key] = buffer
            arrays.append(jax.device_put(shards[key], device))
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        array = jax.make_array_from_single_device_arrays(shape, sharding, arrays)
        del arrays, shards
        node |= transform(path, array) if transform is not None else {path[-1]: array}
    return params, ckpt.bytes_read


def read_hf_config(folder: str) -> Qwen2Config:
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a folder; expected a model folder with config.json")
    return Qwen2Config.from_file(folder)


def is_gguf(path: str) -> bool:
    return path.endswith(".gguf") and not os.path.isdir(path)


def open_checkpoint(source: str) -> tuple[Qwen2Config, HFCheckpoint, dict[str, bytes]]:
    """(config, checked tensors, the files a model folder carries besides weights: config.json,
    tokenizer and generation files) of an HF folder or a GGUF file, read the same way."""
    if is_gguf(source):
        from qwen2_jax.checkpoint.gguf_io import GGUFCheckpoint, GGUFTensors

        gguf = GGUFCheckpoint(source)
        config = Qwen2Config.from_hf(gguf.config())
        files = {"config.json": (json.dumps(gguf.config(), indent=2) + "\n").encode()}
        if gguf.has_tokenizer():
            files |= {name: text.encode() for name, text in gguf.tokenizer_files().items()}
        else:
            logger.warning("%s has no tokenizer (tokenizer.ggml.*): its weights alone are "
                           "read; commands that take text need a tokenizer.json", source)
        return config, HFCheckpoint(source, config, [GGUFTensors(gguf)]), files
    config = read_hf_config(source)
    ckpt = HFCheckpoint(source, config)
    files = {}
    for name in ("config.json", *MODEL_FILES):
        path = os.path.join(source, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                files[name] = f.read()
    return config, ckpt, files
