"""Meshes and rules, sharded loading and init, and forward on 8 CPU devices equal to one device."""

from __future__ import annotations

import logging
import re

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qwen2_jax
from conftest import make_hf_model
from qwen2_jax.api import _forward, param_shardings
from qwen2_jax.checkpoint.hf_io import HFCheckpoint, read_hf_config, read_hf_params
from qwen2_jax.sharding import (
    DEFAULT_RULES,
    MESH_AXES,
    ShardingError,
    logical_spec,
    make_mesh,
    parse_mesh,
    resolve_rules,
)

# Dims that 8 divides, so each mesh really splits something: vocab 128, embed 64, mlp 96.
DIVISIBLE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_attention_heads=8,
                 num_key_value_heads=2, max_window_layers=1, use_sliding_window=True,
                 sliding_window=6)


def test_parse_mesh_fills_and_orders():
    assert parse_mesh("data=2,fsdp=-1,tensor=2", 8) == dict(data=2, fsdp=2, sequence=1, expert=1,
                                                           tensor=2)
    assert parse_mesh("tensor=8", 8) == dict(data=1, fsdp=1, sequence=1, expert=1, tensor=8)
    assert parse_mesh(" fsdp = -1 ", 8)["fsdp"] == 8
    assert make_mesh("data=2,fsdp=2,tensor=2").axis_names == MESH_AXES


@pytest.mark.parametrize("spec, message", [
    ("data=2,model=4", r"'model=4' is not AXIS=SIZE with AXIS one of data, fsdp"),
    ("data=2,data=4", r"axis 'data' is given twice"),
    ("data=-1,fsdp=-1", r"only one axis may be -1"),
    ("data=3,fsdp=-1", r"3 devices, which does not divide the 8"),
    ("data=2,tensor=2", r"uses 4 devices but 8 are available"),
    ("tensor=two", r"size of 'tensor' must be an integer or -1, got 'two'"),
    ("tensor=0", r"must be >= 1 or -1"),
])
def test_parse_mesh_errors(spec, message):
    with pytest.raises(ShardingError, match=message):
        parse_mesh(spec, 8)


def test_rules_overrides():
    rules = dict(resolve_rules("heads=,embed=fsdp+tensor,batch=data"))
    assert rules["heads"] == () and rules["embed"] == ("fsdp", "tensor")
    assert rules["batch"] == ("data",) and rules["mlp"] == ("tensor",)
    assert resolve_rules({"mlp": "fsdp"})[: len(DEFAULT_RULES)] != DEFAULT_RULES
    with pytest.raises(ShardingError, match="unknown logical axis 'hidden'"):
        resolve_rules("hidden=tensor")
    with pytest.raises(ShardingError, match=r"unknown mesh axes \['model'\]"):
        resolve_rules("heads=model")


def test_indivisible_dims_are_replicated_or_cut_with_one_log_line(caplog):
    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    caplog.set_level(logging.INFO, logger="qwen2_jax")
    # 14 heads on tensor=2 divide; on tensor=8 they do not.
    assert logical_spec(("embed", "heads", "head_dim"), (64, 14, 8), mesh,
                        DEFAULT_RULES) == P("fsdp", "tensor", None)
    tensor8 = make_mesh("tensor=8")
    for _ in range(3):
        assert logical_spec(("embed", "heads", "head_dim"), (64, 14, 8), tensor8,
                            DEFAULT_RULES) == P(None, None, None)
    assert [r.message for r in caplog.records] == [
        "sharding: heads of size 14 does not divide over tensor (8 devices); replicating it"]
    # A batch of 2 on data=2,fsdp=2 keeps data; fsdp is then free for the embed dim.
    assert logical_spec(("batch", "length", "embed"), (2, 5, 64), mesh,
                        DEFAULT_RULES) == P("data", None, "fsdp")
    assert "sharding it over data only" in caplog.records[-1].message


def shard_shape(array) -> tuple[int, ...]:
    return array.addressable_shards[0].data.shape


@pytest.fixture(scope="module")
def divisible_checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("divisible")
    make_hf_model(folder, seed=3, **DIVISIBLE)
    return folder


def ragged_batch(vocab: int, batch: int, length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (batch, length))
    mask = np.ones((batch, length), np.int32)
    for row in range(batch):
        mask[row, : row % 4] = 0  # left padding of 0..3 tokens
    return ids, mask


# (mesh, config overrides on DIVISIBLE, batch, expected [V, D] shard of lm_head)
MESHES = [
    ("data=8", {}, 8, (128, 64)),
    ("fsdp=8", {}, 8, (128, 8)),
    ("fsdp=8", {}, 3, (128, 8)),  # a batch the mesh does not divide
    ("tensor=8", {}, 4, (16, 64)),  # 8 heads split, 2 kv heads replicated
    ("tensor=8", dict(num_attention_heads=4, num_key_value_heads=4), 4, (16, 64)),
    ("data=2,fsdp=2,tensor=2", {}, 4, (64, 32)),
]


