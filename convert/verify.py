"""--verify: the same prompt through the source and the written checkpoint, logits compared."""

from __future__ import annotations

import gc

import numpy as np

import qwen2_jax
from qwen2_jax.sharding import to_host

PROMPT_LENGTH = 16


def prompt(vocab_size: int) -> np.ndarray:
    """A fixed pseudo-random prompt [1, PROMPT_LENGTH] of ids below vocab_size."""
    return np.random.default_rng(0).integers(0, vocab_size, (1, PROMPT_LENGTH))


def logits_of(path: str, dtype: str, mesh=None, rules=None, **quantize) -> np.ndarray:
    config, params = qwen2_jax.load(path, dtype=dtype, mesh=mesh, rules=rules, **quantize)
    logits = to_host(qwen2_jax.forward(config, params, prompt(config.vocab_size),
                                       dtype="float32"))
    del params
    gc.collect()  # one model in memory at a time
    return np.asarray(logits)


def max_logit_difference(source: str, written: str, dtype: str, mesh=None, rules=None,
                         quantize: str | None = None, quantize_embeddings: bool = False) -> float:
    """Both checkpoints loaded by our own loader, stored as `dtype` (so that the source goes
    through the same rounding as the written copy) and computed in float32. A faithful copy
    gives 0.0: the same parameters through the same program. quantize, quantize_embeddings:
    how `written` was quantized; the source is loaded so (quantized as it loads), while the
    written folder loads as it is stored."""
    expected = logits_of(source, dtype, mesh, rules, quantize=quantize,
                         quantize_embeddings=quantize_embeddings)
    return float(np.abs(logits_of(written, dtype, mesh, rules) - expected).max())
