"""Qwen2-MoE against transformers: logits, greedy tokens, aux loss, conversion, meshes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

import qwen2_jax
from conftest import hf_logits, make_hf_moe_model
from qwen2_jax.moe import dispatch_slots, load_balancing_loss

LAYOUTS = {
    "all sparse": {},
    "mixed": {"mlp_only_layers": [1]},  # layers 0, 2 sparse; 1 dense: layers unrolled
    "every other, renormalized": {"decoder_sparse_step": 2, "norm_topk_prob": True},
}


@pytest.fixture
def batch(rng):
    ids = rng.integers(0, 97, (3, 11))
    mask = np.ones_like(ids)
    mask[1, :4] = 0  # left padding
    mask[2, 8:] = 0  # right padding
    return ids, mask


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
@pytest.mark.parametrize("dispatch", ["sorted", "dense"])
def test_logits_equal_transformers(tmp_path, batch, layout, dispatch):
    model = make_hf_moe_model(tmp_path, **LAYOUTS[layout])
    config, params = qwen2_jax.load(tmp_path)
    assert config.model_type == "qwen2_moe"
    ids, mask = batch
    ours = np.asarray(qwen2_jax.forward(config, params, ids, mask, moe_dispatch=dispatch))
    for row in range(len(ids)):
        real = mask[row] == 1
        ref = hf_logits(model, ids[row:row + 1, real])[0]
        np.testing.assert_allclose(ours[row, real], ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("padded", [True, False])
def test_aux_loss_equals_transformers(tmp_path, batch, padded):
    """With padding, the mask keeps padded rows out (their router logits differ between the
    libraries, as padding's hidden states do); without, every row counts."""
    model = make_hf_moe_model(tmp_path, mlp_only_layers=[1])
    config, params = qwen2_jax.load(tmp_path)
    ids, mask = batch
    if not padded:
        mask = np.ones_like(ids)
    _, router = qwen2_jax.forward(config, params, ids, mask, output_router_logits=True)
    assert router.shape == (2, ids.size, config.num_experts)  # the two sparse layers
    with torch.no_grad():
        out = model(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    output_router_logits=True)
    theirs = load_balancing_loss_func(out.router_logits, config.num_experts,
                                      config.num_experts_per_tok,
                                      torch.as_tensor(mask) if padded else None)
    ours = load_balancing_loss(router, config.num_experts, config.num_experts_per_tok,
                               mask if padded else None)
    np.testing.assert_allclose(float(ours), float(theirs), rtol=1e-5)


def test_greedy_generation_equals_transformers(tmp_path, rng):
    from test_generate import hf_generate

    model = make_hf_moe_model(tmp_path, mlp_only_layers=[1])
    config, params = qwen2_jax.load(tmp_path)
    prompts = [rng.integers(0, 97, n).tolist() for n in (6, 2, 9)]
    ours = qwen2_jax.generate(config, params, prompts, max_new_tokens=12)
    assert ours == hf_generate(model, prompts, 12, do_sample=False, eos_token_id=None)


def test_sorted_dispatch_computes_about_n_times_k_rows():
    experts = jax.random.randint(jax.random.key(0), (512, 2), 0, 8)
    slot, block_expert, slots = dispatch_slots(experts, 8, block=16)
    assert len(set(np.asarray(slot).tolist())) == 1024  # every assignment has its own row
    assert slots <= 1024 + 8 * 16 and slots < 512 * 8 / 3  # vs 4096 rows for all experts
    # each assignment's row lies in a block of its own expert
    block_of = np.asarray(block_expert)[np.asarray(slot) // 16]
    np.testing.assert_array_equal(block_of, np.asarray(experts).reshape(-1))


def test_conversion_round_trip_is_bit_exact(tmp_path, capsys):
    from test_convert import run_cli, tensors

    make_hf_moe_model(tmp_path / "hf", dtype=torch.bfloat16, mlp_only_layers=[1])
    assert run_cli(capsys, "convert", tmp_path / "hf", tmp_path / "orbax")[0] == 0
    assert run_cli(capsys, "export", tmp_path / "orbax", tmp_path / "back")[0] == 0
    source, back = tensors(tmp_path / "hf"), tensors(tmp_path / "back")
    assert sorted(back) == sorted(source)
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in back
    for name, x in source.items():
        assert back[name].dtype == x.dtype and back[name].tobytes() == x.tobytes(), name
    _, params = qwen2_jax.load(tmp_path / "orbax")
    assert params["layers_0"]["mlp"]["experts"]["gate_proj"].shape == (8, 40, 24)


# mesh spec -> devices it takes (of the 8); data=2 and fsdp=2 also split the batch
MESHES = {"expert=4": 4, "expert=8": 8, "expert=2,fsdp=2,tensor=2": 8, "data=2,expert=4": 8}


def moe_all_to_alls(hlo: str) -> int:
    """All-to-alls the sparse block's shard_map put in a compiled program."""
    return len(re.findall(r"all-to-all\(.*mlp/shard_map", hlo))


@pytest.mark.parametrize("spec", sorted(MESHES))
def test_expert_parallel_equals_one_device(tmp_path, batch, spec):
    """Tokens go to their experts' devices by all-to-all (the sorted dispatch on a mesh with
    an expert axis; E/ep experts per device, ep < k and ep > k, tensor parallelism inside
    the experts, 33 tokens padded to the devices), and the logits are one device's."""
    from qwen2_jax.model import Qwen2ForCausalLM
    from qwen2_jax.sharding import DEFAULT_RULES, make_mesh, use_mesh

    make_hf_moe_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    ids, mask = batch
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    mesh = make_mesh(spec, jax.devices()[:MESHES[spec]])
    _, sharded = qwen2_jax.load(tmp_path, mesh=mesh)
    gate = sharded["layers"]["mlp"]["experts"]["gate_proj"]  # [L, E, D, F]
    assert gate.sharding.shard_shape(gate.shape)[1] == 8 // mesh.shape["expert"]
    got = np.asarray(qwen2_jax.forward(config, sharded, ids, mask))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)

    def logits(params, ids):
        with use_mesh(mesh, DEFAULT_RULES):
            return Qwen2ForCausalLM(config).apply({"params": params}, ids, None, None, None)

    hlo = jax.jit(logits).lower(sharded, ids.astype(np.int32)).compile().as_text()
    assert moe_all_to_alls(hlo) >= 2  # there and back (the weights-moving path has none)


def test_expert_parallel_training_equals_one_device(tmp_path, rng):
    """The SFT loss with the aux term and its gradients (through the all-to-alls, with
    remat) on expert=2 x fsdp=2 x tensor=2 equal one device's."""
    from test_moe_train import AUX, examples, unpacked

    from qwen2_jax.sharding import DEFAULT_RULES, make_mesh
    from qwen2_jax.train.step import SFTObjective, batch_gradients

    make_hf_moe_model(tmp_path, **AUX)
    config, params = qwen2_jax.load(tmp_path)
    batch = {k: jnp.asarray(v)[None] for k, v in unpacked(examples(rng), 12).items()}
    gradients = jax.jit(batch_gradients, static_argnums=0)
    m1, g1 = gradients(SFTObjective(config), params, batch)
    mesh = make_mesh("expert=2,fsdp=2,tensor=2")
    _, sharded = qwen2_jax.load(tmp_path, mesh=mesh)
    objective = SFTObjective(config, remat="full", mesh=mesh, rules=DEFAULT_RULES)
    compiled = gradients.lower(objective, sharded, batch).compile()
    assert moe_all_to_alls(compiled.as_text()) >= 4  # and back again in the backward pass
    m2, g2 = compiled(sharded, batch)
    for name in ("loss", "aux_loss"):
        np.testing.assert_allclose(float(m2[name]), float(m1[name]), rtol=1e-6)
    for got, want in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
        want = np.asarray(want)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0,
                                   atol=1e-5 * max(1e-4, np.abs(want).max()))
