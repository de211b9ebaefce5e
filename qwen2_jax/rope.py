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


def _yarn_settings(config: Qwen2Config) -> tuple[int, float]:
    """(original_max_position_embeddings, factor) of a YaRN config, as transformers reads them."""
    scaling = config.rope_scaling
    original = scaling.get("original_max_position_embeddings", config.max_position_embeddings)
    factor = scaling.get("factor")
    if factor is None:
        factor = config.max_position_embeddings / original
    return original, factor


def _wavelength_factors(config: Qwen2Config) -> np.ndarray:
    """base ** (2i / H), float32 [H/2]: the inverse of RoPE's frequencies."""
    dim, base = config.head_size, config.rope_theta
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    return np.float32(base) ** exponents


def _plain_frequencies(config: Qwen2Config) -> np.ndarray:
    """RoPE's inv_freq float32 [H/2]: base ** (-2i / H)."""
    return (np.float32(1.0) / _wavelength_factors(config)).astype(np.float32)


def _extrapolation_weight(config: Qwen2Config) -> np.ndarray:
    """YaRN's per-frequency weight float32 [H/2] of the original (extrapolated) frequency:
    1 for the fast dimensions, 0 for the slow ones, a linear ramp between. It depends on
    head_dim, base and the original context only, not on the factor."""
    dim, base = config.head_size, config.rope_theta
    scaling = config.rope_scaling
    original, _ = _yarn_settings(config)
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
    return (np.float32(1) - ramp).astype(np.float32)


def dynamic_yarn_scale(config: Qwen2Config, total_lengths) -> np.ndarray:
    """Each request's YaRN factor float32 [B] from its prompt plus new tokens (dynamic YaRN,
    arXiv 2309.00071 section 3.3): clip(total / original context, 1, factor).

    A request that fits the original context gets exactly plain RoPE; one that needs the
    full factor gets what static YaRN gives. Fixed for the whole request, so the keys in its
    cache stay rotated consistently.
    """
    original, factor = _yarn_settings(config)
    ratio = np.asarray(total_lengths, np.float64) / original
    return np.clip(ratio, 1.0, factor).astype(np.float32)


def rope_frequencies(config: Qwen2Config) -> tuple[np.ndarray, float]:
    """Returns (inv_freq float32 [H/2], attention_factor) for the config's rope type.

    `attention_factor` multiplies cos and sin (1.0 for plain RoPE; YaRN's `0.1 ln(s) + 1`).
    """
    if config.rope_type == "default":
        return _plain_frequencies(config), 1.0
    pos_freqs = _wavelength_factors(config)  # [H/2]

    scaling = config.rope_scaling
    _, factor = _yarn_settings(config)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    extrapolation_weight = _extrapolation_weight(config)
    inv_freq_extrapolation = _plain_frequencies(config)
    inv_freq_interpolation = np.float32(1.0) / (np.float32(factor) * pos_freqs)
    inv_freq = (inv_freq_interpolation * (1 - extrapolation_weight)
                + inv_freq_extrapolation * extrapolation_weight)
    return inv_freq.astype(np.float32), float(attention_factor)


def rope_cos_sin(config: Qwen2Config, positions: jnp.ndarray, dtype,
                 scale: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin [B, T, H] for integer positions [B, T]; computed in float32, cast to `dtype`.

    scale [B] (float, traced): each row's own YaRN factor (`dynamic_yarn_scale`) for a YaRN
    config; None: the config's factor (static YaRN, as transformers). A row's factor 1 gives
    bit for bit the angles of plain RoPE.
    """
    if scale is None or config.rope_type != "yarn":
        inv_freq, attention_factor = rope_frequencies(config)
        freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)  # [B, T, H/2]
    else:
        plain = jnp.asarray(_plain_frequencies(config))  # [H/2]
        extrapolation = jnp.asarray(_extrapolation_weight(config))  # [H/2]
        scale = jnp.asarray(scale, jnp.float32)[:, None, None]  # [B, 1, 1]
        scaled = (plain / scale) * (1 - extrapolation) + plain * extrapolation  # [B, 1, H/2]
        inv_freq = jnp.where(scale > 1, scaled, plain)
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
        # YaRN's 0.1 ln(s) + 1 at the row's s; a config that sets attention_factor or mscale
        # gets its static value wherever s > 1.
        explicit = {"attention_factor", "mscale", "mscale_all_dim"} & set(config.rope_scaling)
        scaled_factor = (rope_frequencies(config)[1] if explicit
                         else 0.1 * jnp.log(scale) + 1.0)
        attention_factor = jnp.where(scale > 1, scaled_factor, 1.0)  # [B, 1, 1]
    angles = jnp.concatenate([freqs, freqs], axis=-1)  # [B, T, H]
    cos = jnp.cos(angles) * attention_factor
    sin = jnp.sin(angles) * attention_factor
    return cos.astype(dtype), sin.astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates x [B, T, heads, H] by cos/sin [B, T, H]: element i pairs with element i + H/2."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]
