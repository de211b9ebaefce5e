"""Generation: a preallocated KV cache, chunked prefill, and the decode loop on device.

The cache holds each row's tokens at the slot of their position ({"k", "v"}: [L, B, K, S, H]),
with per-row lengths [B]. A ragged batch is right-padded only for prefill; row b's next token
goes to slot lengths[b], so no row ever recomputes or attends to padding. Prompts go into the
cache in chunks of at most `prefill_chunk` tokens, each attending to the cache so far, so
activation memory does not grow with the prompt; only each row's last position gets logits.
Chunk widths and cache sizes are rounded up to buckets, so a handful of shapes compile. The
decode loop is one `lax.while_loop` (cache donated), stopping each row at a stop token or
max_new_tokens.

`init_cache`, `prefill` and `decode_step` are usable one step at a time (a continuous-batching
server builds on them); `generate` is the whole job.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from qwen2_jax import attention
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import check_token_ids, compute_dtype
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.quantize import KV_CACHE_DTYPES
from qwen2_jax.rope import dynamic_yarn_scale
from qwen2_jax.sampling import Sampling, choose
from qwen2_jax.sharding import (
    mesh_context,
    mesh_of,
    named_sharding,
    resolve_rules,
    shard_input,
    to_host,
    use_mesh,
)

logger = logging.getLogger("qwen2_jax")

CACHE_AXES = ("layers", *attention.CACHE_AXES)
MIN_BUCKET = 16
PREFILL_CHUNK = 2048
YARN_MODES = ("dynamic", "static")


def bucket(n: int) -> int:
    """The compiled length for n tokens: the next power of two, at least MIN_BUCKET."""
    return max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length())


def init_cache(config: Qwen2Config, batch: int, slots: int, dtype, mesh=None,
               rules=None, kv_cache_dtype: str = "auto") -> dict:
    """An empty cache {"k", "v"}: [L, B, K, S, H] in `dtype`, sharded over batch and kv heads
    on `mesh` (rules as everywhere). kv-head major: see `blockwise.attention`.
    kv_cache_dtype "int8": int8 keys and values, and float32 "k_scale", "v_scale" [L, B, K, S]
    (one a token and head; `quantize.quantize_kv`): half of bfloat16's bytes."""
    shape = (config.num_hidden_layers, batch, config.num_key_value_heads, slots,
             config.head_size)
    check_kv_cache_dtype(kv_cache_dtype)
    int8 = kv_cache_dtype == "int8"
    specs = {"k": (shape, jnp.int8 if int8 else dtype), "v": (shape, jnp.int8 if int8 else dtype)}
    if int8:
        specs |= {name: (shape[:-1], jnp.float32) for name in ("k_scale", "v_scale")}
    rules = None if mesh is None else resolve_rules(rules, mesh)

    def zeros(shape, dtype):
        sharding = None if mesh is None else named_sharding(CACHE_AXES[:len(shape)], shape,
                                                            mesh, rules)
        # Created in place, shard by shard (no per-call jit to compile).
        return jnp.zeros(shape, dtype, device=sharding)

    return {name: zeros(*spec) for name, spec in specs.items()}


def check_kv_cache_dtype(kv_cache_dtype: str) -> None:
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype {kv_cache_dtype!r} is not one of {KV_CACHE_DTYPES} "
                         "(auto: the compute dtype)")


def unstack_layers(params: dict, layers: int) -> dict:
    """Params for `Qwen2ForCausalLM(scan_layers=False)`: `layers` [L, ...] split into
    `layers_0`.. (a copy of the layer weights, made once per generate call)."""
    if "layers" not in params:  # a config whose layers differ never stacks them
        return params
    out = {k: v for k, v in params.items() if k != "layers"}
    for i in range(layers):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], params["layers"])
    return out


def _model(config, dtype, mesh, rules, params, cache, ids, cache_index, logits_at,
           rope_scale, scan_layers=True):
    with use_mesh(mesh, rules):
        return Qwen2ForCausalLM(config, dtype=dtype, scan_layers=scan_layers).apply(
            {"params": params}, ids, None, None, None, cache=cache, cache_index=cache_index,
            logits_at=logits_at, rope_scale=rope_scale)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"),
                   donate_argnames=("cache",))
