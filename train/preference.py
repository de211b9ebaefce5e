"""DPO data: preference JSONL -> (prompt, chosen, rejected) token ids -> batches of pairs.

Each line is one of TRL's preference formats, read as trl 1.16's DPOTrainer reads them:
- standard: {"prompt": str, "chosen": str, "rejected": str}. The tokenizer's EOS text is
  appended to chosen and rejected unless they already end with it.
- conversational: {"prompt": [messages], "chosen": [messages], "rejected": [messages]}. The
  prompt is rendered with the generation prompt, prompt + chosen without it.
- implicit prompt: {"chosen", "rejected"} alone, each the whole text or conversation; the
  prompt is their longest common prefix (of messages; of characters, ending before a space).
The completion starts where the tokenized prompt and the tokenized prompt + completion first
differ; only completion tokens are scored.

Lengths (all counted in PreferenceStats, never silent): --max-prompt-len keeps the last N
prompt tokens (TRL 0.x's rule); --max-len keeps the first max_len tokens of prompt +
completion (TRL's keep_start), or with overflow="drop" drops the pair; a pair whose prompt
alone fills max_len is dropped (as TRL does: nothing of it would be scored).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence

import numpy as np

from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import (
    DataError,
    check_messages,
    check_overflow,
    check_vocabulary,
    read_jsonl,
)


@dataclasses.dataclass
class Pair:
    prompt: list[int]
    chosen: list[int]  # completion tokens only
    rejected: list[int]


@dataclasses.dataclass
class PreferenceStats:
    pairs: int = 0
    skipped_bad_lines: int = 0
    prompt_truncated: int = 0
    truncated: int = 0  # prompt + chosen or prompt + rejected cut at max_len
    dropped_too_long: int = 0  # with overflow="drop"
    dropped_prompt_too_long: int = 0


def split_record(record, where: str) -> tuple[str | list, str | list, str | list]:
    """(prompt, chosen, rejected) of a line: all strings, or all message lists."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if "chosen" not in record or "rejected" not in record:
        raise DataError(f"{where}: expected 'chosen' and 'rejected' (and 'prompt', or a prompt "
                        f"shared by both); found keys {sorted(record)}")
    fields = ("prompt", "chosen", "rejected") if "prompt" in record else ("chosen", "rejected")
    values = [record[k] for k in fields]
    if all(isinstance(v, str) for v in values):
        pass
    elif all(isinstance(v, list) for v in values):
        for k, v in zip(fields, values, strict=True):
            check_messages(v, f"{where}: '{k}'")
    else:
        kinds = ", ".join(f"{k}: {type(v).__name__}" for k, v in zip(fields, values, strict=True))
        raise DataError(f"{where}: {', '.join(fields)} must all be strings or all be message "
                        f"lists; found {kinds}")
    if "prompt" in record:
        return tuple(values)
    return extract_prompt(*values, where)


def extract_prompt(chosen, rejected, where: str):
    """TRL's extract_prompt: the longest common prefix of chosen and rejected (strings: not
    ending in the space that starts the completions) and the two remainders."""
    if chosen == rejected:
        raise DataError(f"{where}: chosen and rejected are identical")
    shortest = min(len(chosen), len(rejected))
    cut = next((i for i in range(shortest) if chosen[i] != rejected[i]), None)
    if cut is None:  # one is a prefix of the other: TRL's loop leaves the last index
        cut = max(shortest - 1, 0)
    elif cut > 0 and chosen[cut - 1] == " ":
        cut -= 1
    return chosen[:cut], chosen[cut:], rejected[cut:]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def tokenize_pair(prompt, chosen, rejected, tokenizer: Tokenizer, eos: str | None) -> Pair:
    if isinstance(prompt, list):  # conversational
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, True))
        with_chosen, with_rejected = (tokenizer.encode(tokenizer.apply_chat_template(
            prompt + completion, False)) for completion in (chosen, rejected))
    else:
        if eos:
            chosen, rejected = (c if c.endswith(eos) else c + eos for c in (chosen, rejected))
        prompt_ids = tokenizer.encode(prompt)
        with_chosen, with_rejected = tokenizer.encode(prompt + chosen), tokenizer.encode(
            prompt + rejected)
    start = min(common_prefix_length(prompt_ids, with_chosen),
                common_prefix_length(prompt_ids, with_rejected))
    return Pair(prompt_ids[:start], with_chosen[start:], with_rejected[start:])


