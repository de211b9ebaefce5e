"""The continuous-batching engine: a fixed set of decode slots and a scheduler thread.

Each slot owns its rows of one preallocated KV cache. The scheduler loop, on its own thread:
1. frees the slots of finished or cancelled requests, moves the highest busy slots down
   into the holes (busy slots stay the lowest ones), and admits waiting requests into free
   slots, first come, first served;
2. prefills, oldest first, up to one chunk's worth of prompt tokens (several short prompts,
   or one chunk of a long one: a long prompt never stalls running requests for more than
   one chunk);
3. runs one decode step over the smallest compiled batch (1, 2, 4, .. max_batch) holding
   every busy slot, with each row's sampling settings as arrays (one program per batch size
   for any mix of requests), and hands each running request its token.

With LoRA adapters (`adapters=`, a `lora.stack_adapters` tree) each request names its
adapter slot (`Sequence.adapter`, 0 = the base); the slot's row carries it into every program
(`step`'s adapter_rows), so requests for different adapters share the decode step.

Requests talk to the engine through `Sequence`: the engine calls `on_token` with each token
(returning a finish reason stops it, e.g. a stop string the caller matched) and `on_finish`
once. Both run on the scheduler thread and must be quick.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import attention, lora
from qwen2_jax.api import place_stacked_adapters
from qwen2_jax.decoding import check_kv_cache_dtype, position_limit, unstack_layers
from qwen2_jax.layers import compute_dtype
from qwen2_jax.rope import dynamic_yarn_scale
from qwen2_jax.serve import step
from qwen2_jax.serve.metrics import Metrics
from qwen2_jax.serve.programs import ProgramStore
from qwen2_jax.sharding import mesh_context, mesh_of, named_sharding, resolve_rules

logger = logging.getLogger("qwen2_jax.serve")

MIN_CHUNK = 16
SCORE_CHUNK = 64  # prompt log-probs (echo) are computed this many positions at a time


class QueueFull(RuntimeError):
    """The waiting queue holds --max-queue requests already."""


class EngineStopped(RuntimeError):
    """The engine is draining or stopped: it takes no new requests."""


@dataclasses.dataclass
class Settings:
    """A request's sampling settings (OpenAI/vLLM names; neutral values switch a step off)."""

    max_tokens: int
    temperature: float = 0.0  # greedy
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop_token_ids: frozenset = frozenset()
    logprobs: int | None = None  # top-N alternatives per token (0: the chosen token only)
    prompt_logprobs: bool = False  # echo: log-probs of the prompt's tokens


@dataclasses.dataclass(frozen=True)
class TokenInfo:
    """One token for the caller: its id, log-probability, and the top-N (id, logprob)."""

    token: int
    logprob: float | None = None
    top: tuple = ()


@dataclasses.dataclass(eq=False)
class Sequence:
    """One generation: a prompt, its settings, and the caller's callbacks.

    on_token(TokenInfo) -> str | None: a finish reason ends it ("stop": a stop string).
    on_finish(reason, prompt_logprobs): reason "stop", "length" or "cancelled";
    prompt_logprobs: a list of TokenInfo for prompt tokens 1.. (echo), else None.
    """

    prompt: list[int]
    settings: Settings
    on_token: Callable[[TokenInfo], str | None]
    on_finish: Callable[[str, list | None], None]
    sample_index: int = 0
    adapter: int = 0  # the LoRA adapter slot (Engine(adapters=)); 0: the base model
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    cancelled: bool = False
    generated: int = 0

    def cancel(self) -> None:
        """Thread-safe: the scheduler frees the slot at its next iteration."""
        self.cancelled = True


# A slot's fixed RowSettings values, in RowSettings' order (all but token_index), and those
# of an empty row.
ROW_DTYPES = (np.float32, np.int32, np.float32, np.float32, np.float32, np.float32, np.float32,
              np.uint32, np.int32)
NEUTRAL_ROW = (0.0, 0, 1.0, 0.0, 1.0, 0.0, 0.0, 0, 0)


