"""Qwen2-MoE against transformers: logits, greedy tokens, aux loss, conversion, meshes."""

from __future__ import annotations

import jax
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


@pytest.mark.parametrize("spec", ["expert=8", "expert=4,tensor=2", "data=2,expert=4"])
def test_expert_parallel_equals_one_device(tmp_path, batch, spec):
    from qwen2_jax.sharding import make_mesh

    make_hf_moe_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    ids, mask = batch
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    mesh = make_mesh(spec)
    _, sharded = qwen2_jax.load(tmp_path, mesh=mesh)
    gate = sharded["layers"]["mlp"]["experts"]["gate_proj"]  # [L, E, D, F]
    assert gate.sharding.shard_shape(gate.shape)[1] == 8 // mesh.shape["expert"]
    got = np.asarray(qwen2_jax.forward(config, sharded, ids, mask))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
