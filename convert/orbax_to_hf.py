"""Our Orbax checkpoint folder -> a Hugging Face folder (safetensors, config.json, tokenizer).

Tensors are written in HF's names, shapes and file layout (sharded with
model.safetensors.index.json past --max-shard-size, as transformers does), each read from the
Orbax checkpoint one layer (or, for the embedding, one row block) at a time.
"""

from __future__ import annotations

import json
import os
import re
import time

import flax.linen as nn
import numpy as np

from qwen2_jax.api import DTYPES, _abstract_params
from qwen2_jax.checkpoint.hf_io import INDEX_FILE
from qwen2_jax.checkpoint.mapping import TensorRule, tensor_rules
from qwen2_jax.checkpoint.orbax_io import (
    CHUNK_BYTES,
    OrbaxCheckpointError,
    check_params,
    is_orbax_folder,
    open_arrays,
    read_metadata,
)
from qwen2_jax.checkpoint.output import atomic_folder, copy_model_files
from qwen2_jax.checkpoint.progress import Progress
from qwen2_jax.checkpoint.safetensors_file import write_safetensors
from qwen2_jax.config import Qwen2Config

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """Bytes in '5GB' (10^9, as transformers reads it), '500MiB' (2^20) or '1000000'."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"size {text!r}: expected a number with an optional unit such as 5GB, "
                         "500MB or 2GiB")
    size = int(float(match.group(1)) * _UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return size


def _blocks(rule: TensorRule, array, dtype: np.dtype):
    """The tensor's bytes in HF layout as row blocks of at most CHUNK_BYTES (a whole layer's
    tensor for transposed kernels), read from the stored `array` (TensorStore)."""
    layer = rule.stack
    if rule.transpose:
        yield rule.to_hf(array[layer].read().result()).astype(dtype)
        return
    # Untransposed tensors are HF's row-major bytes up to a reshape, so blocks of our rows
    # are consecutive runs of the HF tensor.
    rows = rule.our_shape[0]
    step = max(1, CHUNK_BYTES // (int(np.prod(rule.our_shape[1:])) * dtype.itemsize))
    for start in range(0, rows, step):
        yield array[layer][start:min(start + step, rows)].read().result().astype(dtype)


def _files(rules: list[TensorRule], dtype: np.dtype, max_bytes: int) -> list[list[TensorRule]]:
    """Tensors grouped in order into files of at most max_bytes (a bigger tensor alone)."""
    files: list[list[TensorRule]] = [[]]
    size = 0
    for rule in rules:
        nbytes = int(np.prod(rule.hf_shape)) * dtype.itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(rule)
        size += nbytes
    return files


def _hf_config(orbax_dir: str, dtype: np.dtype) -> dict:
    """config.json as stored, with its dtype key(s) saying what the weights now are."""
    with open(os.path.join(orbax_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["torch_dtype"]
    config.update((k, dtype.name) for k in keys)
    return config


def export(orbax_dir: str, hf_dir: str, dtype: str | None = None,
           max_shard_size: str | int = "5GB", force: bool = False, progress: bool = True) -> dict:
    """Writes the Orbax checkpoint folder `orbax_dir` as a Hugging Face folder `hf_dir`.

    dtype: the safetensors dtype (default: the stored one). Returns a summary dict.
    """
    start = time.perf_counter()
    if not is_orbax_folder(orbax_dir):
        kind = ("is a Hugging Face folder" if os.path.exists(os.path.join(orbax_dir, "config.json"))
                else "is not a qwen2-jax checkpoint folder (no qwen2_jax.json, no params/)")
        raise OrbaxCheckpointError(f"{orbax_dir} {kind}; export reads an Orbax folder written by "
                                   "qwen2-jax convert or training (qwen2-jax convert HF_DIR OUT "
                                   "makes one)")
    metadata = read_metadata(orbax_dir)
    config = Qwen2Config.from_file(orbax_dir)
    name = dtype or metadata["dtype"]
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r} is not supported; expected one of {sorted(DTYPES)}")
    target = np.dtype(DTYPES[name])
    max_bytes = parse_size(max_shard_size)
    check_params(orbax_dir, nn.meta.unbox(_abstract_params(config)))
    arrays = open_arrays(orbax_dir)
    rules = tensor_rules(config)
    files = _files(rules, target, max_bytes)
    names = (["model.safetensors"] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    total = sum(int(np.prod(r.hf_shape)) for r in rules) * target.itemsize

    def entry(rule: TensorRule, bar: Progress):
        def blocks():
            for block in _blocks(rule, arrays[rule.path], target):
                yield block
                bar.advance(block.nbytes)
            bar.advance(0, tensors=1)

        return rule.hf_name, target, rule.hf_shape, blocks

    with atomic_folder(hf_dir, force, sources=(orbax_dir,)) as temp:
        with Progress("export", total, len(rules), enabled=progress) as bar:
            for name, group in zip(names, files, strict=True):
                write_safetensors(os.path.join(temp, name), [entry(r, bar) for r in group],
                                  metadata={"format": "pt"})
        if len(files) > 1:
            index = {"metadata": {"total_size": total},
                     "weight_map": {r.hf_name: n for n, g in zip(names, files, strict=True)
                                    for r in g}}
            with open(os.path.join(temp, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(temp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(_hf_config(orbax_dir, target), f, indent=2)
            f.write("\n")
        copied = copy_model_files(orbax_dir, temp)
    return {"out": os.path.abspath(hf_dir), "dtype": target.name, "tensors": len(rules),
            "files": names, "bytes": total, "model_files": copied,
            "seconds": round(time.perf_counter() - start, 3)}
