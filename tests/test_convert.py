"""The converter: HF -> Orbax -> HF bit for bit, Orbax loading on meshes, --verify, bad input.

Every failure case checks the specific message, a non-zero status, and that neither the
output folder nor its temporary sibling is left behind.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import qwen2_jax
from conftest import hf_logits, make_hf_model
from qwen2_jax import cli
from qwen2_jax.api import param_shardings
from qwen2_jax.checkpoint.orbax_io import OrbaxCheckpointError
from qwen2_jax.sharding import make_mesh

MODEL_FILES = {"tokenizer.json": '{"model": "bpe"}', "tokenizer_config.json": '{"a": 1}',
               "vocab.json": '{"x": 0}', "merges.txt": "#version\n",
               "generation_config.json": '{"eos_token_id": [1, 2]}'}


def make_source(folder, dtype=torch.bfloat16, **overrides):
    """A tiny random HF model folder with (dummy) tokenizer and generation files."""
    model = make_hf_model(folder, dtype=dtype, **overrides)
    for name, text in MODEL_FILES.items():
        (folder / name).write_text(text)
    return model


def tensors(folder) -> dict[str, np.ndarray]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def leftovers(folder) -> list[str]:
    """Anything a run left beside `folder`: the folder itself, or a temporary sibling."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.lstrip(".").startswith(
        folder.name))


def run_cli(capsys, *args) -> tuple[int, str, str]:
    status = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return status, out.out, out.err


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    make_source(folder)
    return folder


@pytest.mark.parametrize("dtype, overrides, shard", [
    (torch.bfloat16, {}, None),
    (torch.float32, {"tie_word_embeddings": True}, "20KB"),
    (torch.float16, {"num_key_value_heads": 1}, None),
])
def test_round_trip_is_bit_exact(tmp_path, capsys, dtype, overrides, shard):
    hf, orbax, back = tmp_path / "hf", tmp_path / "orbax", tmp_path / "back"
    make_source(hf, dtype=dtype, max_shard_size=shard, **overrides)
    source = tensors(hf)
    status, _, err = run_cli(capsys, "convert", hf, orbax)
    assert status == 0, err
    assert f"tensors {len(source)}/{len(source)}" in err  # the progress bar counts them
    status, _, err = run_cli(capsys, "export", orbax, back, "--max-shard-size", "30KB")
    assert status == 0, err

    exported = tensors(back)
    assert sorted(exported) == sorted(source)
    assert ("lm_head.weight" in exported) == (not overrides.get("tie_word_embeddings", False))
    for name, x in source.items():
        y = exported[name]
        assert (y.dtype, y.shape) == (x.dtype, x.shape), name
        assert y.tobytes() == x.tobytes(), name
    assert json.loads((back / "config.json").read_text()) == json.loads(
        (hf / "config.json").read_text())
    for name, text in MODEL_FILES.items():
        assert (orbax / name).read_text() == text and (back / name).read_text() == text
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(source) and len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(x.nbytes for x in source.values())
    metadata = json.loads((orbax / "qwen2_jax.json").read_text())
    assert metadata["format_version"] == 1 and metadata["source"] == str(hf)
    assert metadata["dtype"] == str(dtype).removeprefix("torch.")


def test_export_loads_in_transformers_with_the_same_logits(tmp_path, capsys, rng):
    model = make_source(tmp_path / "hf", dtype=torch.float32)
    assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "orbax")[0] == 0
    status, out, err = run_cli(capsys, "export", tmp_path / "orbax", tmp_path / "back",
                               "--max-shard-size", "100KB")
    assert status == 0, err
    assert len(json.loads(out)["files"]) > 1
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    ids = rng.integers(0, 101, (2, 9))
    np.testing.assert_array_equal(hf_logits(exported, ids), hf_logits(model, ids))


def test_convert_to_another_dtype_and_export_back(tmp_path, capsys, source):
    assert run_cli(capsys, "convert", source, tmp_path / "orbax", "--dtype", "float32")[0] == 0
    _, from_hf = qwen2_jax.load(source, dtype="float32")
    _, params = qwen2_jax.load(tmp_path / "orbax", dtype="bfloat16")
    assert params["embed_tokens"]["embedding"].dtype == jax.numpy.bfloat16
    _, params = qwen2_jax.load(tmp_path / "orbax")
    jax.tree.map(np.testing.assert_array_equal, params, from_hf)
    status, out, _ = run_cli(capsys, "export", tmp_path / "orbax", tmp_path / "back", "--dtype",
                             "bfloat16")
    assert status == 0 and json.loads(out)["dtype"] == "bfloat16"
    assert json.loads((tmp_path / "back" / "config.json").read_text())["dtype"] == "bfloat16"
    for name, x in tensors(source).items():  # float32 in between is exact for bfloat16
        assert tensors(tmp_path / "back")[name].tobytes() == x.tobytes()


