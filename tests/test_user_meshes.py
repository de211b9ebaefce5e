"""What users hand us, checked or made to work: meshes they build with plain `jax.make_mesh`
(Explicit axes, some of our axes only, axes of their own), token ids outside the vocabulary,
and generation past the model's position limit. Meshes on 8 CPU devices, against one device."""

from __future__ import annotations

import logging

import jax
import numpy as np
import pytest
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax.sharding import ShardingError, make_mesh, resolve_rules

# Dims that 8 divides, so each mesh really splits something.
DIMS = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=8,
            num_key_value_heads=2, max_position_embeddings=64)
TENSOR_ON_MODEL = "heads=model,kv_heads=model,mlp=model,vocab=model"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_meshes")
    make_hf_model(folder, seed=5, **DIMS)
    return folder


@pytest.fixture(scope="module")
def one_device(checkpoint):
    """(config, params, ids, mask, logits, greedy tokens) without a mesh: the reference."""
    config, params = qwen2_jax.load(checkpoint)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, (4, 7))
    mask = np.ones_like(ids)
    mask[1, :2] = 0  # left padding
    logits = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    tokens = qwen2_jax.generate(config, params, PROMPTS, max_new_tokens=5)
    return config, params, ids, mask, logits, tokens


PROMPTS = [[3, 1, 4, 1, 5], [9, 2], [6, 5, 3, 5, 8, 9, 7], [11]]


def specs(params) -> list:
    return [x.sharding.spec for x in jax.tree.leaves(params)]


# ----- meshes from plain jax.make_mesh -------------------------------------------------------

# (shape, names, our own mesh spec for the same layout)
USER_MESHES = [
    ((2, 2, 2), ("data", "fsdp", "tensor"), "data=2,fsdp=2,tensor=2"),  # default: Explicit axes
    ((4, 2), ("fsdp", "tensor"), "fsdp=4,tensor=2"),  # no data or expert axis
]


@pytest.mark.parametrize("shape, names, ours", USER_MESHES)
def test_load_and_forward_on_jax_make_mesh_equal_one_device(checkpoint, one_device, shape,
                                                            names, ours):
    config, _, ids, mask, expected, _ = one_device
    mesh = jax.make_mesh(shape, names)
    _, params = qwen2_jax.load(checkpoint, mesh=mesh)
    # Sharded exactly as on our own mesh, over the user's devices, not replicated.
    _, own = qwen2_jax.load(checkpoint, mesh=make_mesh(ours))
    assert specs(params) == specs(own)
    embedding = params["embed_tokens"]["embedding"]
    assert embedding.sharding.spec == P("tensor", "fsdp")
    assert set(embedding.sharding.device_set) == set(mesh.devices.flat)
    logits = qwen2_jax.forward(config, params, ids, mask)
    assert not logits.sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("shape, names, ours", [((8,), ("fsdp",), "fsdp=8"),
                                                ((2, 4), ("data", "tensor"), "data=2,tensor=4")])
def test_init_on_jax_make_mesh_is_sharded_and_equals_unsharded(one_device, shape, names, ours):
    config = one_device[0]
    expected = qwen2_jax.init(config, jax.random.key(7))
    params = qwen2_jax.init(config, jax.random.key(7), mesh=jax.make_mesh(shape, names))
    assert specs(params) == specs(qwen2_jax.init(config, jax.random.key(7), mesh=make_mesh(ours)))
    assert not params["embed_tokens"]["embedding"].sharding.is_fully_replicated
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("shape, names, ours", USER_MESHES)
def test_generate_on_jax_make_mesh_equals_one_device(checkpoint, one_device, shape, names, ours):
    config, *_, expected = one_device
    _, params = qwen2_jax.load(checkpoint, mesh=jax.make_mesh(shape, names))
    assert qwen2_jax.generate(config, params, PROMPTS, max_new_tokens=5) == expected


def test_everything_works_inside_the_callers_explicit_set_mesh(checkpoint, one_device):
    """Code written for Explicit sharding runs under `jax.set_mesh(mesh)`; so do we."""
    config, _, ids, mask, logits, tokens = one_device
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"),
                         axis_types=(AxisType.Explicit,) * 3)
    with jax.set_mesh(mesh):
        _, params = qwen2_jax.load(checkpoint, mesh=mesh)
        got = qwen2_jax.forward(config, params, ids, mask)
        np.testing.assert_allclose(np.asarray(got), logits, rtol=0, atol=1e-5)
        assert qwen2_jax.generate(config, params, PROMPTS, max_new_tokens=5) == tokens
        fresh = qwen2_jax.init(config, jax.random.key(1), mesh=mesh)
        assert fresh["embed_tokens"]["embedding"].sharding.spec == P("tensor", "fsdp")


