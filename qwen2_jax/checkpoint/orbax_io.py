"""Our Orbax checkpoint folder: writing parameters chunk by chunk, restoring them into a mesh.

A folder written by `qwen2-jax convert` (or training) holds:

    params/          an Orbax PyTree checkpoint of the parameter pytree (paths as in model.py)
    config.json      the Hugging Face config, as the source had it
    qwen2_jax.json   {"format": "qwen2-jax", "format_version", "dtype", "source", ...}
    tokenizer files  as they came with the source model

`qwen2_jax.json` is written last, so a folder without it is incomplete and `load` refuses it.

Orbax's own save needs every array in memory at once. `save_streamed` instead hands Orbax
`StreamedArray` leaves: a type handler writes them through TensorStore one chunk at a time,
each chunk read from the source just before, so memory holds a few chunks, not the model. The
files are what Orbax writes for a jax.Array (same _METADATA, OCDBT and zarr layout), so any
Orbax restore reads them.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import threading
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts
from etils import epath
from orbax.checkpoint import future as ocp_future

PARAMS_DIR = "params"
METADATA_FILE = "qwen2_jax.json"
FORMAT = "qwen2-jax"
FORMAT_VERSION = 1
CHUNK_BYTES = 4 * 2**20  # largest zarr chunk; restores read whole chunks
WRITES_IN_FLIGHT = 16  # chunks being written at once: memory is about this many chunks

Index = tuple[slice, ...]

# Set to stop every streamed write at its next chunk (an interrupted convert).
STOP = threading.Event()
_writers = threading.Condition()
_active_writers = 0


class OrbaxCheckpointError(ValueError):
    """An Orbax checkpoint folder that is incomplete or disagrees with its config."""


@dataclasses.dataclass(frozen=True, eq=False)
class StreamedArray:
    """A leaf Orbax saves without it ever being in memory whole.

    blocks: write_shape regions tiling the array (`blocks_of`); read(index, out) fills `out`
    with the array's values at a region; written(index, nbytes) is told after each chunk lands.
    """

    shape: tuple[int, ...]
    dtype: np.dtype
    write_shape: tuple[int, ...]
    blocks: list[Index]
    read: Callable[[Index, np.ndarray], None]
    written: Callable[[Index, int], None]


def _chunks(block: Index, chunk_shape: tuple[int, ...]) -> list[Index]:
    """The zarr chunks that tile `block` (which is aligned to them)."""
    starts = [range(s.start, s.stop, c) for s, c in zip(block, chunk_shape, strict=True)]
    return [tuple(slice(a, min(a + c, s.stop)) for a, c, s in zip(start, chunk_shape, block,
                                                                   strict=True))
            for start in itertools.product(*starts)]


class _StreamedArrayHandler(ocp.type_handlers.ArrayHandler):
    """Writes StreamedArray leaves with the TensorStore spec Orbax uses for jax.Array."""

    def __init__(self):
        super().__init__(enable_write_sharding_file=False)

    async def serialize(self, values, infos, args=None):
        async def write_all():
            with _writing():
                await _write(values, infos)

        return [ocp_future.CommitFutureAwaitingContractedSignals(write_all(), name="streamed")]


async def _write(values: list[StreamedArray], infos) -> None:
    """Fills and writes each chunk in turn, WRITES_IN_FLIGHT at a time, into buffers reused
    from chunk to chunk (fresh memory costs page faults, the bulk of a naive copy's time)."""
    pending: collections.deque = collections.deque()  # (write, buffer, value, chunk, nbytes)
    free: list[np.ndarray] = []

    async def land_oldest():
        write, buffer, value, chunk, nbytes = pending.popleft()
        await write
        free.append(buffer)
        value.written(chunk, nbytes)

    try:
        for value, info in zip(values, infos, strict=True):
            await info.await_path_creation()
            spec = ocp.type_handlers.get_json_tspec_write(
                info, use_ocdbt=info.is_ocdbt_checkpoint, global_shape=value.shape,
                local_shape=value.write_shape, dtype=value.dtype,
                process_index=jax.process_index() if info.is_ocdbt_checkpoint else None,
                arg=ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES))
            _no_sync(spec)
            store = await ts.open(spec, create=True, open=True, context=info.ts_context)
            chunk_shape = tuple(store.chunk_layout.write_chunk.shape)
            for block in value.blocks:
                for chunk in _chunks(block, chunk_shape):
                    if STOP.is_set():
                        raise KeyboardInterrupt("streamed write stopped")
                    if len(pending) >= WRITES_IN_FLIGHT:
                        await land_oldest()
                    shape = tuple(s.stop - s.start for s in chunk)
                    nbytes = math.prod(shape) * value.dtype.itemsize
                    buffer = free.pop() if free else np.empty(CHUNK_BYTES, np.uint8)
                    if buffer.nbytes < nbytes:  # a chunk the chooser could not split enough
                        buffer = np.empty(nbytes, np.uint8)
                    data = buffer[:nbytes].view(value.dtype).reshape(shape)
                    value.read(chunk, data)
                    pending.append((store[chunk].write(data), buffer, value, chunk, nbytes))
        while pending:
            await land_oldest()
    finally:  # on an error, let the writes in flight end before anyone removes the folder
        for write, *_ in pending:
            with contextlib.suppress(Exception):  # the first error is the one raised
                await write


