"""SFT data: JSONL conversations or prompt/completion pairs -> tokens with a loss mask, packed.

Each line is `{"messages": [{"role", "content"}, ...]}` or `{"prompt": str, "completion": str}`
(the latter becomes a user and an assistant message). The chat template renders the
conversation; by default only the tokens each assistant message adds are trained on (its
content and end-of-turn), found by rendering the conversation prefix by prefix.

Rows are packed: several examples per row, each with its own segment id (attention never
crosses them; positions restart in each), so packing changes no example's loss. The packing is
planned from the examples' lengths alone (`plan_rows`), and a row's tokens are read only when
it is built (`Examples.rows`), so that a tokenized dataset on disk (train/token_store.py) is
packed the same way as a JSONL file read into memory, without reading it whole.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
from collections.abc import Callable, Iterator

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


def read_line(raw: bytes, where: str, convert) -> tuple[bool, object]:
    """(True, convert(record, where)) for a line, (False, None) for a blank one; a bad line
    (not UTF-8, invalid JSON, or a DataError from convert) raises a DataError that starts
    with `where`."""
    try:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start} of the "
                            "line)") from None
        if not line.strip():
            return False, None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from e
        return True, convert(record, where)
    except DataError as e:
        raise DataError(str(e) if str(e).startswith(where) else f"{where}: {e}") from e


def read_jsonl(path: str, convert, skip_bad_lines: bool, stats, progress=None) -> Iterator:
    """convert(record, "file:line") of each non-empty line. A bad line (see read_line) raises
    its DataError, naming file and line, or with skip_bad_lines is counted in
    stats.skipped_bad_lines and skipped. progress: a tqdm bar advanced by each line's bytes,
    or None."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            if progress is not None:
                progress.update(len(raw))
            try:
                filled, converted = read_line(raw, f"{path}:{number}", convert)
            except DataError:
                if not skip_bad_lines:
                    raise
                stats.skipped_bad_lines += 1
                continue
            if filled:
                yield converted


def check_overflow(overflow: str) -> None:
    if overflow not in ("truncate", "drop"):
        raise ValueError(f"overflow must be 'truncate' or 'drop', got {overflow!r}")


def example_converter(tokenizer: Tokenizer, train_on_prompt: bool, vocab_size: int | None):
    """convert(record, where) -> the line's Example as tokenized, before any length limit."""

    def convert(record, where):
        example = tokenize(_messages(record, where), tokenizer, train_on_prompt)
        check_vocabulary(tokenizer, example.tokens, vocab_size, where)
        return example

    return convert


def tokenized_examples(path: str, tokenizer: Tokenizer, train_on_prompt: bool,
                       skip_bad_lines: bool, vocab_size: int | None, stats: DataStats,
                       progress=None) -> Iterator[Example]:
    """Each line's Example as tokenized, before any length limit (see read_jsonl)."""
    return read_jsonl(path, example_converter(tokenizer, train_on_prompt, vocab_size),
                      skip_bad_lines, stats, progress)


def fit_example(example: Example, max_len: int, overflow: str, stats: DataStats
                ) -> Example | None:
    """The example within max_len (cut, or None if dropped), counted in stats."""
    if len(example.tokens) > max_len:
        if overflow == "drop":
            stats.dropped_too_long += 1
            return None
        stats.truncated += 1
        example = Example(example.tokens[:max_len], example.targets[:max_len])
    if not any(example.targets[1:]):
        stats.dropped_no_targets += 1
        return None
    return example


def load_examples(path: str, tokenizer: Tokenizer, max_len: int, overflow: str = "truncate",
                  train_on_prompt: bool = False, skip_bad_lines: bool = False,
                  vocab_size: int | None = None) -> tuple[list[Example], DataStats]:
    """Reads and tokenizes a JSONL file. overflow: "truncate" (keep the first max_len
    tokens) or "drop" examples longer than max_len; both are counted in the stats.
    vocab_size: the model's; a line with a token id past it is a bad line."""
    check_overflow(overflow)
    stats = DataStats()
    examples = []
    for raw in tokenized_examples(path, tokenizer, train_on_prompt, skip_bad_lines, vocab_size,
                                  stats):
        example = fit_example(raw, max_len, overflow, stats)
        if example is not None:
            examples.append(example)
    stats.examples = len(examples)
    return examples, stats