@pytest.mark.parametrize("layout", [None, "fsdp=4,tensor=2"])
@pytest.mark.parametrize("spec", ["fsdp=8", "data=2,fsdp=2,tensor=2", "tensor=8"])
def test_orbax_restores_into_a_mesh(tmp_path, source, layout, spec):
    """Restored straight into the mesh's shardings, whatever mesh the chunks were laid out
    for; the same arrays and placement as loading the HF folder onto that mesh."""
    from qwen2_jax.checkpoint.to_orbax import write_orbax as convert

    convert(str(source), str(tmp_path / "orbax"), mesh=None if layout is None else
            make_mesh(layout), progress=False)
    mesh = make_mesh(spec)
    config, params = qwen2_jax.load(tmp_path / "orbax", mesh=mesh)
    _, expected = qwen2_jax.load(source, mesh=mesh)
    shardings = param_shardings(config, mesh)
    for x, y, s in zip(jax.tree.leaves(params), jax.tree.leaves(expected),
                       jax.tree.leaves(shardings), strict=True):
        assert x.sharding == s and y.sharding == s
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_layout_mesh_makes_chunks_no_larger_than_shards(tmp_path, source):
    from qwen2_jax.checkpoint.orbax_io import open_arrays
    from qwen2_jax.checkpoint.to_orbax import write_orbax as convert

    mesh = make_mesh("fsdp=4,tensor=2")
    convert(str(source), str(tmp_path / "orbax"), mesh=mesh, progress=False)
    config = qwen2_jax.Qwen2Config.from_file(source)
    shardings = param_shardings(config, mesh)
    arrays = open_arrays(str(tmp_path / "orbax"))
    kernel = arrays[("layers", "mlp", "up_proj", "kernel")]  # [L, D, F] over (fsdp, tensor)
    assert tuple(kernel.chunk_layout.read_chunk.shape) == (1, 14, 38)
    assert shardings["layers"]["mlp"]["up_proj"]["kernel"].shard_shape(kernel.shape) == (3, 14, 38)


def test_verify_reports_zero_and_catches_a_bad_copy(tmp_path, capsys, source, monkeypatch):
    status, out, err = run_cli(capsys, "convert", source, tmp_path / "good", "--verify")
    assert status == 0, err
    assert json.loads(out)["verify"] == {"max_abs_logit_diff": 0.0, "ok": True}

    # A converter bug that swaps two rows of one layer's q_proj must fail the verification.
    from qwen2_jax.checkpoint import to_orbax as hf_to_orbax

    real = hf_to_orbax.streamed_params

    def buggy(*args):
        tree = real(*args)
        leaf = tree["layers"]["self_attn"]["q_proj"]["kernel"]
        read = leaf.read

        def swapped(index, out):
            read(index, out)
            out[0, [0, 1]] = out[0, [1, 0]]

        object.__setattr__(leaf, "read", swapped)
        return tree

    monkeypatch.setattr(hf_to_orbax, "streamed_params", buggy)
    status, out, err = run_cli(capsys, "convert", source, tmp_path / "bad", "--verify")
    assert status == 1 and "verify failed" in err
    assert json.loads(out)["verify"]["max_abs_logit_diff"] > 1e-3


def test_existing_output_needs_force(tmp_path, capsys, source):
    out_dir = tmp_path / "orbax"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    status, _, err = run_cli(capsys, "convert", source, out_dir)
    assert status == 2 and "already exists; pass --force" in err
    assert (out_dir / "keep.txt").read_text() == "mine"
    (out_dir / "keep.txt").unlink()
    assert run_cli(capsys, "convert", source, out_dir)[0] == 2  # even an empty one
    assert run_cli(capsys, "convert", source, out_dir, "--force")[0] == 0
    assert (out_dir / "qwen2_jax.json").exists()
    (out_dir / "mine.txt").write_text("mine")  # ours: --force replaces it whole
    assert run_cli(capsys, "convert", source, out_dir, "--force")[0] == 0
    assert not (out_dir / "mine.txt").exists() and (out_dir / "qwen2_jax.json").exists()
    assert leftovers(out_dir) == ["orbax"]


def _break(folder, how):
    path = folder / "model.safetensors"
    if how in ("truncate", "header"):
        data = path.read_bytes()
        path.write_bytes(data[:-100] if how == "truncate" else data[:8] + b"#" + data[9:])
        return
    t = load_file(path)
    if how == "missing":
        del t["model.layers.1.mlp.up_proj.weight"]
    elif how == "unexpected":
        t["model.layers.0.self_attn.o_proj.bias"] = np.zeros(56, np.float32)
    elif how == "shape":
        t["model.layers.2.self_attn.q_proj.weight"] = np.zeros((57, 56), np.float32)
    save_file(t, path, metadata={"format": "pt"})