@dataclasses.dataclass(eq=False)
class _Slot:
    sequence: Sequence
    chunks: list  # remaining prefill chunks: (start, width)
    seed: int
    prompt_mask: np.ndarray  # bool [V]: the prompt's ids (the repetition penalty's)
    row: tuple = NEUTRAL_ROW  # its RowSettings values (ROW_DTYPES)
    rope_scale: float = 1.0
    length: int = 0  # tokens in the cache
    prompt_logprobs: list | None = None
    scored: int = 0  # echo: prompt positions scored so far
    last_token_time: float = 0.0


def chunk_widths(prefill_chunk: int) -> list[int]:
    """The compiled prefill widths: powers of four from MIN_CHUNK, and prefill_chunk."""
    widths, width = [], MIN_CHUNK
    while width < prefill_chunk:
        widths.append(width)
        width *= 4
    return [*widths, prefill_chunk]


def decode_buckets(max_batch: int) -> list[int]:
    """The compiled decode batch sizes: powers of two below max_batch, and max_batch."""
    return [b for b in (1 << i for i in range(max_batch.bit_length())) if b < max_batch] + \
        [max_batch]


def plan_chunks(length: int, widths: list[int]) -> list[tuple[int, int]]:
    """(start, width) chunks covering `length` prompt tokens: the narrowest width that holds
    the rest when it is less than twice the rest, else the widest that fits (padding after
    the prompt is written but never read)."""
    chunks, start = [], 0
    while start < length:
        left = length - start
        holding = [w for w in widths if left <= w < 2 * left]
        fitting = [w for w in widths if w <= left]
        width = holding[0] if holding else fitting[-1] if fitting else widths[0]
        chunks.append((start, width))
        start += width
    return chunks