def plan_rows(lengths: np.ndarray, row_length: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Packs examples of these lengths [n] into rows of row_length tokens: in an order
    shuffled by seed, each goes into the open row with the least room that holds it (best
    fit), or a new row. Returns (order [n]: example indices row after row, starts [R + 1]:
    row r holds order[starts[r]:starts[r + 1]]), both int64.

    Needs the lengths only, and no walk over the rows: the rooms that open rows have are the
    bits of one integer, so the best room for n tokens is the lowest bit at or past n (first
    fit over all rows was O(examples x rows)). Memory: a few int arrays of n.
    """
    lengths = np.asarray(lengths)
    if len(lengths) and lengths.max() > row_length:
        raise ValueError(f"an example of {lengths.max()} tokens does not fit a row of "
                         f"{row_length}")
    order = np.random.default_rng(seed).permutation(len(lengths))
    row_of = np.empty(len(lengths), np.int32)  # the row of order[j]
    smallest = int(lengths.min()) if len(lengths) else 0  # less room is closed
    rooms: dict[int, list[int]] = {}  # free tokens -> the open rows with that many
    mask, rows = 0, 0  # bit f of mask: rooms[f] is not empty
    for start in range(0, len(order), 1 << 16):  # Python ints for a chunk at a time
        for j, n in enumerate(lengths[order[start:start + (1 << 16)]].tolist(), start):
            fits = mask >> n
            if fits:
                room = n + (fits & -fits).bit_length() - 1
                row = rooms[room].pop()
                if not rooms[room]:
                    del rooms[room]
                    mask ^= 1 << room
            else:
                row, room, rows = rows, row_length, rows + 1
            row_of[j] = row
            left = room - n
            if left >= smallest:
                if left not in rooms:
                    rooms[left] = []
                    mask |= 1 << left
                rooms[left].append(row)
    starts = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(row_of, minlength=rows), out=starts[1:])
    return order[np.argsort(row_of, kind="stable")], starts


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """arange(starts[i], starts[i] + counts[i]) for each i, concatenated [sum(counts)]."""
    ends = np.cumsum(counts)
    return np.arange(ends[-1] if len(ends) else 0) + np.repeat(starts - ends + counts, counts)


class Examples:
    """Tokenized examples, in memory or in a tokenize folder, as packing reads them.

    lengths: int32 [n], all that planning needs. take(ids, lengths): the tokens (int32) and
    targets (bool) of the examples `ids`, one after the other [t], so that a batch reads only
    its own examples.
    """

    def __init__(self, lengths: np.ndarray, take: Callable[[np.ndarray, np.ndarray], tuple]):
        self.lengths, self.take = lengths, take

    @classmethod
    def from_list(cls, examples: list[Example]) -> Examples:
        lengths = np.array([len(e.tokens) for e in examples], np.int32)
        offsets = np.zeros(len(examples) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        tokens = np.fromiter(itertools.chain.from_iterable(e.tokens for e in examples), np.int32,
                             offsets[-1])
        targets = np.fromiter(itertools.chain.from_iterable(e.targets for e in examples), bool,
                              offsets[-1])

        def take(ids, lengths):
            source = _ranges(offsets[ids], lengths)
            return tokens[source], targets[source]

        return cls(lengths, take)

    def __len__(self) -> int:
        return len(self.lengths)

    def rows(self, plan: tuple[np.ndarray, np.ndarray], which, row_length: int
             ) -> dict[str, np.ndarray]:
        """Rows `which` [r] of plan_rows' plan, reading only their examples; an index past the
        plan's last row gives an empty row (segment 0, weight 0).

        Returns int32 arrays [r, row_length] tokens, segment_ids (1.. per example; 0
        padding), positions (restarting per example) and float32 weights (1.0 where the
        next-token loss counts: at position t the model predicts tokens[t + 1] of the same
        example).
        """
        order, starts = plan
        which = np.asarray(which, np.int64).reshape(-1)
        real = np.flatnonzero(which < len(starts) - 1)  # the output rows that hold examples
        first = starts[which[real]]
        count = starts[which[real] + 1] - first  # examples per row, each >= 1
        ids = order[_ranges(first, count)]  # [e] the examples, row after row
        lengths = self.lengths[ids].astype(np.int64)
        before = np.cumsum(lengths) - lengths
        at = before - np.repeat(before[np.cumsum(count) - count], count)  # start in its row
        tokens, targets = self.take(ids, lengths)  # [t] every token of them
        position = _ranges(np.zeros_like(lengths), lengths)
        flat = np.repeat(np.repeat(real * row_length, count) + at, lengths) + position
        # the loss at t predicts token t + 1, inside the example only
        last = position == np.repeat(lengths - 1, lengths)
        following = np.zeros_like(targets)
        following[:-1] = targets[1:]
        shape = (len(which), row_length)
        out = {"tokens": np.zeros(shape, np.int32), "segment_ids": np.zeros(shape, np.int32),
               "positions": np.zeros(shape, np.int32), "weights": np.zeros(shape, np.float32)}
        out["tokens"].reshape(-1)[flat] = tokens
        out["segment_ids"].reshape(-1)[flat] = np.repeat(_ranges(np.ones_like(count), count),
                                                         lengths)
        out["positions"].reshape(-1)[flat] = position
        out["weights"].reshape(-1)[flat] = np.where(last, False, following)
        return out


def pack(examples: list[Example], row_length: int, seed: int) -> dict[str, np.ndarray]:
    """Shuffles (by seed) and packs examples into rows of row_length tokens (plan_rows);
    every row of Examples.rows, [R, row_length]."""
    data = Examples.from_list(examples)
    plan = plan_rows(data.lengths, row_length, seed)
    return data.rows(plan, np.arange(len(plan[1]) - 1), row_length)
