"""LoRA adapters against PEFT (0.21): its files read here and ours read by it, the same
logits both ways, merge, per-row stacked adapters, and the adapter math on meshes."""

from __future__ import annotations

import copy
import json
import os

import jax
import numpy as np
import pytest
import torch

import qwen2_jax
from conftest import hf_logits, make_hf_model
from qwen2_jax import lora

peft = pytest.importorskip("peft")

IDS = np.array([[5, 17, 3, 99, 42, 7, 0, 64], [1, 2, 3, 4, 5, 6, 7, 8]])


def peft_model(model, r=4, alpha=8.0, targets=lora.TARGETS, rslora=False, seed=1):
    """A copy of the transformers model wrapped by PEFT with random (not zero) A and B."""
    model = copy.deepcopy(model)
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(targets),
                             lora_dropout=0.0, use_rslora=rslora, task_type="CAUSAL_LM")
    wrapped = peft.get_peft_model(model, config)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return wrapped.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("base"))
    model = make_hf_model(folder)
    return folder, model


def our_logits(folder, adapter=None, **kwargs):
    config, params = qwen2_jax.load(folder, dtype="float32", adapter=adapter, **kwargs)
    return np.asarray(qwen2_jax.forward(config, params, IDS))


@pytest.mark.parametrize("targets,rslora", [(lora.TARGETS, False),
                                            (("q_proj", "v_proj", "o_proj"), True)])
def test_peft_adapter_loads_here_with_its_logits(base, tmp_path, targets, rslora):
    folder, model = base
    wrapped = peft_model(model, targets=targets, rslora=rslora)
    wrapped.save_pretrained(tmp_path / "adapter")
    theirs = hf_logits(wrapped, IDS)
    ours = our_logits(folder, adapter=str(tmp_path / "adapter"))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    # the adapter matters: the base alone differs
    assert np.abs(our_logits(folder) - theirs).max() > 1e-2 * np.abs(theirs).max()


def test_our_adapter_loads_in_peft_with_our_logits(base, tmp_path):
    folder, model = base
    config = qwen2_jax.Qwen2Config.from_file(folder)
    settings = lora.LoRAConfig(rank=3, alpha=5.0)
    adapters = lora.init(config, settings, jax.random.key(0))
    # B starts at zero (the model is unchanged); give it values so the test can fail
    adapters = jax.tree.map(lambda x: x + 0.2 * jax.random.normal(jax.random.key(1), x.shape),
                            adapters)
    lora.save_adapter(str(tmp_path / "ours"), config, settings, adapters, folder)
    raw = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert raw["peft_type"] == "LORA" and raw["r"] == 3 and raw["lora_alpha"] == 5.0
    wrapped = peft.PeftModel.from_pretrained(copy.deepcopy(model),
                                             str(tmp_path / "ours")).eval()
    theirs = hf_logits(wrapped, IDS)
    ours = our_logits(folder, adapter=str(tmp_path / "ours"))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())


def test_new_adapter_is_peft_initialized(base):
    folder, _ = base
    config = qwen2_jax.Qwen2Config.from_file(folder)
    adapters = lora.init(config, lora.LoRAConfig(rank=8, alpha=16.0), jax.random.key(0))
    q = adapters["layers"]["self_attn"]["q_proj"]
    o = adapters["layers"]["self_attn"]["o_proj"]
    assert q["lora_a"].shape == (3, 56, 8) and q["lora_b"].shape == (3, 8, 4, 14)
    assert o["lora_a"].shape == (3, 4, 14, 8) and o["lora_b"].shape == (3, 8, 56)
    assert not np.any(np.asarray(q["lora_b"]))
    bound = 1 / np.sqrt(56)
    a = np.asarray(q["lora_a"])
    assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    assert abs(a.std() - bound / np.sqrt(3)) < 0.05 * bound  # uniform's std


def test_merge_equals_unmerged(base, tmp_path):
    folder, model = base
    peft_model(model).save_pretrained(tmp_path / "adapter")
    config, params = qwen2_jax.load(folder, dtype="float32")
    settings, adapters = lora.load_adapter(str(tmp_path / "adapter"), config)
    merged = lora.merge(config, params, adapters, settings)
    unmerged = lora.combine(params, lora.folded(adapters, settings))
    a = np.asarray(qwen2_jax.forward(config, merged, IDS))
    b = np.asarray(qwen2_jax.forward(config, unmerged, IDS))
    np.testing.assert_allclose(a, b, atol=1e-4 * np.abs(b).max())


def test_bad_adapter_folders_name_the_problem(base, tmp_path):
    folder, model = base
    wrapped = peft_model(model, r=2)
    wrapped.save_pretrained(tmp_path / "a")
    config = qwen2_jax.Qwen2Config.from_file(folder)
    path = tmp_path / "a" / "adapter_config.json"
    raw = json.loads(path.read_text())
    with pytest.raises(ValueError, match="not a PEFT adapter folder"):
        lora.load_adapter(str(tmp_path), config)
    for field, value, message in (("use_dora", True, "use_dora"), ("bias", "all", "bias"),
                                  ("r", 3, r"expected \[3")):
        path.write_text(json.dumps({**raw, field: value}))
        with pytest.raises(ValueError, match=message):
            lora.load_adapter(str(tmp_path / "a"), config)
    path.write_text(json.dumps(raw))
    os.remove(tmp_path / "a" / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors is missing"):
        lora.load_adapter(str(tmp_path / "a"), config)


def test_merge_command_equals_peft_merge_and_unload(base, tmp_path, capsys):
    from qwen2_jax import cli

    folder, model = base
    wrapped = peft_model(model, r=6, alpha=3.0, targets=("q_proj", "o_proj", "up_proj"))
    wrapped.save_pretrained(tmp_path / "adapter")
    merged_torch = wrapped.merge_and_unload()
    theirs = hf_logits(merged_torch, IDS)
    assert cli.main(["merge", "--model", folder, "--adapter", str(tmp_path / "adapter"),
                     str(tmp_path / "merged")]) == 0
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert summary["adapter"]["r"] == 6
    config, params = qwen2_jax.load(tmp_path / "merged")
    assert not any("lora" in "/".join(map(str, p)) for p, _ in
                   jax.tree_util.tree_flatten_with_path(params)[0])
    ours = np.asarray(qwen2_jax.forward(config, params, IDS))
    np.testing.assert_allclose(ours, theirs, atol=1e-4 * np.abs(theirs).max())
    # bad input: exit 2, naming what is wrong, nothing written
    for argv, message in (
            (["--adapter", str(tmp_path / "nope"), str(tmp_path / "o")], "--adapter"),
            (["--adapter", folder, str(tmp_path / "o")], "not a PEFT adapter folder"),
            (["--adapter", str(tmp_path / "adapter"), folder], "is the source")):
        assert cli.main(["merge", "--model", folder, *argv]) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "o").exists()
