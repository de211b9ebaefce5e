"""`qwen2-jax chat` as a person uses it: typed into a pseudo-terminal, the screen read back and
compared with transformers' greedy generate on the same chat (its tokenizer, template, model)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import pty
import re
import select
import signal
import sys
import time

import pytest
import torch

from conftest import make_hf_model
from qwen2_jax.commands import chat

STOPS = [151645, 151643]  # <|im_end|>, <|endoftext|>
TOKENIZER_SIZE = 151646  # the embedding has 151936 rows; generation never picks the rest
TIMEOUT = 240  # seconds any one wait may take (startup and compilation on a busy CPU)
LAUNCH = ("import argparse, sys; from qwen2_jax.commands import chat; "
          "p = argparse.ArgumentParser(); chat.add_parser(p.add_subparsers(dest='command')); "
          "sys.exit(chat.run(p.parse_args(['chat', *sys.argv[1:]])))")
PROMPT = b"\r\n>>> "  # the end of an answer: its newline, then the prompt (the tty adds \r)


def make_chat_model(folder, tokenizer_dir, **overrides):
    """A tiny random Qwen2 with the real vocabulary and tokenizer, greedy, stopping at eos."""
    model = make_hf_model(folder, vocab_size=151936, hidden_size=32, intermediate_size=64,
                          num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                          **overrides)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": STOPS}))
    return model


class Reference:
    """transformers' answer to a conversation: its chat template, greedy generate, decode."""

    def __init__(self, model, folder):
        from transformers import AutoTokenizer

        self.model = model
        self.tokenizer = AutoTokenizer.from_pretrained(folder)

    def prompt(self, exchanges, message) -> list[int]:
        messages = []
        for asked, answered in exchanges:
            messages += [{"role": "user", "content": asked},
                         {"role": "assistant", "content": answered}]
        messages.append({"role": "user", "content": message})
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=True)["input_ids"]

    def answer(self, exchanges, message, max_new_tokens) -> str:
        prompt = self.prompt(exchanges, message)
        with torch.no_grad():
            out = self.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                      do_sample=False, eos_token_id=STOPS, pad_token_id=STOPS[1],
                                      suppress_tokens=list(range(TOKENIZER_SIZE, 151936)))
        tokens = out[0, len(prompt):].tolist()
        tokens = tokens[:min([tokens.index(s) for s in STOPS if s in tokens] or [len(tokens)])]
        return self.tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="module")
def terminal_model(tmp_path_factory, qwen2_tokenizer_dir):
    folder = tmp_path_factory.mktemp("chat_model")
    model = make_chat_model(folder, qwen2_tokenizer_dir, max_position_embeddings=4096)
    return folder, Reference(model, folder)