@pytest.mark.parametrize("how, message", [
    ("no config", r"config\.json: no such file"),
    ("model_type", r"'llama' is not supported; supported: qwen2"),
    ("missing", r"missing tensors: model\.layers\.1\.mlp\.up_proj\.weight"),
    ("unexpected", r"unexpected tensors .*model\.layers\.0\.self_attn\.o_proj\.bias"),
    ("shape", r"model\.layers\.2\.self_attn\.q_proj\.weight in \S+ has shape \(57, 56\); "
              r"config expects \(56, 56\)"),
    ("truncate", r"model\.safetensors: not a valid safetensors file: .*\(truncated\?\)"),
    ("header", r"model\.safetensors: not a valid safetensors file: header is not valid JSON"),
])
def test_bad_input_is_a_specific_error_and_leaves_nothing(tmp_path, capsys, how, message):
    hf = tmp_path / "hf"
    make_hf_model(hf)
    if how == "no config":
        (hf / "config.json").unlink()
    elif how == "model_type":
        config = json.loads((hf / "config.json").read_text())
        (hf / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    else:
        _break(hf, how)
    status, out, err = run_cli(capsys, "convert", hf, tmp_path / "out")
    assert status == 2 and out == ""
    assert re.search(message, err), err
    assert leftovers(tmp_path / "out") == []


def test_export_refuses_incomplete_or_mismatched_checkpoints(tmp_path, capsys, source):
    orbax = tmp_path / "orbax"
    assert run_cli(capsys, "convert", source, orbax)[0] == 0
    (orbax / "qwen2_jax.json").rename(tmp_path / "metadata.json")
    status, _, err = run_cli(capsys, "export", orbax, tmp_path / "back")
    assert status == 2 and "incomplete checkpoint: no qwen2_jax.json" in err
    with pytest.raises(OrbaxCheckpointError, match="incomplete checkpoint"):
        qwen2_jax.load(orbax)
    (tmp_path / "metadata.json").rename(orbax / "qwen2_jax.json")

    config = json.loads((orbax / "config.json").read_text())
    (orbax / "config.json").write_text(json.dumps({**config, "intermediate_size": 80}))
    status, _, err = run_cli(capsys, "export", orbax, tmp_path / "back")
    assert status == 2 and re.search(r"layers/mlp/down_proj/kernel has shape \(3, 76, 56\); "
                                     r"config\.json implies \(3, 80, 56\)", err), err
    assert leftovers(tmp_path / "back") == []


# ----- the process dies or the disk fills mid-way (each in a real child process) ------------

CHILD = textwrap.dedent("""
    import os, signal, sys
    from qwen2_jax import cli
    from qwen2_jax.checkpoint import orbax_io
    from qwen2_jax.checkpoint import to_orbax as hf_to_orbax

    action, source, out = sys.argv[1:4]
    real = hf_to_orbax.streamed_params
    calls = []

    def interrupting(*args):
        tree = real(*args)
        leaf = tree["layers"]["mlp"]["down_proj"]["kernel"]  # written mid-way through
        read = leaf.read

        def read_then_signal(index, data):
            read(index, data)
            calls.append(index)
            if len(calls) == 2:  # a real signal to this process, while chunks are in flight
                os.kill(os.getpid(), getattr(signal, action))

        object.__setattr__(leaf, "read", read_then_signal)
        return tree

    if action.startswith("SIG"):
        hf_to_orbax.streamed_params = interrupting
    else:  # "FSIZE n": files may not grow past n bytes, as on a full disk
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        limit = int(action.split()[1])
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    sys.exit(cli.main([*sys.argv[4:], source, out, "--no-progress"]))
""")


def run_child(action, source, out, command="convert"):
    return subprocess.run([sys.executable, "-c", CHILD, action, str(source), str(out), command],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("signame, status", [("SIGINT", 130), ("SIGTERM", 143)])
def test_signal_mid_convert_cleans_up(tmp_path, source, signame, status):
    done = run_child(signame, source, tmp_path / "out")
    assert done.returncode == status, done.stderr
    assert f"interrupted by {signame}; removed the partial output" in done.stderr
    assert leftovers(tmp_path / "out") == []


def test_kill_9_never_leaves_a_folder_load_accepts(tmp_path, source):
    done = run_child("SIGKILL", source, tmp_path / "out")
    assert done.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    (partial,) = [tmp_path / n for n in leftovers(tmp_path / "out")]
    assert partial.name.startswith(".out.partial-")
    with pytest.raises(qwen2_jax.CheckpointError, match="incomplete: left by an interrupted"):
        qwen2_jax.load(partial)
    with pytest.raises(qwen2_jax.ConfigError, match="not a folder"):
        qwen2_jax.load(tmp_path / "out")


@pytest.mark.parametrize("command", ["convert", "export"])
def test_disk_full_is_an_error_and_cleans_up(tmp_path, source, capsys, command):
    if command == "export":
        assert run_cli(capsys, "convert", source, tmp_path / "orbax")[0] == 0
        source = tmp_path / "orbax"
    done = run_child("FSIZE 4000", source, tmp_path / "out", command)
    assert done.returncode == 1, done.stderr
    assert "File too large" in done.stderr and "removed the partial output" in done.stderr
    assert leftovers(tmp_path / "out") == []

