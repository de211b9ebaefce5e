"""Model internals: masks and positions by hand, logical axes, remat, the name table's shapes."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_attention import causal_mask, sliding_window_mask

import qwen2_jax
from qwen2_jax import PRESETS, Qwen2Config
from qwen2_jax.api import _forward
from qwen2_jax.checkpoint.mapping import stacked_groups, stacked_shape, tensor_rules
from qwen2_jax.masks import positions_from_mask
from qwen2_jax.model import REMAT_POLICIES
from qwen2_jax.sharding import DEFAULT_RULES

LOGICAL_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "expert", "layers",
                 None}
SMALL = Qwen2Config(vocab_size=37, hidden_size=24, intermediate_size=20, num_hidden_layers=2,
                    num_attention_heads=6, num_key_value_heads=2)


def test_positions_count_real_tokens_and_restart_per_segment():
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 0, 0]])
    segments = np.array([[0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 2, 2, 2, 3, 0, 0]])
    expected = [[0, 0, 0, 1, 2, 3, 4, 4], [0, 1, 0, 1, 2, 0, 0, 0]]
    np.testing.assert_array_equal(positions_from_mask(jnp.asarray(mask), jnp.asarray(segments)),
                                  expected)


def test_causal_mask_blocks_padding_and_other_segments():
    mask = causal_mask(jnp.array([[0, 1, 1, 1]]), jnp.array([[1, 1, 1, 2]]))[0]
    expected = [[0, 0, 0, 0],
                [0, 1, 0, 0],
                [0, 1, 1, 0],
                [0, 0, 0, 1]]
    np.testing.assert_array_equal(mask, np.array(expected, bool))


def test_sliding_window_sees_the_window_most_recent_keys():
    full = causal_mask(jnp.ones((1, 5), int), jnp.zeros((1, 5), int))
    window = sliding_window_mask(full, 2)[0]
    expected = [[1, 0, 0, 0, 0],
                [1, 1, 0, 0, 0],
                [0, 1, 1, 0, 0],
                [0, 0, 1, 1, 0],
                [0, 0, 0, 1, 1]]
    np.testing.assert_array_equal(window, np.array(expected, bool))


@pytest.mark.parametrize("name", [*sorted(PRESETS), "small_tied"])
def test_every_parameter_has_logical_axis_names(name):
    config = PRESETS.get(name) or dataclasses.replace(SMALL, tie_word_embeddings=True)
    axes = qwen2_jax.param_logical_axes(config)
    shapes = jax.eval_shape(lambda: qwen2_jax.init(config, jax.random.key(0)))
    for spec, shape in zip(jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.P)),
                           jax.tree.leaves(shapes), strict=True):
        assert len(spec) == len(shape.shape) and set(spec) <= LOGICAL_NAMES, (spec, shape)
    assert axes["layers"]["self_attn"]["q_proj"]["kernel"] == jax.P(
        "layers", "embed", "heads", "head_dim")


@pytest.mark.parametrize("tied", [True, False])
def test_init_layout_equals_the_name_table(tied):
    """The pytree init builds and the one the HF loader fills are the same tree and shapes."""
    config = dataclasses.replace(SMALL, tie_word_embeddings=tied)
    shapes = jax.eval_shape(lambda: qwen2_jax.init(config, jax.random.key(0)))
    flat = {tuple(k.key for k in path): leaf.shape
            for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)}
    from_table = {path: stacked_shape(group)
                  for path, group in stacked_groups(tensor_rules(config)).items()}
    assert flat == from_table


def test_remat_policies_change_no_value_or_gradient():
    params = qwen2_jax.init(SMALL, jax.random.key(1))
    ids = jax.random.randint(jax.random.key(2), (2, 9), 0, SMALL.vocab_size)

    def loss(p, remat):
        return jnp.mean(qwen2_jax.forward(SMALL, p, ids, remat=remat) ** 2)

    ref_loss, ref_grad = jax.value_and_grad(loss)(params, "none")
    for remat in REMAT_POLICIES:
        value, grad = jax.value_and_grad(loss)(params, remat)
        np.testing.assert_allclose(value, ref_loss, rtol=1e-6)
        for a, b in zip(jax.tree.leaves(grad), jax.tree.leaves(ref_grad), strict=True):
            np.testing.assert_allclose(a, b, atol=1e-6)


def test_scan_compiles_one_layer_body():
    """Depth does not unroll: the lowered program holds one layer body however deep the model."""
    def text(layers):
        config = dataclasses.replace(SMALL, num_hidden_layers=layers)
        params = jax.eval_shape(lambda: qwen2_jax.init(config, jax.random.key(0)))
        ids = jnp.zeros((1, 4), jnp.int32)
        return _forward.lower(config, jnp.dtype(jnp.float32), "none", None, DEFAULT_RULES,
                              "sorted", False, params, ids, ids + 1, None, ids).as_text()

    assert abs(len(text(2)) - len(text(12))) < 200
