"""The progress bar of convert and export: bytes written, and tensors completed."""

from __future__ import annotations

import threading

from tqdm import tqdm


class Progress:
    """A tqdm bar over bytes whose postfix counts finished tensors; safe from any thread."""

    def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
        self.total_tensors = total_tensors
        self.tensors = 0
        self._lock = threading.Lock()
        self._bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True,
                         unit_divisor=1024, disable=not enabled, dynamic_ncols=True)
        self._bar.set_postfix_str(self._postfix(), refresh=False)

    def _postfix(self) -> str:
        return f"tensors {self.tensors}/{self.total_tensors}"

    def advance(self, nbytes: int, tensors: int = 0) -> None:
        with self._lock:
            self.tensors += tensors
            if tensors:
                self._bar.set_postfix_str(self._postfix(), refresh=False)
            self._bar.update(nbytes)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self._bar.close()