class Engine:
    """Continuous batching over `max_batch` slots of `max_model_len` tokens each.

    Construct, `start()` (warm-up compiles every program, then the scheduler runs), then
    `submit(sequence)` from any thread; `drain()` stops taking requests and returns when the
    running ones have finished; `stop()` ends the thread.

    kv_cache_dtype: "auto" keeps the cache in the compute dtype; "int8" stores keys and
    values as int8 with float32 "k_scale", "v_scale" [max_batch, K, slots] per layer
    (`decoding.init_cache`'s layout, one layer at a time), so about twice the slots fit.

    adapters: LoRA adapters served beside the base, a `lora.stack_adapters` tree (A - 1
    adapters; slot 0 the base), placed on the engine's devices and combined into its params.
    """

    def __init__(self, config, params, *, max_batch: int = 8, max_model_len: int = 4096,
                 prefill_chunk: int = 512, max_queue: int = 256, vocab_size: int | None = None,
                 dtype=None, mesh=None, rules=None, yarn: str = "dynamic",
                 metrics: Metrics | None = None, program_dir: str | None = None,
                 kv_cache_dtype: str = "auto", adapters: dict | None = None):
        check_kv_cache_dtype(kv_cache_dtype)
        if max_batch < 1 or max_model_len < 2 or prefill_chunk < MIN_CHUNK or max_queue < 1:
            raise ValueError("max_batch, max_queue >= 1, max_model_len >= 2, prefill_chunk "
                             f">= {MIN_CHUNK} are required")
        limit = position_limit(config)
        if max_model_len > limit:
            raise ValueError(f"max_model_len={max_model_len} is past the model's position "
                             f"limit {limit}")
        self.config = config
        self.max_batch = max_batch
        self.max_model_len = max_model_len
        self.max_queue = max_queue
        self.vocab_size = vocab_size or config.vocab_size
        self.widths = chunk_widths(prefill_chunk)
        self.buckets = decode_buckets(max_batch)
        self.mesh = mesh if mesh is not None else mesh_of(params)
        self.rules = resolve_rules(rules, self.mesh)
        self.dtype = jnp.dtype(dtype) if dtype is not None else compute_dtype(params)
        self.dynamic_yarn = config.rope_type == "yarn" and yarn == "dynamic"
        self.kv_cache_dtype = kv_cache_dtype
        self.metrics = metrics or Metrics()
        # Compiled programs by (name, chunk width or batch size); `program_dir` keeps them
        # for the next start.
        self.programs = ProgramStore(program_dir, [jax.devices()[0]] if self.mesh is None
                                     else list(self.mesh.devices.flat))
        self.metrics.programs = self.programs
        self._compiled: dict[tuple[str, int], object] = {}
        statics = (config, self.dtype, self.mesh, self.rules)
        self._steps = {"prefill": (step.prefill_chunk, (*statics, self.vocab_size)),
                       "decode": (step.decode, (*statics, self.vocab_size)),
                       "score": (step.score_chunk, statics),
                       "move": (step.move_row, (self.mesh, self.rules))}
        self.adapter_count = 0  # A: adapter slots, the base's included (0: no adapters)
        if adapters is not None:
            self.adapter_count = jax.tree.leaves(adapters)[0].shape[
                1 if "layers" in adapters else 0]
            params = lora.combine(params, place_stacked_adapters(config, adapters, self.mesh,
                                                                 self.rules))
        # Per-layer weights (the unrolled decode is ~2x faster on CPU than scanning).
        self.params = unstack_layers(params, config.num_hidden_layers)
        self.slots: list[_Slot | None] = [None] * max_batch
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.ready = False
        self.draining = False
        self._stop = False
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None
        self._seeds = np.random.default_rng()
        self.error: BaseException | None = None

    # -- the caller's side ------------------------------------------------------------------

    def submit(self, sequences: list[Sequence]) -> None:
        """Queues requests, all or none (thread-safe). Raises ValueError for one past the
        context or naming an adapter slot the engine lacks, QueueFull, or EngineStopped."""
        for sequence in sequences:
            if not 0 <= sequence.adapter < max(self.adapter_count, 1):
                raise ValueError(f"adapter slot {sequence.adapter}: this engine has "
                                 f"{max(self.adapter_count - 1, 0)} adapters")
            total = len(sequence.prompt) + sequence.settings.max_tokens
            if total > self.max_model_len:
                raise ValueError(f"prompt ({len(sequence.prompt)} tokens) + max_tokens "
                                 f"({sequence.settings.max_tokens}) = {total} is past "
                                 f"max_model_len={self.max_model_len}")
        with self._wake:
            if self.draining or self._stop or self.error is not None:
                raise EngineStopped("the server is shutting down")
            if len(self.waiting) + len(sequences) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (--max-queue "
                                f"{self.max_queue})")
            self.waiting.extend(sequences)
            self.metrics.waiting = len(self.waiting)
            self._wake.notify()

    def wake(self) -> None:
        """Makes the scheduler look at cancellations now."""
        with self._wake:
            self._wake.notify()

    def start(self, warm_up: bool = True) -> None:
        """Compiles every program (warm-up), then runs the scheduler on its own thread."""
        with mesh_context(self.mesh):
            self._allocate()
            if warm_up:
                self._warm_up()
        self.ready = True
        self._thread = threading.Thread(target=self._run, name="qwen2-jax-engine", daemon=True)
        self._thread.start()

    def drain(self, timeout: float | None = None) -> None:
        """Takes no new requests; returns when waiting and running ones are done."""
        with self._wake:
            self.draining = True
            self._wake.notify()
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.waiting or any(self.slots):
            if self.error is not None or (deadline and time.monotonic() > deadline):
                break
            time.sleep(0.01)

    def stop(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()

    # -- device state -----------------------------------------------------------------------

    def _allocate(self) -> None:
        c = self.config
        # Room past max_model_len for the last prefill chunk's padding.
        self.cache_slots = self.max_model_len + max(self.widths[-1], SCORE_CHUNK)
        shape = (self.max_batch, c.num_key_value_heads, self.cache_slots, c.head_size)

        def layers(shape, dtype) -> tuple:
            # Committed arrays from the start: an uncommitted first call would compile apart.
            sharding = jax.devices()[0] if self.mesh is None else named_sharding(
                attention.CACHE_AXES[:len(shape)], shape, self.mesh, self.rules)
            return tuple(jnp.zeros(shape, dtype, device=sharding)
                         for _ in range(c.num_hidden_layers))

        if self.kv_cache_dtype == "int8":  # int8 keys and values, a float32 scale each
            self.cache = {"k": layers(shape, jnp.int8), "v": layers(shape, jnp.int8),
                          "k_scale": layers(shape[:-1], jnp.float32),
                          "v_scale": layers(shape[:-1], jnp.float32)}
        else:
            self.cache = {name: layers(shape, self.dtype) for name in ("k", "v")}
        b, v = self.max_batch, c.vocab_size
        place = jax.devices()[0] if self.mesh is None else named_sharding(
            (), (), self.mesh, self.rules)
        self.state = {"token": jnp.zeros((b,), jnp.int32, device=place),
                      "prompt_mask": jnp.zeros((b, v), bool, device=place),
                      "counts": jnp.zeros((b, v), jnp.int32, device=place)}

    def _settings(self, slots: list[_Slot | None]) -> step.RowSettings:
        """RowSettings arrays for these slots (neutral greedy values for empty ones)."""
        table = np.array([NEUTRAL_ROW if s is None else s.row for s in slots],
                         np.float64)  # [n, 9]: exact for uint32 seeds too
        return step.RowSettings(
            *(table[:, i].astype(dtype) for i, dtype in enumerate(ROW_DTYPES)),
            token_index=np.array([0 if s is None else s.sequence.generated for s in slots],
                                 np.int32))

    def _rope_scale(self, slots: list[_Slot | None]):
        if not self.dynamic_yarn:
            return None
        return np.array([1.0 if s is None else s.rope_scale for s in slots], np.float32)

    def _adapter_rows(self, slots: list[_Slot | None]):
        """Each row's adapter slot, one-hot [n, A] float32 (empty rows: the base), or None
        without adapters."""
        if not self.adapter_count:
            return None
        return np.eye(self.adapter_count, dtype=np.float32)[
            [0 if s is None else s.sequence.adapter for s in slots]]

    def _program(self, name: str, size: int, args: tuple):
        """The compiled step program `name` for chunk width or batch size `size`: compiled,
        or read from the store, on first use (every one during warm-up)."""
        program = self._compiled.get((name, size))
        if program is None:
            fn, static = self._steps[name]
            program = self.programs.get(f"{name}-{size}", fn, static, args)
            self._compiled[(name, size)] = program
        return program

    def _run_program(self, name: str, size: int, args: tuple):
        return self._program(name, size, args)(*args)

    def _prefill_args(self, index: int, slot: _Slot, ids: np.ndarray, start: int,
                      last: int) -> tuple:
        return (self.params, self.cache, self.state, np.int32(index), ids[None],
                np.int32(start), np.int32(last), slot.prompt_mask, self._settings([slot]),
                self._rope_scale([slot]), self._adapter_rows([slot]))

    def _score_args(self, index: int, slot: _Slot, ids: np.ndarray, start: int,
                    targets: np.ndarray) -> tuple:
        return (self.params, self.cache, np.int32(index), ids, np.int32(start), targets,
                self._rope_scale([slot]), self._adapter_rows([slot]))

    def _decode_args(self, n: int) -> tuple:
        slots = self.slots[:n]
        lengths = np.array([0 if s is None else s.length for s in slots], np.int32)
        active = np.array([s is not None and not s.chunks for s in slots], bool)
        return (self.params, self.cache, self.state, lengths, active, self._settings(slots),
                self._rope_scale(slots), self._adapter_rows(slots))

    def _move_args(self, source: int, target: int) -> tuple:
        return self.cache, self.state, np.int32(source), np.int32(target)

    def _warm_up(self) -> None:
        """Compiles, or reads from the store, every program a request can need."""
        began = time.monotonic()
        dummy = _Slot(Sequence([0], Settings(1), lambda t: None, lambda r, p: None), [], 0,
                      prompt_mask=np.zeros(self.config.vocab_size, bool))
        ids = np.zeros((1, SCORE_CHUNK), np.int32)
        for width in self.widths:
            self._program("prefill", width,
                          self._prefill_args(0, dummy, np.zeros(width, np.int32), 0, 0))
        self._program("score", SCORE_CHUNK, self._score_args(0, dummy, ids, 0, ids))
        for n in self.buckets:
            self._program("decode", n, self._decode_args(n))
        self._program("move", 1, self._move_args(0, 0))
        logger.info("warm-up: %d programs ready in %.1f s (%d compiled, %d read from %s)",
                    len(self._compiled), time.monotonic() - began, self.programs.compiled,
                    self.programs.loaded, self.programs.folder)

    # -- the scheduler ----------------------------------------------------------------------

    def _run(self) -> None:
        try:
            with mesh_context(self.mesh):
                while True:
                    with self._wake:
                        self._free_cancelled()
                        self._compact()
                        self._admit()
                        busy = any(self.slots)
                        if not busy:
                            if self._stop:
                                return
                            self._wake.wait(0.5)
                            continue
                        if self._stop:
                            return
                    self._iterate()
        except BaseException as e:  # the server must answer, not hang: fail every request
            logger.exception("engine failed")
            self.error = e
            for slot in self.slots:
                if slot is not None:
                    self._finish_quietly(slot.sequence, "error")
            while self.waiting:
                self._finish_quietly(self.waiting.popleft(), "error")

    @staticmethod
    def _finish_quietly(sequence: Sequence, reason: str) -> None:
        try:
            sequence.on_finish(reason, None)
        except Exception:
            logger.exception("on_finish failed")

    def _free_cancelled(self) -> None:
        for index, slot in enumerate(self.slots):
            if slot is not None and slot.sequence.cancelled:
                self._release(index, "cancelled")
        kept = [s for s in self.waiting if not s.cancelled]
        for sequence in self.waiting:
            if sequence.cancelled:
                self._finish_quietly(sequence, "cancelled")
        self.waiting = collections.deque(kept)
        self.metrics.waiting = len(self.waiting)

    def _compact(self) -> None:
        """Moves the highest busy slots into the holes below them, so requests occupy the
        lowest slots and a decode step runs only as many rows as the load needs (one row copy
        per finished request, against a full batch's matmuls every step)."""
        while True:
            holes = [i for i, s in enumerate(self.slots) if s is None]
            busy = [i for i, s in enumerate(self.slots) if s is not None]
            if not holes or not busy or holes[0] > busy[-1]:
                return
            source, target = busy[-1], holes[0]
            self.cache, self.state = self._run_program("move", 1,
                                                       self._move_args(source, target))
            self.slots[target], self.slots[source] = self.slots[source], None

    def _admit(self) -> None:
        for index, slot in enumerate(self.slots):
            if slot is None and self.waiting:
                sequence = self.waiting.popleft()
                s = sequence.settings
                seed = s.seed if s.seed is not None else int(self._seeds.integers(2**32))
                prompt_mask = np.zeros(self.config.vocab_size, bool)
                prompt_mask[sequence.prompt] = True
                new = _Slot(sequence, plan_chunks(len(sequence.prompt), self.widths),
                            seed % 2**32, prompt_mask)
                new.row = (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty,
                           s.presence_penalty, s.frequency_penalty, new.seed,
                           sequence.sample_index)
                if self.dynamic_yarn:
                    new.rope_scale = float(dynamic_yarn_scale(
                        self.config, [len(sequence.prompt) + s.max_tokens])[0])
                if s.prompt_logprobs:
                    new.prompt_logprobs = []
                self.slots[index] = new
        self.metrics.waiting = len(self.waiting)
        self.metrics.running = sum(s is not None for s in self.slots)

    def _iterate(self) -> None:
        # Prefill first, up to one chunk's worth of tokens (several short prompts, or one
        # chunk of a long one), oldest first: new requests get their first token soon, and
        # running ones wait at most about one chunk.
        budget = self.widths[-1]
        while budget > 0:
            prefilling = [i for i, s in enumerate(self.slots) if s is not None and s.chunks]
            if not prefilling:
                break
            oldest = min(prefilling, key=lambda i: self.slots[i].sequence.arrival)
            budget -= self._prefill_step(oldest)
        if any(s is not None and not s.chunks for s in self.slots):
            highest = max(i for i, s in enumerate(self.slots) if s is not None)
            n = next(b for b in self.buckets if b > highest)
            self.cache, self.state, chosen = self._run_program("decode", n,
                                                               self._decode_args(n))
            chosen = jax.device_get(chosen)
            now = time.monotonic()
            for index, slot in enumerate(self.slots[:n]):
                if slot is not None and not slot.chunks:
                    slot.length += 1
                    self.metrics.token_latency.observe(now - slot.last_token_time)
                    self._deliver(index, chosen, index, now)
            self.metrics.tick()

    def _prefill_step(self, index: int) -> int:
        """Runs slot `index`'s next prefill (or scoring) chunk; returns its width."""
        slot = self.slots[index]
        prompt = slot.sequence.prompt
        if slot.prompt_logprobs is not None and slot.scored < len(prompt):
            self._score_step(index, slot)
            return SCORE_CHUNK
        start, width = slot.chunks.pop(0)
        ids = np.zeros(width, np.int32)
        piece = prompt[start:start + width]
        ids[:len(piece)] = piece
        last = len(prompt) - 1 - start if start + width >= len(prompt) else -1
        self.cache, self.state, chosen = self._run_program(
            "prefill", width, self._prefill_args(index, slot, ids, start, last))
        if last < 0:
            # Decode steps write this idle row at slot `length`: the next chunk's first
            # slot, which that chunk overwrites.
            slot.length = start + width
            return width
        slot.length = len(prompt)
        if slot.sequence.settings.max_tokens == 0:  # echo only
            self._release(index, "length")
            return width
        chosen = jax.device_get(chosen)
        now = time.monotonic()
        self.metrics.time_to_first_token.observe(now - slot.sequence.arrival)
        self.metrics.prompt_tokens += len(prompt)
        self._deliver(index, chosen, 0, now)
        return width

    def _score_step(self, index: int, slot: _Slot) -> None:
        """Echo: the next SCORE_CHUNK prompt positions' log-probs, written into the cache
        too; the prompt's last chunk then runs again as a prefill to choose the first
        token (one chunk recomputed)."""
        prompt = slot.sequence.prompt
        start = slot.scored
        piece = prompt[start:start + SCORE_CHUNK]
        targets = prompt[start + 1:start + 1 + SCORE_CHUNK]
        ids = np.zeros((1, SCORE_CHUNK), np.int32)
        ids[0, :len(piece)] = piece
        target_ids = np.zeros((1, SCORE_CHUNK), np.int32)
        target_ids[0, :len(targets)] = targets
        self.cache, *scored = self._run_program(
            "score", SCORE_CHUNK, self._score_args(index, slot, ids, start, target_ids))
        logprob, top_ids, top_logprobs = jax.device_get(scored)
        n = slot.sequence.settings.logprobs or 0
        for i in range(len(targets)):
            slot.prompt_logprobs.append(TokenInfo(
                targets[i], float(logprob[i]),
                tuple(zip(top_ids[i, :n].tolist(), top_logprobs[i, :n].tolist(),
                          strict=True))))
        slot.scored = start + SCORE_CHUNK
        if slot.scored >= len(prompt):  # the cache holds the prompt: re-run its last chunk
            slot.chunks = slot.chunks[-1:]

    def _deliver(self, index: int, chosen, row: int, now: float) -> None:
        """Hands row `row` of `chosen` to slot `index`'s request; finishes it when due."""
        slot = self.slots[index]
        sequence = slot.sequence
        s = sequence.settings
        token = int(chosen.token[row])
        slot.last_token_time = now
        if token in s.stop_token_ids:
            self._release(index, "stop")
            return
        n = s.logprobs or 0
        info = TokenInfo(token, float(chosen.logprob[row]), tuple(zip(
            chosen.top_ids[row, :n].tolist(), chosen.top_logprobs[row, :n].tolist(),
            strict=True)))
        sequence.generated += 1
        self.metrics.generation_tokens += 1
        reason = sequence.on_token(info)
        if reason is None and sequence.generated >= s.max_tokens:
            reason = "length"
        if reason is not None:
            self._release(index, reason)

    def _release(self, index: int, reason: str) -> None:
        slot = self.slots[index]
        self.slots[index] = None
        self.metrics.running = sum(s is not None for s in self.slots)
        self.metrics.finished[reason] = self.metrics.finished.get(reason, 0) + 1
        try:
            slot.sequence.on_finish(reason, slot.prompt_logprobs)
        except Exception:
            logger.exception("on_finish failed")