def _prefill_chunk(config, dtype, mesh, rules, params, cache, ids, start, lengths, logits,
                   rope_scale):
    """Writes chunk ids [B, C] into slots start .. start + C - 1 of every row (attending to
    the slots before), and takes over `logits` [B, V] for each row whose last prompt token
    (lengths[b] - 1) is in this chunk."""
    width = ids.shape[1]
    last = lengths - 1 - start  # [B]: the row's last token, as an index into this chunk
    here = (last >= 0) & (last < width)
    new_logits, cache = _model(config, dtype, mesh, rules, params, cache, ids,
                               jnp.full_like(lengths, start), jnp.clip(last, 0, width - 1),
                               rope_scale)
    return jnp.where(here[:, None], new_logits, logits), cache


def prefill(config, dtype, mesh, rules, params, cache, ids, lengths, chunk: int = PREFILL_CHUNK,
            rope_scale=None):
    """Runs right-padded prompts ids [B, T] (lengths [B]) into an empty cache, `chunk`
    tokens at a time (T must be a multiple of the chunk width, min(chunk, T)).

    Returns (float32 logits [B, V] at each row's last prompt token, cache); the rows'
    cache lengths are now `lengths`. rope_scale [B]: per-row YaRN factors (`generate`'s
    dynamic YaRN) or None. One compiled program per chunk width serves every chunk.
    """
    width = min(chunk, ids.shape[1])
    if ids.shape[1] % width:
        raise ValueError(f"prefill: {ids.shape[1]} tokens is not a multiple of the chunk "
                         f"width {width}")
    lengths = jnp.asarray(lengths)
    logits = jnp.zeros((ids.shape[0], config.vocab_size), jnp.float32)
    for start in range(0, ids.shape[1], width):
        logits, cache = _prefill_chunk(config, dtype, mesh, rules, params, cache,
                                       ids[:, start:start + width], jnp.int32(start), lengths,
                                       logits, rope_scale)
    return logits, cache


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"),
                   donate_argnames=("cache",))
def _scored_chunk(config, dtype, mesh, rules, params, cache, ids, targets, start):
    """Writes chunk ids [B, C] at slots start.. and returns (float32 log-prob [B, C] of each
    `targets` token under the logits at its position, cache)."""
    logits, cache = _model(config, dtype, mesh, rules, params, cache, ids,
                           jnp.full((ids.shape[0],), start, jnp.int32), None, None)
    logprobs = jax.nn.log_softmax(logits, axis=-1)  # [B, C, V]
    return jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0], cache


def cached_logprobs(config: Qwen2Config, params: dict, ids, chunk: int = 512, *,
                    kv_cache_dtype: str = "auto", dtype=None, mesh=None,
                    rules=None) -> np.ndarray:
    """Log-probs [B, T - 1] of tokens 1.. of ids [B, T] (whole rows, no padding), each
    predicted through the KV cache as generation sees it: `chunk` tokens at a time, each
    attending to the cache written so far. With kv_cache_dtype "int8" this measures what
    the int8 cache costs (the model's own `forward` never stores keys).
    """
    ids = np.asarray(ids, np.int32)
    check_token_ids(ids, config.vocab_size, "ids")
    check_kv_cache_dtype(kv_cache_dtype)
    batch, length = ids.shape
    width = min(chunk, bucket(length))
    padded = -(-length // width) * width
    tokens = np.zeros((batch, padded + 1), np.int32)
    tokens[:, :length] = ids
    mesh = mesh if mesh is not None else mesh_of(params)
    rules = resolve_rules(rules, mesh)
    dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype(params)
    out = []
    with mesh_context(mesh):
        cache = init_cache(config, batch, bucket(padded), dtype, mesh, rules, kv_cache_dtype)
        for start in range(0, padded, width):
            logprobs, cache = _scored_chunk(config, dtype, mesh, rules, params, cache,
                                            tokens[:, start:start + width],
                                            tokens[:, start + 1:start + width + 1],
                                            jnp.int32(start))
            out.append(to_host(logprobs))
    return np.concatenate(out, axis=1)[:, :length - 1]


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"),
                   donate_argnames=("cache",))
