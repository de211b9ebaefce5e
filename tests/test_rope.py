"""Rotary embeddings: frequencies equal transformers' for plain RoPE and every YaRN option."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers.models.qwen2.modeling_qwen2 import Qwen2RotaryEmbedding

from qwen2_jax import Qwen2Config
from qwen2_jax.rope import apply_rope, rope_cos_sin

BASE = dict(model_type="qwen2", hidden_size=96, num_attention_heads=3, num_key_value_heads=1,
            intermediate_size=64, num_hidden_layers=1, vocab_size=50, rope_theta=1e6,
            max_position_embeddings=4096)


@pytest.mark.parametrize(
    "rope_scaling",
    [
        None,
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
        {"rope_type": "yarn", "factor": 2.5, "original_max_position_embeddings": 512,
         "beta_fast": 16, "beta_slow": 2},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
         "truncate": False},
        {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
         "mscale": 0.8, "mscale_all_dim": 1.2},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024,
         "attention_factor": 1.3},
    ],
)
def test_cos_sin_equal_transformers(rope_scaling):
    d = {**BASE, "rope_scaling": rope_scaling}
    rotary = Qwen2RotaryEmbedding(HFQwen2Config.from_dict(dict(d)))
    positions = np.array([[0, 1, 17, 1023, 1024, 3000, 4095]])
    ref_cos, ref_sin = rotary(torch.zeros(1, dtype=torch.float32), torch.as_tensor(positions))
    cos, sin = rope_cos_sin(Qwen2Config.from_hf(d), jnp.asarray(positions), jnp.float32)
    np.testing.assert_allclose(np.asarray(cos), ref_cos.numpy(), atol=2e-6, rtol=0)
    np.testing.assert_allclose(np.asarray(sin), ref_sin.numpy(), atol=2e-6, rtol=0)


def test_rotate_half_pairs_i_with_i_plus_half():
    """Hand-computed: H=4, angle pi/2 on every frequency maps (a, b, c, d) to (-c, -d, a, b)."""
    x = jnp.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)  # [B, T, heads, H]
    cos = jnp.zeros((1, 1, 4))
    sin = jnp.ones((1, 1, 4))
    np.testing.assert_allclose(np.asarray(apply_rope(x, cos, sin)).ravel(), [-3, -4, 1, 2])
    # Interleaved pairs (GPT-J style) would give (-2, 1, -4, 3) instead.