def _no_sync(spec: dict) -> None:
    """Turns off TensorStore's fsync after every file it writes (`sync_tree` makes the whole
    folder durable once at the end, which lets the kernel write it back in large batches)."""
    if isinstance(spec, dict):
        if spec.get("driver") == "file":
            spec["file_io_sync"] = False
        for value in spec.values():
            _no_sync(value)


@contextlib.contextmanager
def _writing():
    global _active_writers
    with _writers:
        _active_writers += 1
    try:
        yield
    finally:
        with _writers:
            _active_writers -= 1
            _writers.notify_all()


def stop_writers(timeout: float = 60.0) -> None:
    """Stops every streamed write at its next chunk and waits until none is running, so the
    folder they write into can be removed without a write recreating part of it."""
    STOP.set()
    with _writers:
        _writers.wait_for(lambda: _active_writers == 0, timeout)


def save_streamed(directory: str, tree: dict) -> None:
    """Writes `tree` (nested dicts of StreamedArray) as an Orbax PyTree checkpoint at
    `directory` (which must not exist), from one process."""
    registry = ocp.type_handlers.create_type_handler_registry(
        (jax.Array, ocp.type_handlers.ArrayHandler()),
        (StreamedArray, _StreamedArrayHandler()),
    )
    # Random-looking weights barely compress; compressing would cost most of the throughput.
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    try:
        with ocp.Checkpointer(handler) as checkpointer:
            checkpointer.save(os.path.abspath(directory), args=ocp.args.PyTreeSave(tree))
    except Exception as e:
        os_error = _os_error(e)
        if os_error is None:
            raise
        raise os_error from e


def _os_error(e: Exception) -> OSError | None:
    """The OSError behind a TensorStore write failure (a full disk, say), whose own message
    buries it under the whole TensorStore spec."""
    code = re.search(r"os_error_code='(\d+)'", str(e))
    if code is None:
        return None
    path = re.search(r'Failed writing: "([^"]+)"', str(e))
    return OSError(int(code.group(1)), os.strerror(int(code.group(1))),
                   path.group(1) if path else None)


def blocks_of(shape: tuple[int, ...], sharding, write_shape: tuple[int, ...]) -> list[Index]:
    """The write_shape blocks that tile each distinct shard of `shape` under `sharding` once
    (so chunks never straddle shards); sharding None: blocks tiling the whole array."""
    if sharding is None:
        shards = {tuple((0, n) for n in shape)}
    else:
        shards = {tuple(s.indices(n)[:2] for s, n in zip(index, shape, strict=True))
                  for index in sharding.devices_indices_map(shape).values()}
    blocks = []
    for bounds in sorted(shards):
        starts = [range(a, b, w) for (a, b), w in zip(bounds, write_shape, strict=True)]
        blocks += [tuple(slice(a, a + w) for a, w in zip(start, write_shape, strict=True))
                   for start in itertools.product(*starts)]
    return blocks


# ----- reading ------------------------------------------------------------------------------


def is_orbax_folder(folder: str) -> bool:
    """Whether `folder` is (or was meant to be) one of our Orbax checkpoint folders."""
    return any(os.path.exists(os.path.join(folder, n)) for n in (METADATA_FILE, PARAMS_DIR))


