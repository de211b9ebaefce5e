"""Reading slices of tensors from a .safetensors file, touching only the bytes a slice needs.

The format: an 8-byte little-endian header size, a JSON header mapping each tensor name to
{dtype, shape, data_offsets}, then the data. Each read maps just the tensor's byte range, and
the mapping goes when the caller drops the view, so a long load does not accumulate the whole
file as resident memory (as keeping one mapping of the file open would). The header is checked
against the file's size first, so a truncated or corrupt file is an error, not garbage.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 2**20


class SafetensorsFormatError(ValueError):
    """A file that is not a complete, well-formed safetensors file."""


class SafetensorsFile:
    """The header of one file; `read(name, index)` returns a view of a slice."""

    def __init__(self, path: str):
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise self._error(f"{self.size} bytes; too short for a safetensors header")
            (header_size,) = struct.unpack("<Q", prefix)
            if header_size > min(MAX_HEADER, self.size - 8):
                raise self._error(f"header size {header_size} exceeds the file's {self.size} "
                                  "bytes (truncated?)")
            try:
                header = json.loads(f.read(header_size))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise self._error(f"header is not valid JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._error("header is not a JSON object")
        self.metadata = header.pop("__metadata__", None) or {}
        self.data_start = 8 + header_size
        self.tensors: dict[str, tuple[np.dtype, tuple[int, ...], int]] = {}
        for name, entry in header.items():
            self.tensors[name] = self._check(name, entry)

    def _error(self, what: str) -> SafetensorsFormatError:
        return SafetensorsFormatError(f"{self.path}: not a valid safetensors file: {what}")

    def _check(self, name: str, entry) -> tuple[np.dtype, tuple[int, ...], int]:
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(n) for n in entry["shape"])
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._error(f"tensor {name}: malformed entry {entry!r} ({e!r})") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise self._error(f"tensor {name}: data_offsets {begin}..{end} do not hold "
                              f"{entry['dtype']} {list(shape)}")
        if self.data_start + end > self.size:
            raise self._error(f"tensor {name} ends at byte {self.data_start + end} but the "
                              f"file has {self.size} bytes (truncated?)")
        return dtype, shape, self.data_start + begin

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name][1]

    def read(self, name: str, index: tuple[slice, ...] = ()) -> np.ndarray:
        """`tensor[index]` (index: basic slices) as a read-only view of the file's bytes.

        Only the rows the leading slice covers are mapped. When whole rows are wanted the
        mapping is populated in one system call (faulting it in page by page is several times
        slower); a column slice is left to fault in only the pages it touches, so a process
        holding half the columns of wide rows reads about half the bytes. The mapping is
        released with the last view of it, so copy what you keep.
        """
        dtype, shape, offset = self.tensors[name]
        if not shape or math.prod(shape) == 0:
            return np.fromfile(self.path, dtype, math.prod(shape), offset=offset).reshape(
                shape)[index]
        first, last, step = (index[0] if index else slice(None)).indices(shape[0])
        if step != 1 or last <= first:
            raise ValueError(f"{name}: read needs a non-empty contiguous leading slice, got {index}")
        row = math.prod(shape[1:]) * dtype.itemsize
        begin, end = offset + first * row, offset + last * row
        start = begin - begin % mmap.ALLOCATIONGRANULARITY
        whole_rows = all(s.indices(n) == (0, n, 1) for s, n in
                         zip(index[1:], shape[1:], strict=False))
        flags = mmap.MAP_SHARED | (getattr(mmap, "MAP_POPULATE", 0) if whole_rows else 0)
        with open(self.path, "rb") as f:
            mapping = mmap.mmap(f.fileno(), end - start, flags=flags, prot=mmap.PROT_READ,
                                offset=start)
        rows = np.frombuffer(mapping, dtype, (last - first) * row // dtype.itemsize, begin - start)
        return rows.reshape(last - first, *shape[1:])[(slice(None), *index[1:])]


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def write_safetensors(path: str, tensors: list[tuple[str, np.dtype, tuple[int, ...], object]],
                      metadata: dict[str, str] | None = None) -> int:
    """Writes a safetensors file tensor by tensor, never holding more than one block.

    tensors: (name, dtype, shape, blocks) in file order, where blocks() yields arrays whose
    bytes, in order, are the tensor's (row blocks, or the whole tensor). Returns the file size.
    """
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, dtype, shape, _ in tensors:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # data starts 8-byte aligned, as the format asks
    try:
        _write(path, encoded, tensors)
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from e
    return 8 + len(encoded) + offset


def _write(path: str, encoded: bytes, tensors) -> None:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for name, dtype, shape, blocks in tensors:
            written = 0
            for block in blocks():
                block = np.ascontiguousarray(block, dtype)
                f.write(block.reshape(-1).view(np.uint8).data)
                written += block.nbytes
            expected = math.prod(shape) * np.dtype(dtype).itemsize
            if written != expected:
                raise AssertionError(f"{name}: wrote {written} bytes, header says {expected}")
