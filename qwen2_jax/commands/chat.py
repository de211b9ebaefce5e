"""`qwen2-jax chat`: a multi-turn chat in the terminal, each answer streamed as it comes.

Every turn renders the whole history through the model folder's chat template (generation
prompt added) and generates with `qwen2_jax.generate`, whose on_tokens callback prints the text.

Ctrl-C during an answer: the decode loop runs on device in one `lax.while_loop`, so Python can
stop it only from the host callback it makes for every token. An exception raised there ends
the loop at that step (JAX re-raises it from `generate` as a JaxRuntimeError, and the next
call works). But a signal reaches Python only in the main thread, between bytecodes: on CPU
the callbacks happen to run in the main thread, on GPU and TPU they run on a runtime thread
while the main thread waits inside XLA, so Ctrl-C would wait for the whole answer. So the
answer is generated in a worker thread; the main thread waits on it (a wait Ctrl-C
interrupts), sets a flag, and the next token's callback raises.
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading

from qwen2_jax.commands.common import (
    MESH_HELP,
    MODEL_HELP,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    mesh_from_args,
    model_path,
    quantize_from_args,
    run_guarded,
    stage,
)
from qwen2_jax.commands.generate import (
    SETTINGS,
    add_long_context_args,
    add_sampling_args,
    check_sampling_flags,
    generation_defaults,
    kv_cache_gb,
)

NAME = "chat"
PROMPT = ">>> "
COMMANDS_HELP = "/reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops an answer"
LOWER = "--max-new-tokens or the conversation (/reset), or spread the model over more devices " \
        "with --mesh"


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="chat with a model in the terminal, answers streamed as they come",
        description="An interactive multi-turn chat. Each turn sends the whole conversation "
        "through the model folder's chat template; the answer streams token by token and "
        "stops at the generation config's and tokenizer's eos tokens or --max-new-tokens. "
        f"Type a message and Enter; {COMMANDS_HELP}. Ctrl-C during an answer stops it and "
        "keeps what was said so far in the history (nothing, if no text came yet: then the "
        "message is dropped too); Ctrl-C at the prompt leaves with exit code 130, like any "
        "interrupted program; /exit and Ctrl-D exit with 0. When the conversation plus "
        "--max-new-tokens would pass the model's max_position_embeddings, the oldest "
        "exchanges are dropped (with a notice); a message too long even alone is refused and "
        "the chat goes on. Sampling defaults come from generation_config.json, as in "
        "`qwen2-jax generate`.", epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--system", metavar="TEXT",
                        help="system message, kept by /reset (default: the template's)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="tokens per answer at most (default: generation_config or 128)")
    add_sampling_args(parser)
    add_long_context_args(parser)
    parser.add_argument("--seed", type=int, default=0,
                        help="sampling seed of the first answer; answer i uses seed + i "
                        "(default 0)")
    add_quantize_args(parser)
    add_mesh_args(parser)


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _chat(args), LOWER)


class _Stopped(Exception):
    """Raised in the token callback to end the decode loop (Ctrl-C)."""


def _quiet_stops(record: logging.LogRecord) -> bool:
    """JAX logs every exception of a callback with its traceback; not ours."""
    return not (record.exc_info and isinstance(record.exc_info[1], _Stopped))


class Chat:
    """The conversation: messages, each turn's prompt fitted into the model's positions."""

    def __init__(self, tokenizer, system: str | None, limit: int, max_new_tokens: int):
        self.tokenizer = tokenizer
        self.system = [{"role": "system", "content": system}] if system else []
        self.limit = limit  # the model's positions
        self.max_new_tokens = max_new_tokens
        self.exchanges: list[tuple[str, str]] = []  # (user, assistant)

    def messages(self, exchanges, user: str) -> list[dict]:
        out = list(self.system)
        for asked, answered in exchanges:
            out += [{"role": "user", "content": asked},
                    {"role": "assistant", "content": answered}]
        return [*out, {"role": "user", "content": user}]

    def prompt(self, user: str) -> tuple[list[int], int]:
        """The prompt ids for `user` after the history, and how many of the oldest exchanges
        had to be dropped (from the history too) to fit; a UsageError when the message does
        not fit even alone."""
        room = self.limit - self.max_new_tokens
        for dropped in range(len(self.exchanges) + 1):
            ids = self.tokenizer.encode(self.tokenizer.apply_chat_template(
                self.messages(self.exchanges[dropped:], user)))
            if len(ids) <= room:
                del self.exchanges[:dropped]
                return ids, dropped
        raise UsageError(f"message not sent: even without the history its prompt is {len(ids)} "
                         f"tokens, and with --max-new-tokens {self.max_new_tokens} only {room} "
                         f"fit in the model's {self.limit} positions; shorten it or lower "
                         "--max-new-tokens")


def _chat(args: argparse.Namespace) -> int:
    import qwen2_jax
    from qwen2_jax.decoding import position_limit
    from qwen2_jax.tokenizer import Tokenizer

    check_sampling_flags(args)
    quantize = quantize_from_args(args)
    model = model_path(args.model)
    config = qwen2_jax.Qwen2Config.from_file(model)
    settings = generation_defaults(model)
    tokenizer = Tokenizer(model)
    for name in SETTINGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    stops = set(settings.pop("stop_token_ids"))
    stops.update(i for i in (tokenizer.special_id("eos_token"),) if i is not None)
    settings.update(yarn=args.yarn, prefill_chunk=args.prefill_chunk,
                    kv_cache_dtype=args.kv_cache_dtype)
    chat = Chat(tokenizer, args.system, position_limit(config), settings["max_new_tokens"])
    try:
        chat.prompt("")
    except UsageError:
        raise UsageError(f"--max-new-tokens {chat.max_new_tokens} leaves no room for a message "
                         f"in the model's {chat.limit} positions (max_position_embeddings)"
                         ) from None
    mesh, rules = mesh_from_args(args)
    with stage("loading the model"):
        config, params = qwen2_jax.load(model, mesh=mesh, rules=rules, **quantize)
    logging.getLogger("jax._src.callback").addFilter(_quiet_stops)

    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  (line editing and history for input())

        print(f"Chatting with {model}. {COMMANDS_HELP}.", file=sys.stderr)
    turn = 0
    while True:
        try:
            line = input(PROMPT if interactive else "")
        except (EOFError, KeyboardInterrupt) as e:
            if interactive:
                print()  # the shell's prompt on a line of its own
            return 0 if isinstance(e, EOFError) else 130
        command = line.strip()
        if not command:
            continue
        if command == "/exit":
            return 0
        if command == "/reset":
            chat.exchanges.clear()
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            ids, dropped = chat.prompt(line)
        except UsageError as e:
            print(f"qwen2-jax chat: {e}", file=sys.stderr)
            continue
        if dropped:
            print(f"(dropped the oldest {dropped} exchange(s): the conversation no longer "
                  f"fits the model's {chat.limit} positions with --max-new-tokens "
                  f"{chat.max_new_tokens})", file=sys.stderr)
        problem = tokenizer.out_of_vocabulary(ids, config.vocab_size)
        if problem:
            raise UsageError(problem)
        answer = _answer(qwen2_jax, config, params, tokenizer, ids, stops, settings,
                         args.seed + turn, mesh, rules)
        turn += 1
        if answer is not None:
            chat.exchanges.append((line, answer))


def _answer(qwen2_jax, config, params, tokenizer, ids, stops, settings, seed, mesh,
            rules) -> str | None:
    """Generates and streams one answer; its text, or None when Ctrl-C stopped it before any
    token. Runs in a worker thread so that Ctrl-C reaches this (the main) thread at once."""
    from qwen2_jax.tokenizer import StreamDecoder

    stream = StreamDecoder(tokenizer)
    stop, done = threading.Event(), threading.Event()
    tokens: list[int] = []
    outcome: dict = {}

    def on_tokens(step_tokens, live):
        if stop.is_set():
            raise _Stopped
        if live[0]:
            tokens.append(int(step_tokens[0]))
            sys.stdout.write(stream.push(tokens[-1]))
            sys.stdout.flush()

    def work():
        length = len(ids) + settings["max_new_tokens"]
        try:
            with stage(f"generating up to {length} tokens (their KV cache alone takes "
                       f"{kv_cache_gb(config, 1, length, settings['kv_cache_dtype']):.2f} GB)"):
                qwen2_jax.generate(config, params, [ids], stop_token_ids=sorted(stops),
                                   seed=seed, vocab_size=len(tokenizer), mesh=mesh,
                                   rules=rules, on_tokens=on_tokens, **settings)
        except Exception as e:
            outcome["error"] = e
        finally:
            done.set()

    # Waits on an Event, not on join(): CPython 3.11's join() interrupted by Ctrl-C (the
    # bpo-45274 handling) marks the thread finished while it still runs, and the interpreter
    # may then exit under it (an abort in XLA's threads).
    worker = threading.Thread(target=work, name="qwen2-jax chat answer")
    worker.start()
    try:
        done.wait()
    except KeyboardInterrupt:
        stop.set()
        done.wait()  # set at the next token
    worker.join()
    error = outcome.get("error")
    if error is not None and not stop.is_set():
        raise error
    sys.stdout.write(stream.flush() + "\n")
    sys.stdout.flush()
    if stop.is_set() and not tokens:
        return None
    return tokenizer.decode(tokens, skip_special_tokens=True)
