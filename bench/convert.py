"""Converting a Qwen2-0.5B-shaped random bfloat16 checkpoint: qwen2-jax vs transformers.

transformers writes the checkpoint (one ~1 GB safetensors file) once. Then, each in a fresh
Python process so that peak RSS is that job's alone:

- qwen2-jax convert: HF safetensors -> Orbax (`qwen2_jax.checkpoint.to_orbax.write_orbax`);
- qwen2-jax export: that Orbax folder -> HF safetensors (`...orbax_to_hf.export`);
- transformers: `from_pretrained` + `save_pretrained` of the same folder (its round trip
  through memory, HF -> HF), in bfloat16; timed as it returns, and again after flushing its
  files to disk ("synced"), which qwen2-jax does before it renames its output into place.

Throughput is checkpoint bytes / wall seconds. Peak extra RSS is the process's resident
high-water mark (VmHWM) minus its resident memory just before the job (after imports).
Targets (issue 5): peak extra RSS <= 0.5 x checkpoint bytes; convert throughput >= the
transformers round trip's. Each job runs --repeats times, alternating; medians are reported.
Prints one JSON line.

--gguf: the embedded real model's GGUF file (Qwen2.5-Coder-0.5B-Instruct, Q4_K_M, the model
extra) -> our float32 Orbax folder, against transformers' `from_pretrained(gguf_file=...)`
plus writing its state dict as safetensors (its save_pretrained refuses GGUF-loaded models).
Targets (issue 16): >= 2x faster than transformers, peak extra RSS <= 0.5 x the float32 model.

    .venv/bin/python bench/convert.py [--repeats 3] [--gguf]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from load import status_mb

JOBS = ("convert", "export", "transformers")


def child(job: str, source: str, out: str) -> None:
    """Runs one job in this process; prints {"seconds", "peak_extra_mb"}."""
    if job == "transformers_gguf":
        import torch
        from safetensors.torch import save_file
        from transformers import AutoModelForCausalLM

        from qwen2_jax.checkpoint.output import sync_tree

        before, start = status_mb("VmRSS"), time.perf_counter()
        directory, name = os.path.split(source)
        model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                     dtype=torch.float32)
        os.makedirs(out)
        model.config.save_pretrained(out)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  os.path.join(out, "model.safetensors"))
        sync_tree(out)
        print(json.dumps({"seconds": time.perf_counter() - start,
                          "peak_extra_mb": status_mb("VmHWM") - before}))
        return
    if job == "transformers":
        import torch
        from transformers import Qwen2ForCausalLM

        from qwen2_jax.checkpoint.output import sync_tree

        before, start = status_mb("VmRSS"), time.perf_counter()
        model = Qwen2ForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
        model.save_pretrained(out)
        seconds = time.perf_counter() - start
        sync_tree(out)  # what qwen2-jax does before publishing its output
        print(json.dumps({"seconds": seconds, "synced_seconds": time.perf_counter() - start,
                          "peak_extra_mb": status_mb("VmHWM") - before}))
        return
    else:
        import jax

        from qwen2_jax.checkpoint.to_orbax import write_orbax as convert
        from qwen2_jax.convert.orbax_to_hf import export

        jax.devices()  # backend start-up is not part of the job
        before, start = status_mb("VmRSS"), time.perf_counter()
        (convert if job == "convert" else export)(source, out, progress=False)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "peak_extra_mb": status_mb("VmHWM") - before}))


def measure(job: str, source: str, out: str) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no job pays for the previous one's dirty pages being flushed
    done = subprocess.run([sys.executable, __file__, "--child", job, source, out], check=True,
                          capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="runs per job (median)")
    parser.add_argument("--child", nargs=3, metavar=("JOB", "SOURCE", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--gguf", action="store_true",
                        help="the embedded model's GGUF file instead (needs the model extra)")
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.gguf:
        gguf_bench(args.repeats)
        return

    with tempfile.TemporaryDirectory() as root:
        hf, orbax = os.path.join(root, "hf"), os.path.join(root, "orbax")
        subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "load.py"),
                        "--write", hf], check=True)
        size = sum(os.path.getsize(os.path.join(hf, n)) for n in os.listdir(hf)
                   if n.endswith(".safetensors"))
        runs: dict[str, list[dict]] = {job: [] for job in JOBS}
        for _ in range(args.repeats):
            runs["convert"].append(measure("convert", hf, orbax))
            runs["export"].append(measure("export", orbax, os.path.join(root, "exported")))
            runs["transformers"].append(measure("transformers", hf, os.path.join(root, "saved")))

    def median(job: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[job])

    mb = size / 2**20
    report = {"bench": "convert", "shape": "Qwen2-0.5B", "checkpoint_dtype": "bfloat16",
              "checkpoint_mb": round(mb, 1), "repeats": args.repeats}
    for job in JOBS:
        name = "transformers_roundtrip" if job == "transformers" else f"qwen2_jax_{job}"
        report[f"{name}_s"] = round(median(job, "seconds"), 3)
        report[f"{name}_mb_per_s"] = round(mb / median(job, "seconds"), 1)
        report[f"{name}_peak_extra_rss_mb"] = round(median(job, "peak_extra_mb"), 1)
    report["transformers_roundtrip_synced_s"] = round(median("transformers", "synced_seconds"), 3)
    report["convert_throughput_ratio"] = round(
        median("transformers", "seconds") / median("convert", "seconds"), 3)
    report["convert_throughput_ratio_vs_synced"] = round(
        median("transformers", "synced_seconds") / median("convert", "seconds"), 3)
    report["convert_peak_rss_fraction"] = round(median("convert", "peak_extra_mb") / mb, 3)
    report["export_peak_rss_fraction"] = round(median("export", "peak_extra_mb") / mb, 3)
    print(json.dumps(report))


def gguf_bench(repeats: int) -> None:
    """The embedded model's GGUF file -> float32: our convert against transformers'."""
    from qwen2_jax import embedded

    source = embedded.gguf_path()
    runs: dict[str, list[dict]] = {"convert": [], "transformers_gguf": []}
    with tempfile.TemporaryDirectory() as root:
        for _ in range(repeats):
            for job in runs:
                runs[job].append(measure(job, source, os.path.join(root, job)))
        float32_mb = os.path.getsize(os.path.join(root, "transformers_gguf",
                                                  "model.safetensors")) / 2**20

    def median(job: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[job])

    ours, theirs = median("convert", "seconds"), median("transformers_gguf", "seconds")
    print(json.dumps({
        "bench": "convert_gguf", "model": embedded.NAME, "gguf_mb": round(embedded.SIZE / 2**20, 1),
        "float32_mb": round(float32_mb, 1), "repeats": repeats,
        "qwen2_jax_convert_s": round(ours, 2), "transformers_s": round(theirs, 2),
        "speedup": round(theirs / ours, 2),
        "qwen2_jax_peak_extra_rss_mb": round(median("convert", "peak_extra_mb"), 1),
        "transformers_peak_extra_rss_mb": round(median("transformers_gguf", "peak_extra_mb"), 1),
        "qwen2_jax_peak_rss_fraction_of_float32": round(
            median("convert", "peak_extra_mb") / float32_mb, 3)}))


if __name__ == "__main__":
    main()
