"""The serving engine's compiled programs: prefill one slot, one decode step over all slots.

Everything a slot's sampling needs is a per-row array (`RowSettings`), never a static
argument, so one compiled decode step serves every mix of requests. The cache is per layer
(`{"k", "v"}`: tuples of [B, K, S, H], as `Qwen2ForCausalLM(scan_layers=False)` takes it;
an int8 cache adds "k_scale", "v_scale" tuples of [B, K, S], which every helper here carries
along as it does the keys) and donated by every program, so it is written in place.

With LoRA adapters served (`lora.stack_adapters` leaves beside the kernels), each program
takes `adapter_rows` [B, A]: every row's one-hot adapter slot (slot 0 the base), so rows of
different adapters share one step; without adapters it is None and the programs are as
before.

A row's random key is derived from its request's seed, its sample index (`n`) and the index
of the token being chosen, never from the batch: a seeded request gives the same tokens alone
and beside any other requests.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from qwen2_jax import lora
from qwen2_jax.attention import CACHE_AXES
from qwen2_jax.decoding import _model
from qwen2_jax.sharding import named_sharding

TOP_LOGPROBS = 20  # OpenAI's maximum top_logprobs; computed every step (a cheap top-k)


class RowSettings(NamedTuple):
    """Per-row sampling settings, each [B] (neutral values switch a step off)."""

    temperature: jnp.ndarray  # float32; 0 = greedy
    top_k: jnp.ndarray  # int32; 0 = off
    top_p: jnp.ndarray  # float32; 1 = off
    min_p: jnp.ndarray  # float32; 0 = off
    repetition_penalty: jnp.ndarray  # float32; 1 = off (prompt and output tokens)
    presence_penalty: jnp.ndarray  # float32; 0 = off (output tokens, as vLLM/OpenAI)
    frequency_penalty: jnp.ndarray  # float32; 0 = off (output tokens)
    seed: jnp.ndarray  # uint32
    sample_index: jnp.ndarray  # int32: which of the request's n choices this row is
    token_index: jnp.ndarray  # int32: the index of the token about to be chosen


class Chosen(NamedTuple):
    """What a step hands the host for each row [B]: the token, its log-probability under the
    model (log-softmax of the raw logits, as `forward`), and the TOP_LOGPROBS most likely."""

    token: jnp.ndarray  # int32 [B]
    logprob: jnp.ndarray  # float32 [B]
    top_ids: jnp.ndarray  # int32 [B, TOP_LOGPROBS]
    top_logprobs: jnp.ndarray  # float32 [B, TOP_LOGPROBS]


def _filter(x: jnp.ndarray, s: RowSettings) -> jnp.ndarray:
    """Temperature, then top-k, top-p and min-p per row, with transformers' semantics (ties
    with the k-th value stay; top-p keeps the smallest most-likely set reaching p)."""
    x = x / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]

    def cut_sorted(x):
        ascending = jnp.sort(x, axis=-1)  # [B, V]
        vocab = x.shape[-1]
        kth = jnp.take_along_axis(ascending, jnp.clip(vocab - s.top_k, 0, vocab - 1)[:, None],
                                  axis=-1)  # [B, 1]
        kth = jnp.where(s.top_k[:, None] > 0, kth, -jnp.inf)
        ascending = jnp.where(ascending < kth, -jnp.inf, ascending)
        cumulative = jnp.cumsum(jax.nn.softmax(ascending, axis=-1), axis=-1)
        removed = jnp.sum(cumulative <= (1 - s.top_p)[:, None], axis=-1)  # a prefix
        removed = jnp.minimum(removed, vocab - 1)  # the most likely token always stays
        p_cut = jnp.take_along_axis(ascending, removed[:, None], axis=-1)  # [B, 1]
        p_cut = jnp.where(s.top_p[:, None] < 1, p_cut, -jnp.inf)
        return jnp.where(x < jnp.maximum(kth, p_cut), -jnp.inf, x)

    # The sort is the costly part of sampling: only when some row asks for it.
    x = jax.lax.cond(jnp.any((s.top_k > 0) | (s.top_p < 1)), cut_sorted, lambda x: x, x)

    def cut_min_p(x):
        probs = jax.nn.softmax(x, axis=-1)
        threshold = s.min_p[:, None] * probs.max(axis=-1, keepdims=True)
        return jnp.where(probs < threshold, -jnp.inf, x)

    return jax.lax.cond(jnp.any(s.min_p > 0), cut_min_p, lambda x: x, x)


def choose(logits: jnp.ndarray, prompt_mask: jnp.ndarray, counts: jnp.ndarray, s: RowSettings,
           vocab_size: int) -> Chosen:
    """The next token of each row from float32 logits [B, V]. prompt_mask bool [B, V]: the
    row's prompt ids; counts int32 [B, V]: how often each id was generated so far."""
    logits = logits.astype(jnp.float32)
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [B, V]: as forward's, every row
    # Penalties act on the raw logits, as transformers' (the repetition penalty's sign test
    # is not shift-invariant); the embedding's padding rows (ids past the tokenizer's
    # vocab_size) are never chosen.
    x = jnp.where(jnp.arange(logits.shape[-1]) < vocab_size, logits, -jnp.inf)
    seen = prompt_mask | (counts > 0)
    rp = s.repetition_penalty[:, None]
    x = jnp.where(seen, jnp.where(x < 0, x * rp, x / rp), x)
    x = (x - s.frequency_penalty[:, None] * counts
         - s.presence_penalty[:, None] * (counts > 0))

    def sampled(x):
        # Inverse-CDF sampling: one uniform number per row (a Gumbel draw over the whole
        # vocabulary costs ~5x the rest of the step's sampling on CPU).
        cdf = jnp.cumsum(jax.nn.softmax(_filter(x, s), axis=-1), axis=-1)  # [B, V]

        def uniform(seed, sample_index, token_index):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), sample_index),
                                     token_index)
            return jax.random.uniform(key, (), jnp.float32)

        u = jax.vmap(uniform)(s.seed, s.sample_index, s.token_index) * cdf[:, -1]  # [B]
        drawn = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), x.shape[-1] - 1)
        return jnp.where(s.temperature > 0, drawn, jnp.argmax(x, axis=-1))

    token = jax.lax.cond(jnp.any(s.temperature > 0), sampled,
                         lambda x: jnp.argmax(x, axis=-1), x).astype(jnp.int32)
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
    logprob = jnp.take_along_axis(logprobs, token[:, None], axis=-1)[:, 0]
    return Chosen(token, logprob, top_ids.astype(jnp.int32), top_logprobs)


