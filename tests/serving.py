"""Starting and stopping `qwen2-jax serve` in tests: a subprocess on 127.0.0.1 and a free port,
ready when /health answers 200, always stopped (SIGTERM, then SIGKILL)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

SCRIPT = Path(sys.executable).parent / "qwen2-jax"
STARTUP = 300  # seconds: load, then warm-up compiles on a busy 2-core machine


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, headers: dict | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@dataclasses.dataclass
class Server:
    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    log: Path
    statuses: list  # /health answers seen while starting

    def metric(self, name: str) -> float:
        """One sample of /metrics (name with its labels, as printed)."""
        _, text = get(f"{self.url}/metrics")
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def wait_ready(self) -> None:
        """Until /health answers 200; fails with the log's tail if the server exits or takes
        longer than STARTUP seconds."""
        deadline = time.monotonic() + STARTUP
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited with {self.process.returncode}:\n"
                                     f"{self.tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"the server did not get ready:\n{self.tail()}")
            with contextlib.suppress(OSError):
                status, _ = get(f"{self.url}/health")
                self.statuses.append(status)
                if status == 200:
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM to its process group, then SIGKILL after 30 s."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_server(model: str | None, *flags: str, log: Path, env: dict | None = None) -> Server:
    """`qwen2-jax serve --model MODEL FLAGS...` (None: the default model) on a free port, not
    waited for (see Server.wait_ready)."""
    port = free_port()
    command = [str(SCRIPT), "serve", *(["--model", model] if model else []), "--host",
               "127.0.0.1", "--port", str(port), *flags]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **(env or {})}, start_new_session=True)
    return Server(process, f"http://127.0.0.1:{port}", log, [])


@contextlib.contextmanager
def running_server(model: str | None, *flags: str, log: Path, env: dict | None = None):
    """A started server, ready, until the block ends; always stopped."""
    server = start_server(model, *flags, log=log, env=env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()