def decode_step(config, dtype, mesh, rules, params, cache, lengths, tokens, rope_scale=None):
    """Appends one token per row (tokens [B]) at slot lengths[b]; returns (float32 logits
    [B, V] for the next token, cache). The caller adds 1 to lengths."""
    return _model(config, dtype, mesh, rules, params, cache, tokens[:, None], lengths,
                  jnp.zeros_like(lengths), rope_scale)


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules", "sampling",
                                             "max_new_tokens", "stream"),
                   donate_argnames=("cache",))
def _decode_loop(config, dtype, mesh, rules, sampling, max_new_tokens, stream, params, cache,
                 lengths, logits, seen, stop_ids, key, rope_scale):
    """Samples up to max_new_tokens per row on device. Returns (tokens [B, N] int32, the
    number each row produced before its stop token or the limit [B], cache, lengths)."""
    batch = logits.shape[0]
    rows = jnp.arange(batch)
    # Per-layer weights and cache, split once here, so no step copies them out of [L, ...].
    layer_params = unstack_layers(params, config.num_hidden_layers)
    cache = {name: tuple(stacked) for name, stacked in cache.items()}

    def body(state):
        step, cache, lengths, logits, seen, out, done, count, key = state
        key, step_key = jax.random.split(key)
        token = choose(logits, seen, step_key, sampling)  # [B]
        stopped = jnp.isin(token, stop_ids)
        live = ~done & ~stopped
        out = out.at[:, step].set(token)
        count = count + live
        if stream:  # hands each step's tokens to the host as they come; no round trip
            io_callback(_stream_callback, None, token, live, ordered=True)
        done = done | stopped | (step + 1 >= max_new_tokens)
        seen = seen.at[rows, token].set(True)
        logits, cache = _model(config, dtype, mesh, rules, layer_params, cache, token[:, None],
                               lengths, jnp.zeros_like(lengths), rope_scale, scan_layers=False)
        return step + 1, cache, lengths + 1, logits, seen, out, done, count, key

    def running(state):
        step, *_, done, _, _ = state
        return (step < max_new_tokens) & ~jnp.all(done)

    out = jnp.zeros((batch, max_new_tokens), jnp.int32)
    state = (jnp.int32(0), cache, lengths, logits, seen, out, jnp.zeros(batch, bool),
             jnp.zeros(batch, jnp.int32), key)
    _, cache, lengths, _, _, out, _, count, _ = jax.lax.while_loop(running, body, state)
    return out, count, {name: jnp.stack(layers) for name, layers in cache.items()}, lengths


def position_limit(config: Qwen2Config) -> int:
    """The positions the model was made for: max_position_embeddings, or with YaRN the factor
    times the original context when that is more (Qwen2.5's recipe keeps
    max_position_embeddings=32768 and adds factor 4 for 131,072 tokens)."""
    if config.rope_type != "yarn":
        return config.max_position_embeddings
    original = config.rope_scaling.get("original_max_position_embeddings",
                                       config.max_position_embeddings)
    factor = config.rope_scaling.get("factor") or config.max_position_embeddings / original
    return max(config.max_position_embeddings, int(factor * original))


def check_length(config: Qwen2Config, lengths: np.ndarray, max_new_tokens: int,
                 allow_long: bool) -> None:
    """Refuses prompt + max_new_tokens past `position_limit` (positions the model never saw in
    training give degraded text, not an error), unless `allow_long`: then one warning."""
    limit = position_limit(config)
    row = int(np.argmax(lengths))
    total = int(lengths[row]) + max_new_tokens
    if total <= limit:
        return
    yarn = f", raised to {limit} by YaRN" if limit != config.max_position_embeddings else ""
    message = (f"prompts[{row}] has {lengths[row]} tokens; with max_new_tokens={max_new_tokens} "
               f"that is {total} positions, past the model's max_position_embeddings="
               f"{config.max_position_embeddings}{yarn}")
    if not allow_long:
        raise ValueError(f"{message}. Shorten the prompt or lower max_new_tokens, or pass "
                         "allow_long=True to generate past the limit anyway (quality degrades)")
    logger.warning("%s; generating anyway (allow_long=True), quality may degrade", message)


_stream_sink = None


def _stream_callback(tokens, live):
    if _stream_sink is not None:
        _stream_sink(np.asarray(tokens), np.asarray(live))


