"""Loading a Hugging Face folder: dtypes, no torch import, and specific errors on bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax import CheckpointError, ConfigError


@pytest.fixture
def checkpoint(tmp_path):
    make_hf_model(tmp_path)
    return tmp_path


def rewrite(folder, change):
    """Applies change(dict of tensors) to model.safetensors in place."""
    path = folder / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_storage_dtype(checkpoint, dtype):
    _, params = qwen2_jax.load(checkpoint, dtype=dtype)
    assert {x.dtype.name for x in jax.tree.leaves(params)} == {dtype}
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (3, 56, 2, 14)


def test_default_dtype_is_float32_on_cpu(checkpoint):
    _, params = qwen2_jax.load(checkpoint)
    assert params["embed_tokens"]["embedding"].dtype == np.float32


def test_load_does_not_import_torch(checkpoint):
    code = ("import sys, qwen2_jax; c, p = qwen2_jax.load(sys.argv[1]); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "False"


def test_missing_tensor_is_named(checkpoint):
    rewrite(checkpoint, lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.self_attn\.k_proj\.bias"):
        qwen2_jax.load(checkpoint)


def test_unexpected_tensor_is_named(checkpoint):
    def add(t):
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(56, np.float32)

    rewrite(checkpoint, add)
    with pytest.raises(CheckpointError, match=r"unexpected tensors .*o_proj\.bias"):
        qwen2_jax.load(checkpoint)


def test_shape_mismatch_names_tensor_and_config(checkpoint):
    def shrink(t):
        t["model.layers.2.self_attn.k_proj.weight"] = np.zeros((14, 56), np.float32)

    rewrite(checkpoint, shrink)
    expected = (r"tensor model\.layers\.2\.self_attn\.k_proj\.weight in .*model\.safetensors has "
                r"shape \(14, 56\); config expects \(28, 56\) \(num_key_value_heads=2, head_dim=14")
    with pytest.raises(CheckpointError, match=expected):
        qwen2_jax.load(checkpoint)


def test_tied_checkpoint_may_carry_lm_head(tmp_path):
    make_hf_model(tmp_path, tie_word_embeddings=True)

    def add(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].copy()

    rewrite(tmp_path, add)
    _, params = qwen2_jax.load(tmp_path)
    assert "lm_head" not in params


def test_truncated_file(checkpoint):
    path = checkpoint / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a valid safetensors file: "
                       r"tensor \S+ ends at byte \d+ but the file has \d+ bytes \(truncated\?\)"):
        qwen2_jax.load(checkpoint)


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:5], "too short for a safetensors header"),
    (lambda data: (10**12).to_bytes(8, "little") + data[8:], r"header size \d+ exceeds"),
    (lambda data: data[:8] + b"#" + data[9:], "header is not valid JSON"),
    (lambda data: data.replace(b'"F32"', b'"Q32"', 1), r"malformed entry .*'Q32'"),
    (lambda data: data.replace(b'"shape":[101,56]', b'"shape":[101,57]'),
     r"data_offsets \d+\.\.\d+ do not hold F32 \[101, 57\]"),
])
def test_corrupt_header(checkpoint, damage, message):
    path = checkpoint / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*" + message):
        qwen2_jax.load(checkpoint)


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match=r"config\.json: no such file"):
        qwen2_jax.load(tmp_path)


def test_unsupported_model_type(checkpoint):
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConfigError, match="'llama' is not supported; supported: qwen2"):
        qwen2_jax.load(checkpoint)


def test_index_naming_a_missing_shard(tmp_path):
    make_hf_model(tmp_path, max_shard_size="20KB")
    first = sorted(tmp_path.glob("model-*.safetensors"))[0]
    first.unlink()
    with pytest.raises(CheckpointError, match=f"names shard files that do not exist: .*{first.name}"):
        qwen2_jax.load(tmp_path)


def test_bad_dtype(checkpoint):
    with pytest.raises(ValueError, match="dtype 'int8' is not supported"):
        qwen2_jax.load(checkpoint, dtype="int8")
