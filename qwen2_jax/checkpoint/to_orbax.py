"""Any checkpoint we read (HF safetensors folder, GGUF file) -> our Orbax folder, streamed chunk
by chunk.

Every tensor name and shape is checked against the config before anything is written. Then
each zarr chunk of each parameter is read from the source (only the rows and columns it
covers), transposed to our layout, cast and written, a few chunks in flight at a time: memory
holds a few chunks, never the model (a GGUF source holds one dequantized tensor besides).
"""

from __future__ import annotations

import json
import os
import time

import jax
import numpy as np

from qwen2_jax.api import DTYPES, param_shardings
from qwen2_jax.checkpoint.hf_io import CheckpointError, HFCheckpoint, open_checkpoint
from qwen2_jax.checkpoint.mapping import stacked_groups, stacked_shape
from qwen2_jax.checkpoint.orbax_io import (
    PARAMS_DIR,
    StreamedArray,
    blocks_of,
    is_orbax_folder,
    read_metadata,
    save_streamed,
    write_metadata,
)
from qwen2_jax.checkpoint.output import MODEL_FILES, atomic_folder
from qwen2_jax.checkpoint.progress import Progress


def storage_dtype(ckpt: HFCheckpoint, dtype: str | None) -> np.dtype:
    """`dtype`, or the source's one floating dtype (an error if it mixes several)."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return np.dtype(DTYPES[dtype])
    found: dict[str, str] = {}
    for rule in ckpt.rules:
        found.setdefault(ckpt.dtype(rule).name, rule.hf_name)
    if len(found) > 1:
        raise CheckpointError(f"{ckpt.folder}: tensors mix dtypes ({found}); pass --dtype")
    (name,) = found
    if name not in DTYPES:
        raise CheckpointError(f"{ckpt.folder}: tensors are {name}; pass --dtype (one of "
                              f"{sorted(DTYPES)})")
    return np.dtype(DTYPES[name])


def streamed_params(ckpt: HFCheckpoint, dtype: np.dtype, shardings: dict | None,
                    progress: Progress) -> dict:
    """The param pytree as StreamedArray leaves reading from `ckpt`: per stacked item (layer,
    expert), per shard."""
    tree: dict = {}
    for path, group in stacked_groups(ckpt.rules).items():
        shape = stacked_shape(group)
        depth = len(next(iter(group)))  # leading stacked axes (layer, expert)
        sharding = shardings
        for key in path:
            sharding = sharding[key] if sharding is not None else None
        shard_shape = sharding.shard_shape(shape) if sharding is not None else shape
        # One stacked item per block, so each chunk is one HF tensor's (a slice of it).
        write_shape = (1,) * depth + tuple(shard_shape[depth:])
        left = {r.hf_name: np.prod(r.our_shape) * dtype.itemsize for r in group.values()}

        def read(index, out, group=group, depth=depth):
            item = tuple(s.start for s in index[:depth])
            # the copy transposes and casts in one pass
            np.copyto(out[(0,) * depth], ckpt.read(group[item], index[depth:]), casting="unsafe")

        def written(index, nbytes, group=group, depth=depth, left=left):
            name = group[tuple(s.start for s in index[:depth])].hf_name
            left[name] -= nbytes
            progress.advance(nbytes, tensors=int(left[name] == 0))

        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = StreamedArray(shape, dtype, write_shape,
                                       blocks_of(shape, sharding, write_shape), read, written)
    return tree


def write_orbax(source: str, out_dir: str, dtype: str | None = None, mesh=None, rules=None,
                force: bool = False, progress: bool = True) -> dict:
    """Writes `source` (an HF folder, or a .gguf file) as our Orbax checkpoint folder
    `out_dir`, with its config.json and tokenizer/generation files.

    dtype: storage dtype (default: the source's; float32 for GGUF, whose quantized tensors
    dequantize to it). mesh, rules: lay chunks out as the shards of this mesh, so a restore
    onto it reads exactly its shards (default: one chunk per layer and tensor, split to at
    most 4 MiB). Returns a summary dict.
    """
    if jax.process_count() > 1:
        raise ValueError("convert runs as a single process; --mesh only sets the chunk layout")
    start = time.perf_counter()
    config, ckpt, files = open_checkpoint(source)  # names and shapes checked before writing
    target = storage_dtype(ckpt, dtype)
    shardings = param_shardings(config, mesh, rules) if mesh is not None else None
    total = sum(int(np.prod(r.our_shape)) for r in ckpt.rules) * target.itemsize
    with atomic_folder(out_dir, force, sources=(source,)) as temp:
        with Progress("convert", total, len(ckpt.rules), enabled=progress) as bar:
            save_streamed(os.path.join(temp, PARAMS_DIR),
                          streamed_params(ckpt, target, shardings, bar))
        for name, data in files.items():
            with open(os.path.join(temp, name), "wb") as f:
                f.write(data)
        write_metadata(temp, dtype=target.name, source=os.path.abspath(source),
                       mesh=dict(mesh.shape) if mesh is not None else None)
    return {"out": os.path.abspath(out_dir), "dtype": target.name, "tensors": len(ckpt.rules),
            "bytes": total, "model_files": sorted(set(files) - {"config.json"}),
            "seconds": round(time.perf_counter() - start, 3)}


def write_quantized(source: str, out_dir: str, quantize: str, quantize_embeddings: bool = False,
                    dtype: str | None = None, force: bool = False) -> dict:
    """Writes `source` (HF folder, GGUF file or float Orbax folder) weight-only quantized
    (`quantize.py`) as our Orbax folder, which `load` restores as it is.

    The source is read and quantized one parameter at a time (`load(quantize=)`), so memory
    holds the quantized model and one float parameter. dtype: the float parameters' (norms,
    biases, unquantized tables); default the source's (float32 for GGUF).
    """
    from qwen2_jax.api import load
    from qwen2_jax.quantize import quantization_of, weight_bytes

    if jax.process_count() > 1:
        raise ValueError("convert runs as a single process")
    start = time.perf_counter()
    if is_orbax_folder(source):
        dtype = dtype or read_metadata(source)["dtype"]
        files = {}
        for name in ("config.json", *MODEL_FILES):
            if os.path.isfile(os.path.join(source, name)):
                with open(os.path.join(source, name), "rb") as f:
                    files[name] = f.read()
    else:
        _, ckpt, files = open_checkpoint(source)
        dtype = dtype or storage_dtype(ckpt, None).name
    storage_dtype_ = np.dtype(DTYPES[dtype]) if dtype in DTYPES else None
    if storage_dtype_ is None:
        raise ValueError(f"dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
    _, params = load(source, dtype=dtype, quantize=quantize,
                     quantize_embeddings=quantize_embeddings)
    with atomic_folder(out_dir, force, sources=(source,)) as temp:
        save_streamed(os.path.join(temp, PARAMS_DIR), params)
        for name, data in files.items():
            with open(os.path.join(temp, name), "wb") as f:
                f.write(data)
        write_metadata(temp, dtype=dtype, source=os.path.abspath(source), mesh=None,
                       quantize=quantization_of(params))
    return {"out": os.path.abspath(out_dir), "dtype": dtype, "quantize": quantize,
            "quantize_embeddings": quantize_embeddings, "bytes": weight_bytes(params),
            "model_files": sorted(set(files) - {"config.json"}),
            "seconds": round(time.perf_counter() - start, 3)}


def config_file(config: dict) -> bytes:
    """config.json's bytes for a config dict (as transformers writes it: indent 2)."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