def generate(config: Qwen2Config, params: dict, prompts: list[list[int]], max_new_tokens: int = 128,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float | None = None,
             stop_token_ids=None, seed: int = 0, *, vocab_size: int | None = None, dtype=None,
             mesh=None, rules=None, on_tokens=None, allow_long: bool = False,
             prefill_chunk: int = PREFILL_CHUNK, yarn: str | None = None,
             kv_cache_dtype: str = "auto") -> list[list[int]]:
    """Generated token ids per prompt (prompt and stop token excluded), as DESIGN.md.

    prompts: token-id lists, ragged. temperature 0: greedy; else sampling with top_k, top_p,
    min_p (transformers' semantics and order, after repetition_penalty). stop_token_ids: a row
    ends at the first of them. seed: the same seed gives the same tokens. vocab_size: ids at or
    past it are never produced (default config.vocab_size; pass the tokenizer's). dtype:
    compute dtype (default the params'). on_tokens(tokens [B], live [B]): called on the host
    with each step's tokens as they are produced (streaming). allow_long: go past the model's
    position limit with a warning instead of an error (see `check_length`). prefill_chunk:
    prompt tokens per prefill step (memory for activations grows with it, not with the
    prompt). yarn: for a config with YaRN rope_scaling, "dynamic" (None: the default) gives
    each prompt the factor its own length needs (`rope.dynamic_yarn_scale`: plain RoPE when
    prompt plus max_new_tokens fit the original context), "static" the config's factor for
    every prompt, as transformers and vLLM do. kv_cache_dtype: "auto" (the compute dtype) or
    "int8" (see `init_cache`).
    """
    global _stream_sink
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    sampling = Sampling(vocab_size or config.vocab_size, temperature, top_k, top_p, min_p,
                        repetition_penalty)
    batch = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    check_length(config, lengths, max_new_tokens, allow_long)
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise ValueError(f"prefill_chunk must be a positive int, got {prefill_chunk!r}")
    check_kv_cache_dtype(kv_cache_dtype)
    yarn = "dynamic" if yarn is None else yarn
    if yarn not in YARN_MODES:
        raise ValueError(f"yarn must be one of {YARN_MODES}, got {yarn!r}")
    rope_scale = None
    if yarn == "dynamic" and config.rope_type == "yarn":
        rope_scale = jnp.asarray(dynamic_yarn_scale(config, lengths + max_new_tokens))
    longest = int(lengths.max())
    chunk = min(prefill_chunk, bucket(longest))  # short prompts: a power-of-two bucket
    width = -(-longest // chunk) * chunk
    slots = bucket(max(longest + max_new_tokens, width))
    ids = np.zeros((batch, width), np.int64)  # int64 first, so no id wraps before the check
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    check_token_ids(ids, config.vocab_size, "prompts")
    ids = ids.astype(np.int32)
    seen = np.zeros((batch, config.vocab_size), bool)
    for row, prompt in enumerate(prompts):
        seen[row, prompt] = True
    mesh = mesh if mesh is not None else mesh_of(params)
    rules = resolve_rules(rules, mesh)
    dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype(params)
    stops = np.unique(np.asarray(list(stop_token_ids or []) or [-1], np.int32))

    if mesh is not None:
        ids = shard_input(ids, mesh, ("batch", "length"), rules)
        seen = shard_input(seen, mesh, ("batch", "vocab"), rules)
    with mesh_context(mesh):
        cache = init_cache(config, batch, slots, dtype, mesh, rules, kv_cache_dtype)
        logits, cache = prefill(config, dtype, mesh, rules, params, cache, ids,
                                jnp.asarray(lengths), chunk, rope_scale)
        _stream_sink = on_tokens
        try:
            out, count, _, _ = _decode_loop(config, dtype, mesh, rules, sampling, max_new_tokens,
                                            on_tokens is not None, params, cache,
                                            jnp.asarray(lengths), logits, jnp.asarray(seen),
                                            jnp.asarray(stops), jax.random.key(seed),
                                            rope_scale)
            out, count = to_host(out), to_host(count)
        finally:
            _stream_sink = None
    return [row[:n].tolist() for row, n in zip(np.asarray(out), np.asarray(count), strict=True)]
