"""Training batches as global arrays, each process building and placing only its own rows.

A global batch is [k, B, ...] (k micro-batches of B rows) with its rows split over the mesh's
batch axes. In a multi-process job every process holds some devices; a `Feeder` tells a task
which rows of each micro-batch those devices hold (`rows`), and the task builds just them, so
no host ever tokenizes, reads or copies another's share. `place` joins the processes' parts
into one global array per field (`jax.make_array_from_process_local_data`). On one process
`rows` is every row, and without a mesh `place` only moves the arrays to the device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.sharding import DEFAULT_RULES, named_sharding, shard_input


def _axes(ndim: int) -> tuple:
    """Logical axes of a batch field [k, B, ...]: only the rows are split."""
    return (None, "batch") + (None,) * (ndim - 2)


class Feeder:
    """Where this process's rows of a [k, batch_size, ...] global batch lie, and their placing.

    mesh None: one process, one device. Otherwise the rows follow the mesh's batch rule (as
    the model's activations do), and a field whose row count the batch axes do not divide is
    replicated, as `logical_spec` decides for any array.
    """

    def __init__(self, batch_size: int, mesh=None, rules=DEFAULT_RULES):
        self.batch_size, self.mesh, self.rules = batch_size, mesh, rules
        self.rows = slice(0, batch_size)
        self._keys = None
        if mesh is not None:
            sharding = named_sharding(_axes(3), (1, batch_size, 1), mesh, rules)
            held = [index[1] for index in
                    sharding.addressable_devices_indices_map((1, batch_size, 1)).values()]
            start = min(s.start or 0 for s in held)
            stop = max(batch_size if s.stop is None else s.stop for s in held)
            self.rows = slice(start, stop)

    @property
    def local_rows(self) -> int:
        return self.rows.stop - self.rows.start

    def place(self, local: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays [k, batch_size, ...] from this process's rows [k, local_rows, ...]."""
        if self.mesh is None:
            return {name: jnp.asarray(x) for name, x in local.items()}
        placed = {}
        for name, x in local.items():
            x = np.asarray(x)
            if x.shape[1] != self.local_rows:
                raise ValueError(f"batch field {name!r}: {x.shape[1]} rows, expected this "
                                 f"process's {self.local_rows} (rows {self.rows.start} to "
                                 f"{self.rows.stop - 1} of {self.batch_size})")
            shape = (x.shape[0], self.batch_size, *x.shape[2:])
            sharding = named_sharding(_axes(x.ndim), shape, self.mesh, self.rules)
            placed[name] = jax.make_array_from_process_local_data(sharding, x, shape)
        return placed

    def place_whole(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Global arrays from the whole batch [k, rows, ...], which every process holds; each
        copies only its devices' slices to them (for batches whose fields have different row
        counts, as DPO's chosen and rejected rows beside their pairs)."""
        if self.mesh is None:
            return {name: jnp.asarray(x) for name, x in batch.items()}
        return {name: shard_input(x, self.mesh, _axes(np.ndim(x)), self.rules)
                for name, x in batch.items()}

    def step_keys(self, seed: int, step: int, count: int) -> jax.Array:
        """`count` random keys of a step, a function of seed and step alone (LoRA dropout's),
        made on every device of the mesh so that they enter the step beside global arrays."""
        if self._keys is None:
            out = None if self.mesh is None else named_sharding((), (), self.mesh, self.rules)
            self._keys = jax.jit(_step_keys, static_argnums=(0, 2), out_shardings=out)
        return self._keys(seed, jnp.int32(step), count)


def _step_keys(seed: int, step, count: int) -> jax.Array:
    return jax.random.split(jax.random.fold_in(jax.random.key(seed), step), count)  # [count]