def _placed(mesh, rules, cache: dict, state: dict | None = None):
    """The cache split as CACHE_AXES and the decode state replicated, as the engine allocates
    them: each program hands the next its inputs placed as that one was compiled for (left to
    itself, XLA may return another layout, which a compiled program refuses)."""
    if mesh is None:
        return cache, state

    def place(x, axes):
        return jax.lax.with_sharding_constraint(x, named_sharding(axes, x.shape, mesh, rules))

    cache = jax.tree.map(lambda c: place(c, CACHE_AXES[:c.ndim]), cache)  # scales: no H
    state = None if state is None else jax.tree.map(lambda x: place(x, ()), state)
    return cache, state


def _adapters(adapter_rows):
    """Within it (at trace time), `Linear` applies each row's adapter slot: adapter_rows
    [B, A] one-hot, or None when no adapters are served."""
    if adapter_rows is None:
        return contextlib.nullcontext()
    return lora.settings(rows=adapter_rows)


def _rows(cache: dict, slot, count: int = 1) -> dict:
    return {name: tuple(jax.lax.dynamic_slice_in_dim(c, slot, count, axis=0) for c in layers)
            for name, layers in cache.items()}


def _put_rows(cache: dict, rows: dict, slot) -> dict:
    return {name: tuple(jax.lax.dynamic_update_slice_in_dim(c, r, slot, axis=0)
                        for c, r in zip(layers, rows[name], strict=True))
            for name, layers in cache.items()}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules", "vocab_size"),
                   donate_argnames=("cache", "state"))