def pair_converter(tokenizer: Tokenizer, vocab_size: int | None):
    """convert(record, where) -> the line's Pair as tokenized, before any length limit."""
    eos = tokenizer.special_token("eos_token")

    def convert(record, where):
        pair = tokenize_pair(*split_record(record, where), tokenizer, eos)
        check_vocabulary(tokenizer, pair.prompt + pair.chosen + pair.rejected, vocab_size, where)
        return pair

    return convert


def tokenized_pairs(path: str, tokenizer: Tokenizer, skip_bad_lines: bool,
                    vocab_size: int | None, stats: PreferenceStats, progress=None
                    ) -> Iterator[Pair]:
    """Each line's Pair as tokenized, before any length limit (see read_jsonl)."""
    return read_jsonl(path, pair_converter(tokenizer, vocab_size), skip_bad_lines, stats,
                      progress)


def fit_pair(pair: Pair, max_len: int, max_prompt_len: int | None, overflow: str,
             stats: PreferenceStats) -> Pair | None:
    """The pair within the limits (cut in place, or None if dropped), counted in stats."""
    if max_prompt_len is not None and len(pair.prompt) > max_prompt_len:
        stats.prompt_truncated += 1
        pair.prompt = pair.prompt[len(pair.prompt) - max_prompt_len:]
    room = max_len - len(pair.prompt)
    if room <= 0:
        stats.dropped_prompt_too_long += 1
        return None
    if max(len(pair.chosen), len(pair.rejected)) > room:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        pair.chosen, pair.rejected = pair.chosen[:room], pair.rejected[:room]
    return pair


def load_pairs(path: str, tokenizer: Tokenizer, max_len: int, max_prompt_len: int | None = None,
               overflow: str = "truncate", skip_bad_lines: bool = False,
               vocab_size: int | None = None) -> tuple[list[Pair], PreferenceStats]:
    """Reads and tokenizes a preference JSONL file (see the module docstring). vocab_size:
    the model's; a line with a token id past it is a bad line."""
    check_overflow(overflow)
    stats, pairs = PreferenceStats(), []
    for raw in tokenized_pairs(path, tokenizer, skip_bad_lines, vocab_size, stats):
        pair = fit_pair(raw, max_len, max_prompt_len, overflow, stats)
        if pair is not None:
            pairs.append(pair)
    stats.pairs = len(pairs)
    return pairs, stats


def row_length(longest: int, max_len: int) -> int:
    """A batch's row length: a power of two (at least 16) holding its longest sequence,
    at most max_len, so that the jitted step compiles for a few lengths only."""
    return min(max_len, max(16, 1 << (longest - 1).bit_length()))


def pair_batch(pairs: Sequence[Pair], indices, grad_accum: int, max_len: int
               ) -> dict[str, np.ndarray]:
    """The pairs at `indices` (-1: an empty padding pair) as a global batch [k, 2B, T];
    pairs: a list, or a tokenize folder's pairs (train/token_store.py), each read once.

    Rows 0..B-1 of each micro-batch are prompt + chosen, rows B..2B-1 prompt + rejected (one
    forward for both, as TRL concatenates them). tokens, segment_ids (1 on tokens, 0 padding),
    positions, weights (1.0 where the next-token log-prob is a completion token's);
    completion_lengths [k, 2B] (what ipo divides by) and pair_weights [k, B] (1.0 for a real
    pair).
    """
    indices = np.asarray(indices).reshape(grad_accum, -1)  # [k, B]
    k, b = indices.shape
    got = {i: pairs[i] for i in set(indices.ravel().tolist()) if i >= 0}
    chosen = [[got[i].prompt + got[i].chosen if i >= 0 else [] for i in row]
              for row in indices]
    rejected = [[got[i].prompt + got[i].rejected if i >= 0 else [] for i in row]
                for row in indices]
    longest = max(len(s) for rows in chosen + rejected for s in rows)
    shape = (k, 2 * b, row_length(longest, max_len))
    out = {"tokens": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32), "weights": np.zeros(shape, np.float32),
           "completion_lengths": np.zeros((k, 2 * b), np.float32),
           "pair_weights": (indices >= 0).astype(np.float32)}
    for m in range(k):
        for r, i in enumerate(indices[m]):
            if i < 0:
                continue
            for row, sequence in ((r, chosen[m][r]), (b + r, rejected[m][r])):
                n, start = len(sequence), len(got[i].prompt)
                out["tokens"][m, row, :n] = sequence
                out["segment_ids"][m, row, :n] = 1
                out["positions"][m, row, :n] = np.arange(n)
                # position t scores token t + 1: the completion's tokens (the first is never
                # scored when the prompt is empty, as in TRL)
                out["weights"][m, row, max(start, 1) - 1:n - 1] = 1.0
                out["completion_lengths"][m, row] = n - start
    return out