def test_a_mesh_axis_of_our_own_is_an_error_that_says_how_to_map_it(checkpoint):
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    with pytest.raises(ShardingError) as error:
        qwen2_jax.load(checkpoint, mesh=mesh)
    message = str(error.value)
    for fragment in ("mesh axis 'model' (size 4)", "none of ours (data, fsdp, sequence, expert, tensor)",
                     "no rule names it", "rename the mesh axis", "rules=",
                     f'rules="{TENSOR_ON_MODEL}"', "--rules"):
        assert fragment in message, fragment
    assert isinstance(error.value, ValueError)


def test_rules_may_name_the_axes_of_the_users_mesh(checkpoint, one_device):
    config, _, ids, mask, expected, tokens = one_device
    mesh = jax.make_mesh((2, 4), ("data", "model"))
    _, params = qwen2_jax.load(checkpoint, mesh=mesh, rules=TENSOR_ON_MODEL)
    assert params["embed_tokens"]["embedding"].sharding.spec == P("model", None)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]  # [L, D, N, H]
    assert q.sharding.spec == P(None, None, "model", None)
    logits = qwen2_jax.forward(config, params, ids, mask, rules=TENSOR_ON_MODEL)
    assert logits.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)
    got = qwen2_jax.generate(config, params, PROMPTS, max_new_tokens=5, rules=TENSOR_ON_MODEL)
    assert got == tokens
    # A rule naming an axis that is neither ours nor the mesh's is still a typo.
    with pytest.raises(ShardingError, match=r"unknown mesh axes \['modle'\]; known: data, fsdp, "
                                            r"sequence, expert, tensor, model"):
        resolve_rules("heads=modle", mesh)


# ----- token ids outside the vocabulary ------------------------------------------------------


@pytest.mark.parametrize("bad", [-1, 128, 2**32])  # 2**32 would wrap to 0 as int32
def test_forward_refuses_token_ids_outside_the_vocabulary(one_device, bad):
    config, params, ids, *_ = one_device
    ids = ids.astype(np.int64)
    ids[2, 5] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} at \[2, 5\] of input_ids is outside "
                                         r"\[0, 128\) \(the model's vocab_size is 128\)"):
        qwen2_jax.forward(config, params, ids)


@pytest.mark.parametrize("bad", [-1, 128])
def test_generate_refuses_token_ids_outside_the_vocabulary(one_device, bad):
    config, params, *_ = one_device
    prompts = [[1, 2], [3, 4, bad]]
    with pytest.raises(ValueError, match=rf"token id {bad} at \[1, 2\] of prompts is outside "
                                         r"\[0, 128\) \(the model's vocab_size is 128\)"):
        qwen2_jax.generate(config, params, prompts, max_new_tokens=2)


# ----- generation past max_position_embeddings -----------------------------------------------


def test_generate_past_max_position_embeddings_is_refused(one_device):
    config, params, *_ = one_device
    prompts = [[1] * 10, [2] * 60]  # prompts[1]: 60 + 5 > 64
    with pytest.raises(ValueError) as error:
        qwen2_jax.generate(config, params, prompts, max_new_tokens=5)
    message = str(error.value)
    for fragment in ("prompts[1] has 60 tokens", "max_new_tokens=5", "65 positions",
                     "max_position_embeddings=64", "allow_long=True"):
        assert fragment in message, fragment
    # Exactly at the limit is fine.
    assert len(qwen2_jax.generate(config, params, prompts, max_new_tokens=4)[1]) == 4


def test_allow_long_generates_past_the_limit_with_one_warning(one_device, caplog):
    config, params, *_ = one_device
    caplog.set_level(logging.WARNING, logger="qwen2_jax")
    out = qwen2_jax.generate(config, params, [[2] * 60], max_new_tokens=8, allow_long=True)
    assert len(out[0]) == 8
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "prompts[0] has 60 tokens; with max_new_tokens=8 that is 68 positions" in warnings[0]
    assert "allow_long=True" in warnings[0]


def test_yarn_raises_the_position_limit():
    """Qwen2.5's recipe for 131,072 tokens keeps max_position_embeddings=32768 and adds YaRN."""
    from qwen2_jax.decoding import check_length, position_limit

    base = dict(model_type="qwen2", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                intermediate_size=96, num_hidden_layers=1, vocab_size=128,
                max_position_embeddings=32768)
    yarn = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    assert position_limit(qwen2_jax.Qwen2Config.from_hf(base)) == 32768
    config = qwen2_jax.Qwen2Config.from_hf({**base, "rope_scaling": yarn})
    assert position_limit(config) == 131072
    check_length(config, np.array([100_000]), 31_072, allow_long=False)
    with pytest.raises(ValueError, match=r"131073 positions, past the model's "
                                         r"max_position_embeddings=32768, raised to 131072 by YaRN"):
        check_length(config, np.array([100_000]), 31_073, allow_long=False)
