"""Loading a Qwen2-0.5B-shaped random bfloat16 checkpoint: qwen2-jax vs transformers.

transformers writes the checkpoint (one ~1 GB safetensors file) once; each load then runs in a
fresh Python process, so peak RSS is that loader's alone: the figure is the process's resident
high-water mark (VmHWM) after the load minus its resident memory just before it (after imports
and backend start-up). Both load into bfloat16, the checkpoint's dtype.

transformers' from_pretrained maps the file lazily: it returns before reading the weights, which
are read from disk when first used. So it is timed twice: as it returns ("lazy"), and until each
weight has been read once ("loaded", a sum over every parameter), which is what qwen2-jax's
load (weights in device memory) compares with; `ratio` is loaded transformers time / ours.
Each loader runs --repeats times, alternating; the median is reported. Prints one JSON line.

    .venv/bin/python bench/load.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status (VmRSS, VmHWM), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(loader: str, folder: str) -> None:
    """Runs one load in this process; prints {"seconds", "peak_extra_mb"} (and for
    transformers "lazy_seconds", until from_pretrained returned)."""
    result = {}
    if loader == "qwen2_jax":
        import jax

        import qwen2_jax

        jax.devices()  # backend start-up is not part of the load
        before, start = status_mb("VmRSS"), time.perf_counter()
        _, params = qwen2_jax.load(folder, dtype="bfloat16")
        jax.block_until_ready(params)
    else:
        import torch
        from transformers import Qwen2ForCausalLM

        before, start = status_mb("VmRSS"), time.perf_counter()
        model = Qwen2ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
        result["lazy_seconds"] = time.perf_counter() - start
        with torch.no_grad():
            sum(float(p.float().sum()) for p in model.parameters())
    result["seconds"] = time.perf_counter() - start
    result["peak_extra_mb"] = status_mb("VmHWM") - before
    print(json.dumps(result))


def measure(loader: str, folder: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", loader, folder], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def write_checkpoint(folder: str) -> None:
    import torch
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM

    import qwen2_jax

    torch.manual_seed(0)
    config = HFQwen2Config.from_dict(qwen2_jax.PRESETS["Qwen2-0.5B"].to_hf())
    Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="loads per loader (median)")
    parser.add_argument("--child", nargs=2, metavar=("LOADER", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--write", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.write:
        write_checkpoint(args.write)
        return

    with tempfile.TemporaryDirectory() as folder:
        # In its own process, so this one stays small (a child inherits nothing but the file).
        subprocess.run([sys.executable, __file__, "--write", folder], check=True)
        size = sum(os.path.getsize(os.path.join(folder, n)) for n in os.listdir(folder)
                   if n.endswith(".safetensors"))
        runs: dict[str, list[dict]] = {"qwen2_jax": [], "transformers": []}
        for _ in range(args.repeats):
            for loader, results in runs.items():
                results.append(measure(loader, folder))

    def median(loader: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[loader])

    ours_s, ref_s = median("qwen2_jax", "seconds"), median("transformers", "seconds")
    print(json.dumps({
        "bench": "load", "shape": "Qwen2-0.5B", "checkpoint_dtype": "bfloat16",
        "checkpoint_mb": round(size / 2**20, 1), "repeats": args.repeats,
        "qwen2_jax_load_s": round(ours_s, 3), "transformers_load_s": round(ref_s, 3),
        "ratio": round(ref_s / ours_s, 3),
        "transformers_lazy_load_s": round(median("transformers", "lazy_seconds"), 3),
        "qwen2_jax_peak_extra_rss_mb": round(median("qwen2_jax", "peak_extra_mb"), 1),
        "transformers_peak_extra_rss_mb": round(median("transformers", "peak_extra_mb"), 1),
    }))


if __name__ == "__main__":
    main()
