"""SFT data: JSONL conversations or prompt/completion pairs -> tokens with a loss mask, packed.

Each line is `{"messages": [{"role", "content"}, ...]}` or `{"prompt": str, "completion": str}`
(the latter becomes a user and an assistant message). The chat template renders the
conversation; by default only the tokens each assistant message adds are trained on (its
content and end-of-turn), found by rendering the conversation prefix by prefix.

Rows are packed: several examples per row, each with its own segment id (attention never
crosses them; positions restart in each), so packing changes no example's loss.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator

import numpy as np

from qwen2_jax.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant", "tool")


class DataError(ValueError):
    """A malformed data line: `file:line: what is wrong`."""


@dataclasses.dataclass
class Example:
    tokens: list[int]
    targets: list[bool]  # train on predicting this token (from the one before it)


@dataclasses.dataclass
class DataStats:
    examples: int = 0
    skipped_bad_lines: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_targets: int = 0


def check_messages(messages, what: str) -> list[dict]:
    """messages, if it is a non-empty list of {"role", "content": str}; else a DataError
    that starts with `what` (file:line and field)."""
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{what} must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(
                m.get("content"), str):
            raise DataError(f"{what}[{i}] must be {{'role': one of {list(ROLES)}, "
                            f"'content': str}}, found {m!r}")
    return messages


def _messages(record, where: str) -> list[dict]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if "messages" in record:
        messages = check_messages(record["messages"], f"{where}: 'messages'")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant message to train on")
        return messages
    if "prompt" in record and "completion" in record:
        if not isinstance(record["prompt"], str) or not isinstance(record["completion"], str):
            raise DataError(f"{where}: 'prompt' and 'completion' must be strings")
        return [{"role": "user", "content": record["prompt"]},
                {"role": "assistant", "content": record["completion"]}]
    raise DataError(f"{where}: expected 'messages', or 'prompt' and 'completion'; found keys "
                    f"{sorted(record)}")


def tokenize(messages: list[dict], tokenizer: Tokenizer, train_on_prompt: bool) -> Example:
    """Tokens of the rendered chat, targets on what each assistant message adds (or all)."""
    tokens: list[int] = []
    targets: list[bool] = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":  # the generation prompt belongs to the prompt side
            before = tokenizer.encode(tokenizer.apply_chat_template(messages[:i], True)) if i \
                else []
            tokens, targets = _extend(tokens, targets, before, train_on_prompt)
        text = tokenizer.apply_chat_template(messages[:i + 1], False)
        tokens, targets = _extend(tokens, targets, tokenizer.encode(text),
                                  train_on_prompt or message["role"] == "assistant")
    return Example(tokens, targets)


def _extend(tokens, targets, rendered: list[int], train: bool):
    """Appends what `rendered` (a longer render of the same conversation) adds."""
    if rendered[:len(tokens)] != tokens:
        raise DataError("the chat template does not render conversations prefix by prefix; "
                        "use --train-on-prompt")
    added = len(rendered) - len(tokens)
    return rendered, targets + [train] * added


def check_vocabulary(tokenizer: Tokenizer, ids: list[int], vocab_size: int | None,
                     where: str) -> None:
    """A DataError at `where` when `ids` hold an id past the model's vocabulary."""
    problem = None if vocab_size is None else tokenizer.out_of_vocabulary(ids, vocab_size)
    if problem:
        raise DataError(f"{where}: {problem}")


def read_jsonl(path: str, convert, skip_bad_lines: bool, stats) -> Iterator:
    """convert(record, "file:line") of each non-empty line. A bad line (not UTF-8, invalid
    JSON, or a DataError from convert) raises a DataError naming file and line, or with
    skip_bad_lines is counted in stats.skipped_bad_lines and skipped."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            where = f"{path}:{number}"
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of "
                                    "the line)") from None
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
                converted = convert(record, where)
            except DataError as e:
                if not skip_bad_lines:
                    raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") \
                        from e
                stats.skipped_bad_lines += 1
                continue
            yield converted


def load_examples(path: str, tokenizer: Tokenizer, max_len: int, overflow: str = "truncate",
                  train_on_prompt: bool = False, skip_bad_lines: bool = False,
                  vocab_size: int | None = None) -> tuple[list[Example], DataStats]:
    """Reads and tokenizes a JSONL file. overflow: "truncate" (keep the first max_len
    tokens) or "drop" examples longer than max_len; both are counted in the stats.
    vocab_size: the model's; a line with a token id past it is a bad line."""
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")
    examples, stats = [], DataStats()

    def convert(record, where):
        example = tokenize(_messages(record, where), tokenizer, train_on_prompt)
        check_vocabulary(tokenizer, example.tokens, vocab_size, where)
        return example

    for example in read_jsonl(path, convert, skip_bad_lines, stats):
        if len(example.tokens) > max_len:
            if overflow == "drop":
                stats.dropped_too_long += 1
                continue
            stats.truncated += 1
            example = Example(example.tokens[:max_len], example.targets[:max_len])
        if not any(example.targets[1:]):
            stats.dropped_no_targets += 1
            continue
        examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def pack(examples: list[Example], row_length: int, seed: int) -> dict[str, np.ndarray]:
    """Shuffles (by seed) and packs examples first-fit into rows of row_length tokens.

    Returns int32 arrays [R, row_length]: tokens, segment_ids (1.. per example; 0 padding),
    positions (restarting per example) and weights (1.0 where the next-token loss counts: at
    position t the model predicts tokens[t + 1] of the same example).
    """
    order = np.random.default_rng(seed).permutation(len(examples))
    rows: list[list[Example]] = []
    space: list[int] = []
    for i in order:
        example = examples[i]
        n = len(example.tokens)
        for r, free in enumerate(space):
            if free >= n:
                rows[r].append(example)
                space[r] -= n
                break
        else:
            rows.append([example])
            space.append(row_length - n)
    shape = (len(rows), row_length)
    out = {"tokens": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32),
           "positions": np.zeros(shape, np.int32), "weights": np.zeros(shape, np.float32)}
    for r, row in enumerate(rows):
        at = 0
        for segment, example in enumerate(row, 1):
            n = len(example.tokens)
            out["tokens"][r, at:at + n] = example.tokens
            out["segment_ids"][r, at:at + n] = segment
            out["positions"][r, at:at + n] = np.arange(n)
            # the loss at t predicts token t + 1, inside this example only
            out["weights"][r, at:at + n - 1] = example.targets[1:]
            at += n
    return out
