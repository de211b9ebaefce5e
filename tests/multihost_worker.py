"""One process of the 2-process test job (tests/test_multihost.py); not collected by pytest.

argv: coordinator port, process id, process count, HF model folder, mesh spec, output folder.
Loads the checkpoint (HF or Orbax) sharded over the global mesh, runs a ragged batch, gathers the
logits and writes them with the number of parameter bytes this process read.
"""

from __future__ import annotations

import json
import os
import sys

import jax


def read_bytes() -> int:
    """Bytes this process has read through read() calls so far (/proc/self/io rchar)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))


def main(port: str, process_id: str, processes: str, folder: str, spec: str, out: str) -> None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                               num_processes=int(processes), process_id=int(process_id))
    import numpy as np
    from jax.experimental import multihost_utils

    import qwen2_jax
    from qwen2_jax.api import param_shardings
    from qwen2_jax.checkpoint.hf_io import HFCheckpoint, read_hf_config, read_hf_params
    from qwen2_jax.sharding import make_mesh

    mesh = make_mesh(spec)
    if os.path.exists(os.path.join(folder, "qwen2_jax.json")):  # Orbax: count read() bytes
        qwen2_jax.load(folder, mesh=mesh)  # once first, so lazy imports are not counted
        before = read_bytes()
        config, params = qwen2_jax.load(folder, mesh=mesh)
        bytes_read = read_bytes() - before
    else:
        config = read_hf_config(folder)
        params, bytes_read = read_hf_params(HFCheckpoint(folder, config), np.dtype(np.float32),
                                            param_shardings(config, mesh))
    ids = np.load(f"{out}/ids.npy")
    mask = np.load(f"{out}/mask.npy")
    logits = qwen2_jax.forward(config, params, ids, mask)
    gathered = multihost_utils.process_allgather(logits, tiled=True)
    held = sum(s.data.nbytes for x in jax.tree.leaves(params) for s in x.addressable_shards)
    np.save(f"{out}/logits{process_id}.npy", gathered)
    with open(f"{out}/stats{process_id}.json", "w") as f:
        json.dump({"bytes_read": bytes_read, "local_devices": jax.local_device_count(),
                   "global_devices": jax.device_count(), "bytes_on_devices": held}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