def prefill_chunk(config, dtype, mesh, rules, vocab_size, params, cache, state, slot, ids, start,
                  last, prompt_mask, settings, rope_scale, adapter_rows=None):
    """Writes one chunk of slot `slot`'s prompt, ids [1, C], into its cache rows at
    start .. start + C - 1. `last` (an index into the chunk, or -1 while the prompt goes on)
    marks the prompt's final token: then the row's first token is chosen from its logits,
    and the row's decode state (token, prompt_mask [V], counts) is set.

    settings: this row's RowSettings, each [1]; adapter_rows: its adapter slot [1, A].
    Returns (cache, state, Chosen of [1]).
    """
    row_cache = _rows(cache, slot)
    with _adapters(adapter_rows):
        logits, row_cache = _model(config, dtype, mesh, rules, params, row_cache, ids,
                                   jnp.reshape(start, (1,)), jnp.maximum(last, 0)[None],
                                   rope_scale, scan_layers=False)
    cache = _put_rows(cache, row_cache, slot)
    mask = prompt_mask[None]  # [1, V]
    chosen = choose(logits, mask, jnp.zeros(mask.shape, jnp.int32), settings, vocab_size)
    done = last >= 0

    def set_row(array, value):
        return jnp.where(done, jax.lax.dynamic_update_slice_in_dim(array, value, slot, 0), array)

    state = {"token": set_row(state["token"], chosen.token),
             "prompt_mask": set_row(state["prompt_mask"], mask),
             "counts": set_row(state["counts"], jax.nn.one_hot(
                 chosen.token, mask.shape[-1], dtype=jnp.int32))}
    return *_placed(mesh, rules, cache, state), chosen


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules", "vocab_size"),
                   donate_argnames=("cache", "state"))
def decode(config, dtype, mesh, rules, vocab_size, params, cache, state, lengths, active,
           settings, rope_scale, adapter_rows=None):
    """One token for each of the first n = len(lengths) slots (the engine keeps its requests
    in the lowest slots, so a lightly loaded server runs a small batch): feeds
    state["token"][:n] at slot lengths[b] and chooses the next. Rows that are not `active`
    [n] (free, or still in prefill) compute at a slot their own later writes overwrite, and
    leave their state alone. adapter_rows [n, A]: each row's adapter slot. Returns (cache,
    state, Chosen of [n])."""
    n = lengths.shape[0]
    rows_cache = _rows(cache, 0, n)
    rows_state = {name: value[:n] for name, value in state.items()}
    with _adapters(adapter_rows):
        logits, rows_cache = _model(config, dtype, mesh, rules, params, rows_cache,
                                    rows_state["token"][:, None], lengths,
                                    jnp.zeros_like(lengths), rope_scale, scan_layers=False)
    cache = _put_rows(cache, rows_cache, 0)
    chosen = choose(logits, rows_state["prompt_mask"], rows_state["counts"], settings,
                    vocab_size)
    counts = rows_state["counts"].at[jnp.arange(n), chosen.token].add(
        active.astype(jnp.int32))
    token = jnp.where(active, chosen.token, rows_state["token"])
    state = {**state,
             "token": jax.lax.dynamic_update_slice_in_dim(state["token"], token, 0, 0),
             "counts": jax.lax.dynamic_update_slice_in_dim(state["counts"], counts, 0, 0)}
    return *_placed(mesh, rules, cache, state), chosen


@functools.partial(jax.jit, static_argnames=("mesh", "rules"), donate_argnames=("cache", "state"))
def move_row(mesh, rules, cache, state, source, target):
    """Copies slot `source`'s cache rows and decode state into slot `target` (the engine
    fills the hole a finished request leaves with its last slot)."""
    cache = _put_rows(cache, _rows(cache, source), target)
    state = {name: jax.lax.dynamic_update_slice_in_dim(
        value, jax.lax.dynamic_slice_in_dim(value, source, 1, 0), target, 0)
        for name, value in state.items()}
    return _placed(mesh, rules, cache, state)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"),
                   donate_argnames=("cache",))
def score_chunk(config, dtype, mesh, rules, params, cache, slot, ids, start,
                targets, rope_scale, adapter_rows=None):
    """Like a prefill chunk, but returns the log-probabilities of every position's next
    token `targets` [1, C] (echo: prompt log-probs) and each position's TOP_LOGPROBS. Returns
    (cache, logprob [C], top_ids [C, TOP_LOGPROBS], top_logprobs [C, TOP_LOGPROBS])."""
    row_cache = _rows(cache, slot)
    with _adapters(adapter_rows):
        logits, row_cache = _model(config, dtype, mesh, rules, params, row_cache, ids,
                                   jnp.reshape(start, (1,)), None, rope_scale,
                                   scan_layers=False)
    cache, _ = _placed(mesh, rules, _put_rows(cache, row_cache, slot))
    logprobs = jax.nn.log_softmax(logits[0].astype(jnp.float32), axis=-1)  # [C, V]
    top_logprobs, top_ids = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
    logprob = jnp.take_along_axis(logprobs, targets[0][:, None], axis=-1)[:, 0]
    return cache, logprob, top_ids.astype(jnp.int32), top_logprobs
