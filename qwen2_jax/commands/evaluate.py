"""`qwen2-jax eval`: perplexity of a model on a text, by transformers' sliding-window recipe.

The recipe (https://huggingface.co/docs/transformers/perplexity): windows of max_len tokens
start every `stride` tokens (the last one ends at the text's end); a window scores only its
last trg_len = end - prev_end tokens, each predicted from the tokens before it in the window
(the window's first token never is: transformers shifts labels inside the model). The text's
NLL is the guide's nll_sum / n_tokens: each window's mean NLL over the tokens it scored,
weighted by trg_len - 1. That weight equals the scored count for windows that start at a
scored token (the first; all with stride == max_len) and is one less for the others: the
guide's accounting, kept so the numbers agree.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import qwen2_jax
from qwen2_jax.commands.common import (
    MESH_HELP,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    check_at_least,
    mesh_from_args,
    model_path,
    quantize_from_args,
    require_path,
    run_guarded,
    stage,
)
from qwen2_jax.commands.generate import add_long_context_args
from qwen2_jax.decoding import init_cache, position_limit
from qwen2_jax.layers import compute_dtype
from qwen2_jax.masks import positions_from_mask
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.rope import dynamic_yarn_scale
from qwen2_jax.sharding import mesh_context, resolve_rules, shard_input, to_host, use_mesh
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import DataError, read_jsonl

NAME = "eval"
DEFAULT_MAX_LEN = 2048
SEPARATOR = "\n\n"  # between JSONL texts, as the guide joins WikiText's lines
LOWER = "--batch-size or --max-len, or spread the model over more devices with --mesh"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="perplexity of a model on a text file or JSONL texts",
        description="Perplexity with transformers' sliding-window recipe "
        "(huggingface.co/docs/transformers/perplexity), the same number to float32 rounding: "
        "windows of --max-len tokens every --stride tokens, each scoring only the tokens the "
        "previous window did not reach. --data: a .jsonl file (the 'text' field of each line, "
        "joined with a blank line, '\\n\\n', as the guide joins WikiText) or any other file as "
        "one UTF-8 text. Prints one JSON line: tokens (the text's), nll (mean per scored "
        "token, in nats), perplexity (exp of nll), tokens_per_s (the text's tokens over the "
        "scoring time, after compilation). --kv-cache-dtype int8 scores each window through an "
        "int8 KV cache, as generation and the server see it (written, then read back), so the "
        "perplexity shows what the int8 cache costs.", epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="a Hugging Face or Orbax model folder with a tokenizer")
    parser.add_argument("--data", required=True, metavar="FILE",
                        help="a UTF-8 text file, or .jsonl with a 'text' string per line")
    parser.add_argument("--max-len", type=int, default=None, metavar="N",
                        help="tokens per window (default: the model's max_position_embeddings, "
                        f"at most {DEFAULT_MAX_LEN})")
    parser.add_argument("--stride", type=int, default=None, metavar="S",
                        help="tokens between window starts, <= --max-len (default: half of "
                        "--max-len, the guide's example; --max-len scores every token once "
                        "with less context, twice as fast)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="B",
                        help="windows per forward pass (default 1)")
    add_long_context_args(parser, prefill=False)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_quantize_args(parser)
    add_mesh_args(parser)


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _eval(args), LOWER)


def read_text(path: str) -> str:
    """The text of `path`: a .jsonl file's 'text' fields joined by SEPARATOR, or the whole
    file. Errors name file and line."""
    if path.endswith(".jsonl"):
        def text(record, where):
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                found = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise DataError(f"{where}: expected a JSON object with a 'text' string, found "
                                f"{found}")
            return record["text"]

        return SEPARATOR.join(read_jsonl(path, text, skip_bad_lines=False, stats=None))
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        column = e.start - (raw.rfind(b"\n", 0, e.start) + 1)
        raise UsageError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {column} of the "
                         "line)") from None


def windows(length: int, max_len: int, stride: int) -> list[tuple[int, int, int]]:
    """(begin, end, trg_len) of each window over `length` tokens, as the guide's loop."""
    out, prev_end = [], 0
    for begin in range(0, length, stride):
        end = min(begin + max_len, length)
        out.append((begin, end, end - prev_end))
        prev_end = end
        if end == length:
            break
    return out


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules",
                                            "kv_cache_dtype"))
def score_windows(config, dtype, mesh, rules, params, ids, mask, scored, rope_scale=None,
                  kv_cache_dtype="auto"):
    """Summed NLL [B] (float32) of the scored next-token predictions of each window.

    ids, mask [B, T] int32 (windows right-padded to T); scored [B, T] bool: position t's
    prediction of token t + 1 counts. rope_scale [B]: dynamic YaRN factors, or None.
    kv_cache_dtype "int8": each window goes through an empty int8 KV cache of T slots (a
    prefill of one chunk: every query attends to the keys and values as the cache stores
    them, the same numbers as a chunked prefill); the right padding comes after every real
    token, so causal attention never lets it reach one.
    """
    segments = jnp.zeros_like(ids)
    with use_mesh(mesh, rules):
        model = Qwen2ForCausalLM(config, dtype=dtype)
        if kv_cache_dtype == "auto":
            logits = model.apply({"params": params}, ids, positions_from_mask(mask, segments),
                                 mask, segments, rope_scale=rope_scale)
        else:
            cache = init_cache(config, ids.shape[0], ids.shape[1], dtype, mesh, rules,
                               kv_cache_dtype)
            logits, _ = model.apply({"params": params}, ids, None, None, None, cache=cache,
                                    cache_index=jnp.zeros(ids.shape[0], jnp.int32),
                                    rope_scale=rope_scale)
    targets = jnp.roll(ids, -1, axis=1)  # [B, T]: token t + 1
    # logsumexp and the target's logit reduce over V: no [B, T, V] log-probs are made.
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) - picked  # [B, T]
    return jnp.sum(jnp.where(scored, nll, 0.0), axis=1)