def read_metadata(folder: str) -> dict:
    """The folder's qwen2_jax.json, checked; an error if the folder is incomplete."""
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.exists(path):
        raise OrbaxCheckpointError(
            f"{folder}: incomplete checkpoint: no {METADATA_FILE}, which is written last (an "
            "interrupted convert or save leaves such a folder; convert again)")
    try:
        with open(path, encoding="utf-8") as f:
            metadata = json.load(f)
    except json.JSONDecodeError as e:
        raise OrbaxCheckpointError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise OrbaxCheckpointError(f"{path}: expected a JSON object with \"format\": \"{FORMAT}\"")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise OrbaxCheckpointError(f"{path}: format_version {metadata.get('format_version')!r}; "
                                   f"this qwen2-jax reads version {FORMAT_VERSION}")
    if not os.path.isdir(os.path.join(folder, PARAMS_DIR)):
        raise OrbaxCheckpointError(f"{folder}: no {PARAMS_DIR}/ folder")
    return metadata


def write_metadata(folder: str, dtype: str, source: str, **extra) -> None:
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": dtype,
                "source": source, **extra}
    with open(os.path.join(folder, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata, f, indent=2)
        f.write("\n")


def _stored(folder: str) -> dict[tuple[str, ...], tuple[tuple[int, ...], np.dtype]]:
    """{path: (shape, dtype)} of every array in params/, from Orbax's metadata."""
    directory = os.path.abspath(os.path.join(folder, PARAMS_DIR))
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
            tree = checkpointer.metadata(directory).item_metadata.tree
    except (FileNotFoundError, ValueError) as e:
        raise OrbaxCheckpointError(f"{directory}: not a readable Orbax checkpoint ({e})") from e
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(k.key for k in path): (tuple(m.shape), np.dtype(m.dtype)) for path, m in flat}


def check_params(folder: str, expected: dict) -> None:
    """Raises OrbaxCheckpointError naming any missing, unexpected or misshapen parameter.

    expected: the abstract params (jax.ShapeDtypeStruct leaves) the config calls for.
    """
    stored = _stored(folder)
    want = {tuple(k.key for k in path): tuple(x.shape) for path, x in
            jax.tree_util.tree_flatten_with_path(expected)[0]}
    name = "/".join
    missing = sorted(name(p) for p in want if p not in stored)
    unexpected = sorted(name(p) for p in stored if p not in want)
    if missing or unexpected:
        raise OrbaxCheckpointError(f"{folder}/{PARAMS_DIR}: does not match config.json: "
                                   f"missing {missing or 'none'}; unexpected {unexpected or 'none'}")
    for path, shape in want.items():
        if stored[path][0] != shape:
            raise OrbaxCheckpointError(f"{folder}/{PARAMS_DIR}: {name(path)} has shape "
                                       f"{stored[path][0]}; config.json implies {shape}")


def restore_params(folder: str, abstract: dict) -> dict:
    """The params restored straight into `abstract`'s shardings and dtypes (a tree of
    jax.ShapeDtypeStruct): each process reads only the chunks its own shards cover."""
    check_params(folder, abstract)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(os.path.abspath(os.path.join(folder, PARAMS_DIR)), abstract)


def restore_one(folder: str, path: tuple[str, ...], abstract: jax.ShapeDtypeStruct) -> jax.Array:
    """The one parameter at `path`, restored alone (Orbax's partial restore) into `abstract`'s
    sharding and dtype: a quantizing load holds one float parameter at a time."""
    item: dict = {}
    node = item
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = abstract
    directory = os.path.abspath(os.path.join(folder, PARAMS_DIR))
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
        restored = checkpointer.restore(directory, args=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True))
    for key in path:
        restored = restored[key]
    return restored


def open_arrays(folder: str) -> dict[tuple[str, ...], ts.TensorStore]:
    """Each stored array opened for reading slices (TensorStore), by param path."""
    directory = os.path.abspath(os.path.join(folder, PARAMS_DIR))
    stored = _stored(folder)
    with open(os.path.join(directory, "_METADATA"), encoding="utf-8") as f:
        use_zarr3 = bool(json.load(f).get("use_zarr3", False))
    use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(epath.Path(directory))
    context = ocp.type_handlers.get_ts_context(use_ocdbt=use_ocdbt)
    opened = {}
    for path in stored:
        info = ocp.type_handlers.ParamInfo(name=".".join(path), parent_dir=epath.Path(directory),
                                           is_ocdbt_checkpoint=use_ocdbt, use_zarr3=use_zarr3,
                                           ts_context=context)
        spec = ocp.type_handlers.get_json_tspec_read(info, use_ocdbt=use_ocdbt)
        opened[path] = ts.open(spec, open=True, read=True, context=context).result()
    return opened
