"""Rotary position embeddings: the rotate-half convention, plain or YaRN-scaled.

The frequencies are computed on the host in numpy float32 with the same formulas and operation
order as transformers' `compute_default_rope_parameters` / `_compute_yarn_parameters` in torch
float32, so both libraries rotate by the same angles.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qwen2_jax.config import Qwen2Config


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """Returns (inv_freq float32 [H/2], attention_factor) for the config's rope type.

    `attention_factor` multiplies cos and sin (1.0 for plain RoPE; YaRN's `0.1 ln(s) + 1`).
    """
    dim, base = config.head_size, config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    pos_freqs = np.float32(base) ** exponents  # [H/2]
    if config.rope_type == "default":
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    scaling = config.rope_scaling
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        # The dimension whose wavelength makes `rotations` turns over the original context.
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low))
                   / np.float32(high - low), 0, 1)  # [H/2]
    extrapolation_weight = (np.float32(1) - ramp).astype(np.float32)
    inv_freq_extrapolation = np.float32(1.0) / pos_freqs
    inv_freq_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_weight)
                + inv_freq_extrapolation * extrapolation_weight)
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(config: Qwen2Config, positions: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, H] for integer positions [B, T]; computed in float32, cast to `dtype`."""
    inv_freq, attention_factor = rope_frequencies(config)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    cos = jnp.cos(angles) * attention_factor
    sin = jnp.sin(angles) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, heads, H] by cos/sin [B, T, H]: element i pairs with element i + H/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