def window_batches(tokens: np.ndarray, spans, max_len: int, batch: int):
    """(ids, mask, scored) [batch, max_len] per `batch` windows; the last batch is padded
    with windows that score nothing. In a window of length L, label positions
    max(1, L - trg_len) .. L - 1 are scored, i.e. predictions from one position before."""
    for start in range(0, len(spans), batch):
        ids = np.zeros((batch, max_len), np.int32)
        mask = np.zeros((batch, max_len), np.int32)
        scored = np.zeros((batch, max_len), bool)
        for row, (begin, end, trg_len) in enumerate(spans[start:start + batch]):
            length = end - begin
            ids[row, :length] = tokens[begin:end]
            mask[row, :length] = 1
            scored[row, max(1, length - trg_len) - 1:length - 1] = True
        yield ids, mask, scored


def perplexity_nll(spans, sums) -> float:
    """The guide's avg_nll = nll_sum / n_tokens from each window's summed NLL: its mean over
    the tokens it scored, weighted by trg_len - 1. (A last window of one token scores nothing
    and weighs 0; the guide's loop turns its empty mean into NaN, here it adds nothing.)"""
    nll_sum = n_tokens = 0.0
    for (begin, end, trg_len), total in zip(spans, sums, strict=True):
        length = end - begin
        weight = trg_len - 1  # the guide's num_valid_tokens - batch_size
        if weight:
            nll_sum += total / (length - max(1, length - trg_len)) * weight
            n_tokens += weight
    return nll_sum / n_tokens


def _eval(args: argparse.Namespace) -> int:
    check_at_least(args, 2, "max_len")
    check_at_least(args, 1, "stride", "batch_size")
    quantize = quantize_from_args(args)
    args.model = model_path(args.model)
    require_path("--data", args.data, "text or JSONL file")
    config = qwen2_jax.Qwen2Config.from_file(args.model)
    limit = position_limit(config)
    max_len = args.max_len or min(limit, DEFAULT_MAX_LEN)
    if max_len > limit:
        raise UsageError(f"--max-len {max_len} is past the model's max_position_embeddings "
                         f"{limit}")
    stride = args.stride or max(1, max_len // 2)
    if stride > max_len:
        raise UsageError(f"--stride {stride} is larger than --max-len {max_len}: the tokens "
                         "between windows would never be scored")
    tokenizer = Tokenizer(args.model)
    tokens = np.asarray(tokenizer.encode(read_text(args.data)), np.int64)
    if len(tokens) < 2:
        raise UsageError(f"{args.data}: {len(tokens)} token(s) of text; perplexity needs at "
                         "least 2")
    problem = tokenizer.out_of_vocabulary(tokens.tolist(), config.vocab_size)
    if problem:
        raise UsageError(f"{args.data}: {problem}")
    spans = windows(len(tokens), max_len, stride)
    mesh, rules = mesh_from_args(args)
    with stage("loading the model"):
        config, params = qwen2_jax.load(args.model, mesh=mesh, rules=rules, **quantize)
    rules = resolve_rules(rules, mesh)
    dtype = compute_dtype(params)

    def placed(batch):
        if mesh is None:
            return batch
        return [shard_input(x, mesh, ("batch", "length"), rules) for x in batch]

    # Dynamic YaRN: every window is a request of max_len tokens (the last may be shorter; it
    # keeps the same factor, as its tokens were scored with that much context in mind).
    rope_scale = None
    if args.yarn == "dynamic" and config.rope_type == "yarn":
        rope_scale = jnp.asarray(np.repeat(dynamic_yarn_scale(config, [max_len]),
                                           args.batch_size))
    batches = map(placed, window_batches(tokens, spans, max_len, args.batch_size))
    first = next(batches)
    sums = []
    with mesh_context(mesh), stage(f"scoring {args.batch_size} window(s) of {max_len} tokens"):
        # Compiled before the clock starts, so tokens_per_s is the steady speed.
        score = score_windows.lower(config, dtype, mesh, rules, params, *first, rope_scale,
                                    args.kv_cache_dtype).compile()
        start = time.perf_counter()
        with tqdm(total=len(spans), desc="eval", unit="window", disable=args.no_progress) as bar:
            for batch in itertools.chain([first], batches):
                sums.extend(to_host(score(params, *batch, rope_scale)).tolist())
                bar.update(min(args.batch_size, len(spans) - bar.n))
    seconds = time.perf_counter() - start
    nll = perplexity_nll(spans, sums[:len(spans)])
    print(json.dumps({"tokens": len(tokens), "nll": nll, "perplexity": math.exp(nll),
                      "tokens_per_s": round(len(tokens) / seconds, 1)}))
    return 0
