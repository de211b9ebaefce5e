"""Tokenized datasets on disk: `qwen2-jax tokenize` writes them, `sft`/`dpo --data DIR` read them.

A folder holds 1-D numpy .npy arrays (np.load(mmap_mode="r") maps them) and manifest.json:

    sft  tokens.npy int32 [N], targets.npy bool [N], offsets.npy int64 [n + 1]:
         example i is tokens[offsets[i]:offsets[i + 1]], as load_examples gives it
    dpo  tokens.npy int32 [N], offsets.npy int64 [3n + 1]: pair i's prompt, chosen and
         rejected are the spans 3i, 3i + 1 and 3i + 2, as load_pairs gives them

The manifest records what shaped the arrays (the model's vocab_size, a hash of its tokenizer
files, the length flags) and the reader's counts. Training refuses a folder whose arrays would
differ from what it would read from the JSONL file with its own model and flags, so a run from
the folder logs the same losses as a run from the file.

Writing streams: each line is tokenized and appended to the files, never held, and the folder
appears complete or not at all (atomic_folder). Reading keeps the offsets in memory (8 bytes
an example; the lengths that packing plans with come from them) and reads each batch's spans
of the token files when the batch is built.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
from collections.abc import Iterator

import numpy as np
from tqdm import tqdm

from qwen2_jax.checkpoint.output import atomic_folder
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import (
    DataError,
    DataStats,
    Examples,
    check_overflow,
    example_converter,
    fit_example,
    read_jsonl,
    read_line,
)
from qwen2_jax.train.preference import Pair, PreferenceStats, fit_pair, pair_converter

VERSION = 1
MANIFEST = "manifest.json"
# the flags that shape the arrays, as TrainArgs names them
SETTINGS = {"sft": ("max_len", "overflow", "train_on_prompt", "skip_bad_lines"),
            "dpo": ("max_len", "max_prompt_len", "overflow", "skip_bad_lines")}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


class StoreError(ValueError):
    """A tokenize folder that this run cannot train on as it would on the JSONL file."""


def tokenizer_hash(folder: str) -> str:
    """sha256 over the tokenizer files of a model folder (those it has, with their names):
    the same vocabulary size does not make the same tokens."""
    digest = hashlib.sha256()
    for name in TOKENIZER_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            digest.update(name.encode() + b"\0")
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


class _Column:
    """A 1-D .npy file written piece by piece: a header sized for any length first, then the
    values as they come; finish() writes the real length into that header."""

    def __init__(self, path: str, dtype):
        self.dtype, self.count = np.dtype(dtype), 0
        self.file = open(path, "wb", buffering=1 << 20)  # noqa: SIM115 (closed by finish/close)
        self._header(1 << 62)
        self.start = self.file.tell()

    def _header(self, count: int) -> None:
        np.lib.format.write_array_header_1_0(self.file, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (count,)})

    def append(self, values) -> None:
        values = np.asarray(values, self.dtype)
        self.file.write(values.tobytes())
        self.count += values.size

    def finish(self) -> None:
        self.file.seek(0)
        self._header(self.count)  # padded to the same 64-byte boundary as the first
        if self.file.tell() != self.start:
            raise RuntimeError(f"{self.file.name}: the .npy header changed size")
        self.file.close()


def write(data: str, out: str, model: str, vocab_size: int, format: str, settings: dict,
          progress: bool = True, workers: int = 1) -> dict:
    """Tokenizes the JSONL file `data` with model's tokenizer into the new folder `out`;
    returns the manifest. settings: SETTINGS[format] as TrainArgs holds them. workers > 1:
    that many processes tokenize (the same arrays). A bad line raises its DataError
    (file:line) and leaves no `out`."""
    check_overflow(settings["overflow"])
    names = {"sft": (("tokens", np.int32), ("targets", np.bool_), ("offsets", np.int64)),
             "dpo": (("tokens", np.int32), ("offsets", np.int64))}[format]
    stats = DataStats() if format == "sft" else PreferenceStats()
    with atomic_folder(out) as temp:
        columns = {name: _Column(os.path.join(temp, f"{name}.npy"), dtype)
                   for name, dtype in names}
        bar = tqdm(total=os.path.getsize(data), unit="B", unit_scale=True, disable=not progress,
                   desc=f"tokenize {os.path.basename(data)}", dynamic_ncols=True)
        try:
            if workers > 1:
                items = _read_parallel(data, format, model, settings, vocab_size, stats, bar,
                                       workers)
            else:
                items = read_jsonl(data, _converter(format, Tokenizer(model), settings,
                                                    vocab_size),
                                   settings["skip_bad_lines"], stats, bar)
            columns["offsets"].append([0])
            fill = _write_sft if format == "sft" else _write_dpo
            longest = fill(items, settings, stats, columns)
            for column in columns.values():
                column.finish()
        finally:
            bar.close()
            for column in columns.values():
                column.file.close()
        counts = dataclasses.asdict(stats)
        if not (stats.examples if format == "sft" else stats.pairs):
            raise DataError(f"{data}: nothing usable to train on ({counts})")
        manifest = {"version": VERSION, "format": format, "source": os.path.abspath(data),
                    "model": os.path.abspath(model), "vocab_size": vocab_size,
                    "tokenizer_sha256": tokenizer_hash(model), "settings": settings,
                    "stats": counts, "longest": longest, "tokens": columns["tokens"].count}
        with open(os.path.join(temp, MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def _converter(format: str, tokenizer: Tokenizer, settings: dict, vocab_size: int):
    if format == "sft":
        return example_converter(tokenizer, settings["train_on_prompt"], vocab_size)
    return pair_converter(tokenizer, vocab_size)


def _write_sft(examples, settings, stats, columns) -> int:
    """Appends each kept example; returns the longest example before cutting."""
    longest = 0
    for raw in examples:
        longest = max(longest, len(raw.tokens))
        example = fit_example(raw, settings["max_len"], settings["overflow"], stats)
        if example is None:
            continue
        columns["tokens"].append(example.tokens)
        columns["targets"].append(example.targets)
        columns["offsets"].append([columns["tokens"].count])
        stats.examples += 1
    return longest


def _write_dpo(pairs, settings, stats, columns) -> int:
    """Appends each kept pair; returns the longest prompt + completion after
    --max-prompt-len, before --max-len (what decides whether max_len cuts)."""
    longest, cut = 0, settings["max_prompt_len"]
    for raw in pairs:
        prompt = len(raw.prompt) if cut is None else min(len(raw.prompt), cut)
        longest = max(longest, prompt + max(len(raw.chosen), len(raw.rejected), 1))
        pair = fit_pair(raw, settings["max_len"], cut, settings["overflow"], stats)
        if pair is None:
            continue
        for part in (pair.prompt, pair.chosen, pair.rejected):
            columns["tokens"].append(part)
            columns["offsets"].append([columns["tokens"].count])
        stats.pairs += 1
    return longest


CHUNK = 256  # lines a worker converts at a time
_convert = None  # a worker's converter


def _start_worker(format: str, model: str, settings: dict, vocab_size: int) -> None:
    global _convert
    _convert = _converter(format, Tokenizer(model), settings, vocab_size)


def _convert_lines(path: str, first: int, lines: list[bytes]) -> list:
    """read_line's outcome for each line, numbered from `first`; a bad line's message."""
    out = []
    for number, raw in enumerate(lines, first):
        try:
            out.append(read_line(raw, f"{path}:{number}", _convert))
        except DataError as e:
            out.append(str(e))
    return out


def _read_parallel(path: str, format: str, model: str, settings: dict, vocab_size: int, stats,
                   progress, workers: int) -> Iterator:
    """read_jsonl's items, converted by `workers` processes a chunk of lines each: the same
    items in the same order, the same first error and counts. At most two chunks a worker
    are in flight, so memory stays flat."""
    # spawned, not forked: a fork would copy the threads of JAX and of the tokenizer
    context = multiprocessing.get_context("spawn")
    pending: collections.deque = collections.deque()
    with context.Pool(workers, _start_worker, (format, model, settings, vocab_size)) as pool, \
            open(path, "rb") as f:
        number, more = 1, True
        while more or pending:
            lines = list(itertools.islice(f, CHUNK)) if more else []
            if lines:
                pending.append((sum(map(len, lines)),
                                pool.apply_async(_convert_lines, (path, number, lines))))
                number += len(lines)
            more = bool(lines)
            if (len(pending) < 2 * workers and more) or not pending:
                continue
            size, result = pending.popleft()
            for outcome in result.get():
                if isinstance(outcome, str):
                    if not settings["skip_bad_lines"]:
                        raise DataError(outcome)
                    stats.skipped_bad_lines += 1
                elif outcome[0]:
                    yield outcome[1]
            progress.update(size)


def detect_format(path: str) -> str:
    """"dpo" or "sft", from the first line that is a JSON object ('chosen' and 'rejected':
    preference data; 'messages' or 'prompt': SFT); lines before it are left to the reader."""
    with open(path, "rb") as f:
        for raw in f:
            try:
                record = json.loads(raw)
            except ValueError:  # invalid JSON or UTF-8
                continue
            if isinstance(record, dict):
                if "chosen" in record and "rejected" in record:
                    return "dpo"
                if "messages" in record or "prompt" in record:
                    return "sft"
                break
    raise DataError(f"{path}: cannot tell SFT data ('messages', or 'prompt' and 'completion') "
                    "from DPO data ('chosen' and 'rejected') by its first JSON object line; "
                    "pass --format")


def read_manifest(folder: str) -> dict:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        raise StoreError(f"{folder}: no {MANIFEST}; --data takes a JSONL file or a folder "
                         "written by `qwen2-jax tokenize`")
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a tokenize manifest ({e})") from None
    keys = ("version", "format", "model", "vocab_size", "tokenizer_sha256", "settings", "stats",
            "longest", "tokens")
    missing = [k for k in keys if k not in manifest] if isinstance(manifest, dict) else keys
    if missing:
        raise StoreError(f"{path}: not a tokenize manifest (no {', '.join(missing)})")
    return manifest


def _flag(name: str, value) -> str:
    """A setting as the flag that gives it: `--max-len 64`, `--drop-long`, `no --drop-long`."""
    if name == "overflow":
        name, value = "drop_long", value == "drop"
    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool) or value is None:
        return flag if value else f"no {flag}"
    return f"{flag} {value}"


def check(folder: str, manifest: dict, command: str, settings: dict, vocab_size: int,
          model: str) -> None:
    """A StoreError naming the difference unless training `command` with --model `model`
    and these settings on the folder reads what it would read from the JSONL file."""
    where = f"--data {folder}"
    if manifest.get("version") != VERSION:
        raise StoreError(f"{where}: written by tokenize format version "
                         f"{manifest.get('version')}; this qwen2-jax reads version {VERSION}: "
                         "tokenize the JSONL file again")
    if manifest["format"] != command:
        raise StoreError(f"{where} holds {manifest['format']} data; {command} needs "
                         f"{command} data (tokenize --format {command})")
    if manifest["vocab_size"] != vocab_size:
        raise StoreError(f"{where} was tokenized for a model with vocab_size "
                         f"{manifest['vocab_size']}; --model {model} has {vocab_size}: "
                         f"tokenize again with --model {model}")
    if manifest["tokenizer_sha256"] != tokenizer_hash(model):
        raise StoreError(f"{where} was tokenized with the tokenizer of {manifest['model']}, "
                         f"whose files differ from --model {model}'s: tokenize again with "
                         f"--model {model}")
    stored, longest = manifest["settings"], manifest["longest"]
    # with nothing longer than both max_lens, neither cuts: max_len and overflow are moot
    uncut = longest <= min(stored["max_len"], settings["max_len"])
    for name in SETTINGS[command]:
        if name == "skip_bad_lines":
            skipped = manifest["stats"]["skipped_bad_lines"]
            if skipped and not settings[name]:
                raise StoreError(f"{where}: tokenize skipped {skipped} bad lines "
                                 "(--skip-bad-lines); pass --skip-bad-lines to train on it")
        elif stored[name] != settings[name] and not (uncut and name in ("max_len", "overflow")):
            raise StoreError(f"{where} was tokenized with {_flag(name, stored[name])} and this "
                             f"run has {_flag(name, settings[name])}; its examples would differ "
                             "from the JSONL file's: tokenize again with the run's flag, or "
                             "train with the folder's")


class _Array:
    """A 1-D .npy file read span by span with pread: only the bytes asked for, and nothing
    left mapped. (A memory map would do the same reads, but a kernel that maps whole large
    folios on a fault keeps ~1 MB of the file resident per random read: 400 reads of a 638 MB
    file put 375 MB in the RSS on Linux 6.18, growing with the file.)"""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            try:
                np.lib.format.read_magic(f)
                shape, fortran, self.dtype = np.lib.format.read_array_header_1_0(f)
            except ValueError as e:
                raise StoreError(f"{path}: not a .npy file written by tokenize ({e})") from None
            self.start = f.tell()
        self.size = shape[0] if len(shape) == 1 and not fortran else None

    def spans(self, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """values[starts[i]:starts[i] + lengths[i]] for each i, concatenated."""
        out = np.empty(int(lengths.sum()), self.dtype)
        view, item, at = memoryview(out.view(np.uint8)), self.dtype.itemsize, 0
        with open(self.path, "rb", buffering=0) as f:
            for start, n in zip(starts.tolist(), lengths.tolist(), strict=True):
                size = n * item
                if os.preadv(f.fileno(), [view[at:at + size]], self.start + start * item) < size:
                    raise StoreError(f"{self.path}: ends before value {start + n}; tokenize "
                                     "again")
                at += size
        return out


def _open(folder: str, command: str, settings: dict, vocab_size: int, model: str):
    """(manifest, offsets in memory, {name: _Array}) after `check`, with the arrays' sizes
    checked against the manifest."""
    manifest = read_manifest(folder)
    check(folder, manifest, command, settings, vocab_size, model)
    count = manifest["stats"]["examples" if command == "sft" else "pairs"]
    names = ("tokens", "targets") if command == "sft" else ("tokens",)
    arrays = {name: _Array(os.path.join(folder, f"{name}.npy")) for name in names}
    offsets = np.load(os.path.join(folder, "offsets.npy"))  # int64 [n + 1] (dpo: [3n + 1])
    spans = count if command == "sft" else 3 * count
    sizes = {name: a.size for name, a in arrays.items()}
    if (offsets.shape != (spans + 1,) or offsets[-1] != manifest["tokens"]
            or any(size != manifest["tokens"] for size in sizes.values())):
        raise StoreError(f"{folder}: offsets.npy {offsets.shape} and "
                         f"{', '.join(f'{k}.npy ({v},)' for k, v in sizes.items())} do not "
                         f"hold the {count} {'examples' if command == 'sft' else 'pairs'} of "
                         f"{MANIFEST} ({manifest['tokens']} tokens); tokenize again")
    return manifest, offsets, arrays


def open_examples(folder: str, settings: dict, vocab_size: int, model: str
                  ) -> tuple[Examples, DataStats]:
    """A tokenize folder's SFT examples (each read when a batch needs it) and the stats it
    was written with. Memory: the offsets and the lengths, 12 bytes an example."""
    manifest, offsets, arrays = _open(folder, "sft", settings, vocab_size, model)

    def take(ids, lengths):
        starts = offsets[ids]
        return arrays["tokens"].spans(starts, lengths), arrays["targets"].spans(starts, lengths)

    return Examples(np.diff(offsets).astype(np.int32), take), DataStats(**manifest["stats"])


class Pairs:
    """A tokenize folder's DPO pairs as a sequence of Pair, each read when asked for."""

    def __init__(self, offsets: np.ndarray, tokens: _Array):
        self.offsets, self.tokens = offsets, tokens

    def __len__(self) -> int:
        return (len(self.offsets) - 1) // 3

    def __getitem__(self, i: int) -> Pair:
        if not 0 <= i < len(self):
            raise IndexError(f"pair {i} of {len(self)}")
        spans = self.offsets[3 * i:3 * i + 4]
        values = self.tokens.spans(spans[:1], spans[3:] - spans[:1]).tolist()
        cuts = (spans - spans[0]).tolist()
        return Pair(*(values[a:b] for a, b in itertools.pairwise(cuts)))


def open_pairs(folder: str, settings: dict, vocab_size: int, model: str
               ) -> tuple[Pairs, PreferenceStats]:
    """A tokenize folder's DPO pairs (each read when a batch needs it) and the stats it was
    written with."""
    manifest, offsets, arrays = _open(folder, "dpo", settings, vocab_size, model)
    return Pairs(offsets, arrays["tokens"]), PreferenceStats(**manifest["stats"])