@pytest.mark.parametrize("spec, overrides, batch, lm_head_shard", MESHES)
def test_forward_on_mesh_equals_one_device(tmp_path, divisible_checkpoint, spec, overrides, batch,
                                           lm_head_shard):
    folder = divisible_checkpoint
    if overrides:
        folder = tmp_path / "model"
        make_hf_model(folder, seed=4, **{**DIVISIBLE, **overrides})
    config, params = qwen2_jax.load(folder)
    ids, mask = ragged_batch(config.vocab_size, batch, 9)
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))

    mesh = make_mesh(spec)
    _, sharded = qwen2_jax.load(folder, mesh=mesh)
    assert shard_shape(sharded["lm_head"]["embedding"]) == lm_head_shard
    logits = qwen2_jax.forward(config, sharded, ids, mask)
    assert logits.sharding.mesh == mesh
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5 * scale)


def test_heads_split_on_tensor_axis(divisible_checkpoint):
    """The params really are split as the rules say, not silently replicated."""
    config = read_hf_config(str(divisible_checkpoint))
    shardings = param_shardings(config, make_mesh("fsdp=2,tensor=4"))
    attn = shardings["layers"]["self_attn"]
    assert attn["q_proj"]["kernel"].spec == P(None, "fsdp", "tensor", None)  # [L, D, N, H]
    assert attn["k_proj"]["kernel"].spec == P(None, "fsdp", None, None)  # 2 kv heads on 4
    assert attn["o_proj"]["kernel"].spec == P(None, "tensor", None, "fsdp")  # [L, N, H, D]
    assert shardings["layers"]["mlp"]["down_proj"]["kernel"].spec == P(None, "tensor", "fsdp")
    assert shardings["norm"]["scale"].spec == P("fsdp")


def test_rules_override_changes_placement_not_values(divisible_checkpoint):
    config, params = qwen2_jax.load(divisible_checkpoint)
    ids, mask = ragged_batch(config.vocab_size, 4, 7)
    expected = np.asarray(qwen2_jax.forward(config, params, ids, mask))
    mesh = make_mesh("fsdp=4,tensor=2")
    rules = "mlp=fsdp,embed=tensor"
    _, sharded = qwen2_jax.load(divisible_checkpoint, mesh=mesh, rules=rules)
    assert sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    logits = qwen2_jax.forward(config, sharded, ids, mask, rules=rules)
    np.testing.assert_allclose(np.asarray(logits), expected, rtol=0, atol=1e-5)


def test_each_distinct_shard_is_read_once(divisible_checkpoint):
    """Replicated over 8 devices: the bytes are read once; split 8 ways: still once in all."""
    folder = str(divisible_checkpoint)
    config = read_hf_config(folder)
    total = sum(x.nbytes for x in jax.tree.leaves(qwen2_jax.load(folder)[1]))
    for spec in ("data=8", "fsdp=8", "tensor=8"):
        shardings = param_shardings(config, make_mesh(spec))
        _, read = read_hf_params(HFCheckpoint(folder, config), np.dtype(np.float32), shardings)
        assert read == total, spec


def test_read_slice_matches_full_tensor(divisible_checkpoint):
    """Reading a slice of one tensor equals slicing the whole tensor, for every layout."""
    from qwen2_jax.checkpoint.hf_io import HFCheckpoint

    config = read_hf_config(str(divisible_checkpoint))
    ckpt = HFCheckpoint(str(divisible_checkpoint), config)
    for rule in ckpt.rules[:13]:
        full = ckpt.read(rule)
        index = tuple(slice(n // 4, n // 4 + max(1, n // 2)) for n in rule.our_shape)
        np.testing.assert_array_equal(ckpt.read(rule, index), full[index], rule.hf_name)


@pytest.mark.parametrize("spec", ["fsdp=8", "data=2,fsdp=2,tensor=2"])
def test_init_on_mesh_is_sharded_and_equals_unsharded(spec):
    config = qwen2_jax.Qwen2Config(**{**DIVISIBLE, "num_hidden_layers": 2})
    expected = qwen2_jax.init(config, jax.random.key(7))
    mesh = make_mesh(spec)
    params = qwen2_jax.init(config, jax.random.key(7), mesh=mesh)
    shardings = param_shardings(config, mesh)
    for got, want, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(expected),
                                   jax.tree.leaves(shardings), strict=True):
        assert got.sharding == sharding
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert shard_shape(params["embed_tokens"]["embedding"]) != (128, 64)


def test_activations_are_constrained_at_layer_boundaries():
    """Embedding output, q/k/v, the MLP hidden, each layer's output and the logits."""
    config = qwen2_jax.Qwen2Config(**{**DIVISIBLE, "num_hidden_layers": 2})
    mesh = make_mesh("fsdp=8")
    params = qwen2_jax.init(config, jax.random.key(0), mesh=mesh)
    ids = np.zeros((8, 4), np.int32)

    def program(mesh):
        return _forward.lower(config, np.dtype(np.float32), "none", mesh, DEFAULT_RULES, "sorted",
                              False, params, ids, ids + 1, None, ids).as_text()

    text = program(mesh)
    assert text.count("sharding_constraint") == 7
    assert re.search(r'sharding_constraint %\d+ <@mesh, \[\{"fsdp"\}, \{\}, \{\}\]> : '
                     r"tensor<8x4x128xf32>", text)  # the logits [B, T, V]
    assert program(None).count("sharding_constraint") == 0
