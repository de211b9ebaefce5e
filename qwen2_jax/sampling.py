"""Choosing the next token from logits, with transformers' processors and their order.

`process` applies, as transformers' generate does: padding rows of the embedding (ids at or
past the tokenizer's vocabulary) masked out, then repetition penalty (a processor, so greedy
decoding applies it too), then the sampling warpers temperature, top-k, top-p, min-p.
Everything runs on device in float32 on [B, V] logits.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

NEG_INF = -jnp.inf


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How to pick tokens. temperature 0 is greedy (argmax). None (or the neutral value:
    top_k 0, top_p 1, min_p 0, repetition_penalty 1) turns a step off. vocab_size: ids at or
    past it are never chosen (the embedding may have more rows than the tokenizer has ids)."""

    vocab_size: int
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    def __post_init__(self):
        checks = [
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k is None or self.top_k >= 0, "top_k must be >= 0"),
            (self.top_p is None or 0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.min_p is None or 0 <= self.min_p <= 1, "min_p must be in [0, 1]"),
            (self.repetition_penalty is None or self.repetition_penalty > 0,
             "repetition_penalty must be > 0"),
            (self.vocab_size > 0, "vocab_size must be > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process(logits: jnp.ndarray, seen: jnp.ndarray, s: Sampling) -> jnp.ndarray:
    """The processed logits [B, V] float32 (-inf where a token may not be chosen).

    seen: bool [B, V], the ids in each row's prompt and output so far (repetition penalty).
    """
    logits = logits.astype(jnp.float32)
    vocab = jnp.arange(logits.shape[-1])
    logits = jnp.where(vocab < s.vocab_size, logits, NEG_INF)
    if s.repetition_penalty not in (None, 1.0):
        penalized = jnp.where(logits < 0, logits * s.repetition_penalty,
                              logits / s.repetition_penalty)
        logits = jnp.where(seen, penalized, logits)
    if s.greedy:
        return logits
    logits = logits / s.temperature
    if s.top_k:  # ties with the k-th value stay, as transformers' `scores < kth` test
        kth = jax.lax.top_k(logits, min(s.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, NEG_INF, logits)
    if s.top_p is not None and s.top_p < 1:
        logits = _top_p(logits, s.top_p)
    if s.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        threshold = s.min_p * probs.max(axis=-1, keepdims=True)
        logits = jnp.where(probs < threshold, NEG_INF, logits)
    return logits


def _top_p(logits: jnp.ndarray, top_p: float) -> jnp.ndarray:
    """Keeps the smallest set of most likely tokens whose probability reaches top_p: sorted
    ascending, a token goes when the mass up to and including it is <= 1 - top_p (the most
    likely token always stays), as transformers' TopPLogitsWarper."""
    order = jnp.argsort(logits, axis=-1)  # ascending  [B, V]
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = cumulative <= 1 - top_p
    remove_sorted = remove_sorted.at[:, -1].set(False)
    remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(
        remove_sorted)
    return jnp.where(remove, NEG_INF, logits)


def choose(logits: jnp.ndarray, seen: jnp.ndarray, key: jax.Array, s: Sampling) -> jnp.ndarray:
    """The next token id of each row [B] int32."""
    processed = process(logits, seen, s)
    if s.greedy:
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, processed, axis=-1).astype(jnp.int32)