class Terminal:
    """The chat running on a pseudo-terminal: keys typed in, the screen's bytes read out."""

    def __init__(self, *args: str):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, with the pty as its controlling terminal
            os.execve(sys.executable, [sys.executable, "-c", LAUNCH, *args],
                      {**os.environ, "TERM": "dumb"})
        self.screen = b""

    def read_until(self, marker: bytes, at_least: int = 0) -> bytes:
        """The bytes up to and including `marker` (and at least `at_least` bytes)."""
        deadline = time.monotonic() + TIMEOUT
        while marker not in self.screen[at_least:]:
            ready, _, _ = select.select([self.fd], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"no {marker!r} after {TIMEOUT} s; screen: {self.screen!r}")
            try:
                chunk = os.read(self.fd, 65536)
            except OSError:  # EIO: the chat has exited
                chunk = b""
            if not chunk:
                raise EOFError(f"the chat ended before {marker!r}; screen: {self.screen!r}")
            self.screen += chunk
        end = self.screen.index(marker, at_least) + len(marker)
        out, self.screen = self.screen[:end], self.screen[end:]
        return out

    def read_some(self, count: int) -> bytes:
        """At least `count` more bytes, whatever they are."""
        deadline = time.monotonic() + TIMEOUT
        while len(self.screen) < count:
            ready, _, _ = select.select([self.fd], [], [], max(0, deadline - time.monotonic()))
            if not ready:
                raise TimeoutError(f"{len(self.screen)} of {count} bytes after {TIMEOUT} s")
            self.screen += os.read(self.fd, 65536)
        out, self.screen = self.screen, b""
        return out

    def type(self, keys: str, pause: float = 0.3) -> None:
        time.sleep(pause)  # a person is never faster than readline taking over the terminal
        os.write(self.fd, keys.encode())

    def send(self, message: str) -> None:
        """Types a message and Enter; returns once the terminal has echoed it."""
        self.type(message + "\r")
        self.read_until(message.encode() + b"\r\n")

    def ask(self, message: str) -> str:
        """The answer to `message`, as the screen shows it (without the tty's \\r)."""
        self.send(message)
        return shown(self.read_until(PROMPT)[:-len(PROMPT)])

    def exit_code(self) -> int:
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:  # drain: the chat never blocks
                with contextlib.suppress(OSError):  # EIO: the chat closed its end
                    self.screen += os.read(self.fd, 65536)
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        raise TimeoutError(f"the chat did not exit; screen: {self.screen!r}")

    def kill(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def shown(screen: bytes) -> str:
    """Text as written by the program: the tty writes each \\n as \\r\\n."""
    return screen.decode("utf-8").replace("\r\n", "\n")


@pytest.fixture
def terminal():
    opened = []

    def start(*args):
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for t in opened:
        t.kill()


def test_chat_in_a_terminal_streams_transformers_answers_with_history(terminal_model,
                                                                      terminal):
    folder, reference = terminal_model
    term = terminal("--model", str(folder), "--max-new-tokens", "12")
    assert b"/reset clears the history" in term.read_until(b">>> ")

    first = term.ask("Hello! 你好")
    assert first and first == reference.answer([], "Hello! 你好", 12)
    second = term.ask("Tell me more.")
    assert second == reference.answer([("Hello! 你好", first)], "Tell me more.", 12)
    assert second != reference.answer([], "Tell me more.", 12)  # the history was used

    term.send("/reset")
    assert b"(history cleared)" in term.read_until(b">>> ")
    assert term.ask("Hello! 你好") == first
    term.send("/exit")
    assert term.exit_code() == 0


def test_ctrl_c_stops_an_answer_and_keeps_what_was_said(terminal_model, terminal):
    folder, reference = terminal_model
    term = terminal("--model", str(folder), "--max-new-tokens", "2000")
    term.read_until(b">>> ")

    term.send("Tell me a very long story.")
    screen = term.read_some(300)  # the answer is streaming
    term.type("\x03", pause=0)  # Ctrl-C: the terminal sends SIGINT
    screen += term.read_until(PROMPT)
    partial = shown(screen[:-len(PROMPT)]).replace("^C", "", 1)  # the tty's echo of Ctrl-C
    assert 0 < len(reference.tokenizer.encode(partial)) < 1000  # of 2000

    # The next answer continues the conversation with the partial answer in it.
    history = [("Tell me a very long story.", partial)]
    expected = reference.answer(history, "Go on.", 10).rstrip("\ufffd")
    term.send("Go on.")
    screen = term.read_some(len(expected.encode()) + 100)
    term.type("\x03", pause=0)
    screen += term.read_until(PROMPT)
    assert shown(screen).startswith(expected)

    term.type("\x03")  # Ctrl-C at the prompt leaves, as an interrupted program
    assert term.exit_code() == 130


# ----- without a terminal: scripted input, the overflowing history, bad flags ------------


@pytest.fixture(scope="module")
def short_model(tmp_path_factory, qwen2_tokenizer_dir):
    """64 positions: a few exchanges of 8-token answers fill them."""
    folder = tmp_path_factory.mktemp("short_chat_model")
    model = make_chat_model(folder, qwen2_tokenizer_dir, max_position_embeddings=64)
    return folder, Reference(model, folder)


def run_chat(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    chat.add_parser(parser.add_subparsers(dest="command"))
    return chat.run(parser.parse_args(["chat", *argv]))


class Script:
    """stdin, stdout and stderr in one log of (stream name, text), in order."""

    def __init__(self, lines):
        self.lines = list(lines)
        self.log: list[tuple[str, str]] = []

    def stream(self, name):
        script = self

        class Stream:
            def write(self, text):
                script.log.append((name, text))
                return len(text)

            def flush(self):
                pass

            def isatty(self):
                return False

            def readline(self):
                line = script.lines.pop(0) + "\n" if script.lines else ""
                script.log.append(("stdin", line))
                return line

        return Stream()

    def turns(self) -> list[tuple[str, str, str]]:
        """(typed line, stdout, stderr) for each line typed."""
        turns = []
        for kind, text in self.log:
            if kind == "stdin":
                turns.append([text.rstrip("\n"), "", ""])
            elif turns:
                turns[-1][1 if kind == "stdout" else 2] += text
        return [tuple(t) for t in turns]


def test_a_full_context_drops_the_oldest_exchanges(short_model, monkeypatch):
    folder, reference = short_model
    long = " ".join(["word"] * 60)
    messages = ["Hi there.", "How are you?", long, "What is two plus two?", "And three?"]
    turns = chat_lines(monkeypatch, messages, "--model", str(folder), "--max-new-tokens", "8")

    def fits(history, message):
        return len(reference.prompt(history, message)) + 8 <= 64

    history, drops, refused = [], 0, False
    for message, out, err in turns:
        if message == long:  # too long even alone: refused, the history unchanged
            assert not fits([], long) and out == ""
            assert re.fullmatch(r"qwen2-jax chat: message not sent: even without the history "
                                r"its prompt is \d+ tokens, and with --max-new-tokens 8 only 56 "
                                r"fit in the model's 64 positions; shorten it or lower "
                                r"--max-new-tokens\n", err)
            refused = True
            continue
        dropped = re.search(r"dropped the oldest (\d+) exchange", err)
        if dropped:  # as few as needed, and no more
            n = int(dropped.group(1))
            assert not fits(history[n - 1:], message) and fits(history[n:], message)
            history, drops = history[n:], drops + 1
        else:
            assert fits(history, message) and err == ""
        answer = out.removesuffix("\n")
        assert answer and answer == reference.answer(history, message, 8)
        history.append((message, answer))
    assert drops and refused


def chat_lines(monkeypatch, lines, *argv) -> list[tuple[str, str, str]]:
    """(line, stdout, stderr) of each line piped into the chat; it ends at end of input."""
    script = Script(lines)
    for name in ("stdin", "stdout", "stderr"):
        monkeypatch.setattr(sys, name, script.stream(name))
    assert run_chat(*argv) == 0
    return script.turns()[:-1]


def test_an_answer_ends_at_an_eos_token_of_the_generation_config(tmp_path, short_model,
                                                                  monkeypatch):
    folder, reference = short_model
    for name in os.listdir(folder):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    prompt = reference.prompt([], "Hi there.")
    with torch.no_grad():
        free = reference.model.generate(torch.tensor([prompt]), max_new_tokens=8,
                                        do_sample=False, eos_token_id=None,
                                        pad_token_id=STOPS[1])[0, len(prompt):].tolist()
    eos = free[3]  # the fourth token the model says ends the answer; the first three stay
    assert eos not in free[:3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    [(_, out, _)] = chat_lines(monkeypatch, ["Hi there."], "--model", str(tmp_path),
                               "--max-new-tokens", "8")
    assert out == reference.tokenizer.decode(free[:3]) + "\n"


@pytest.mark.parametrize("argv, message", [
    (["--max-new-tokens", "0"], "--max-new-tokens must be an integer >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p must be a number in (0, 1], got 1.5"),
    (["--max-new-tokens", "60"], "--max-new-tokens 60 leaves no room for a message in the "
                                 "model's 64 positions (max_position_embeddings)"),
])
def test_bad_flags_exit_2_before_loading(short_model, capsys, argv, message):
    folder, _ = short_model
    assert run_chat("--model", str(folder), *argv) == 2
    assert capsys.readouterr().err == f"qwen2-jax chat: {message}\n"
