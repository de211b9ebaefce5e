"""Reading a Hugging Face model folder (config.json + safetensors) into our parameter pytree.

No PyTorch: safetensors' numpy backend memory-maps the files (bfloat16 through ml_dtypes).
Every tensor is checked against the name table before any data is read, so a wrong
checkpoint fails in milliseconds with the tensor's name, file and the expected shape.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import ExitStack

import numpy as np
from safetensors import SafetensorError, safe_open

from qwen2_jax.config import ConfigError, Qwen2Config
from qwen2_jax.convert.mapping import TensorRule, is_ignorable, tensor_rules

INDEX_FILE = "model.safetensors.index.json"


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


def _open(path: str, stack: ExitStack):
    try:
        return stack.enter_context(safe_open(path, framework="numpy"))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


def _listing(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def iter_hf_tensors(folder: str, config: Qwen2Config) -> Iterator[tuple[TensorRule, np.ndarray]]:
    """Yields (rule, HF tensor as numpy) for every rule of the config, checked first.

    Raises CheckpointError for a missing, unexpected, duplicated or misshapen tensor, or an
    unreadable file. Tensors are read lazily, one at a time.
    """
    rules = tensor_rules(config)
    with ExitStack() as stack:
        where: dict[str, tuple[str, object]] = {}
        for path in safetensors_files(folder):
            handle = _open(path, stack)
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                if name in where:
                    raise CheckpointError(f"tensor {name} is in both {where[name][0]} and {path}")
                where[name] = (path, handle)
        expected = {r.hf_name for r in rules}
        missing = [r.hf_name for r in rules if r.hf_name not in where]
        if missing:
            raise CheckpointError(f"{folder}: missing tensors: {_listing(missing)}")
        unexpected = sorted(n for n in where if n not in expected and not is_ignorable(n, config))
        if unexpected:
            raise CheckpointError(
                f"{folder}: unexpected tensors (not part of a {config.model_type} model with this "
                f"config): {_listing(unexpected)}"
            )
        for r in rules:
            path, handle = where[r.hf_name]
            shape = tuple(handle.get_slice(r.hf_name).get_shape())
            if shape != r.hf_shape:
                raise CheckpointError(
                    f"tensor {r.hf_name} in {path} has shape {shape}; config expects "
                    f"{r.hf_shape} ({r.dims})"
                )
        for r in rules:
            path, handle = where[r.hf_name]
            try:
                yield r, handle.get_tensor(r.hf_name)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: cannot read tensor {r.hf_name} ({e})") from e


def read_hf_params(folder: str, config: Qwen2Config, dtype: np.dtype) -> dict:
    """The parameter pytree of numpy arrays in `dtype`, layers stacked on a leading axis."""
    params: dict = {}
    num_layers = config.num_hidden_layers
    for rule, tensor in iter_hf_tensors(folder, config):
        node = params
        for key in rule.path[:-1]:
            node = node.setdefault(key, {})
        value = rule.to_ours(tensor).astype(dtype)
        leaf = rule.path[-1]
        if rule.layer is None:
            node[leaf] = value
        else:
            if leaf not in node:  # allocate the stacked [L, ...] buffer once, at layer 0's turn
                node[leaf] = np.empty((num_layers, *rule.our_shape), dtype)
            node[leaf][rule.layer] = value
    return params


def read_hf_config(folder: str) -> Qwen2Config:
    if not os.path.isdir(folder):
        raise ConfigError(f"{folder}: not a folder; expected a model folder with config.json")
    return Qwen2Config.from_file(folder)
