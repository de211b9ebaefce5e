"""The train loop shared by SFT and DPO: jitted steps -> metrics, Orbax checkpoints, resume.

A `Task` (train/sft.py, train/dpo.py) supplies the objective and the global batch of each step.
Everything a step depends on is a function of the step number (the data order is fixed by
seed + epoch), so a checkpoint needs params, optimizer state and the step, and a resumed run
logs the same metrics as one that never stopped. The final model is written as an Orbax
checkpoint folder (orbax_io) that load, generate and export accept.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from qwen2_jax.convert.output import atomic_folder, copy_model_files
from qwen2_jax.orbax_io import PARAMS_DIR, write_metadata
from qwen2_jax.train.step import TrainConfig, evaluate_step, optimizer, train_step

logger = logging.getLogger("qwen2_jax")


@dataclasses.dataclass
class TrainArgs:
    """The options every training command shares (the CLI flags of `sft` and `dpo`)."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    max_len: int = 2048
    overflow: str = "truncate"
    skip_bad_lines: bool = False
    batch_size: int = 8  # rows (SFT) or preference pairs (DPO) per micro-batch
    grad_accum: int = 1
    lr: float = 1e-5
    warmup: int = 0
    decay: str = "cosine"
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    epochs: int = 1
    steps: int | None = None
    save_every: int = 100
    keep: int = 3
    seed: int = 0
    resume: bool = False
    remat: str = "none"
    compute_dtype: str = "float32"
    progress: bool = True


@dataclasses.dataclass
class Task:
    """What the loop trains.

    objective: a train_step objective (see step.SFTObjective). batch(step): the global batch
    [grad_accum, ...] of that step (step 0 is the first), as device arrays; it must depend on
    the step alone. eval_batches(): the eval set's batches, or None. bar: metric name -> short
    label shown in the progress bar besides the loss.
    """

    name: str
    objective: Hashable
    steps_per_epoch: int
    batch: Callable[[int], dict]
    eval_batches: Callable[[], list[dict]] | None = None
    bar: dict[str, str] = dataclasses.field(default_factory=dict)
    summary: dict = dataclasses.field(default_factory=dict)


def read_data(args: TrainArgs, read: Callable[[str], tuple[list, Any]]) -> tuple[list, Any, list]:
    """(training items, their stats, eval items) via read(path) -> (items, stats dataclass);
    no usable training item is an error, and the stats go to the log."""
    items, stats = read(args.data)
    if not items:
        raise ValueError(f"{args.data}: nothing usable to train on ({dataclasses.asdict(stats)})")
    logger.info("data: %s", json.dumps(dataclasses.asdict(stats)))
    return items, stats, read(args.eval_data)[0] if args.eval_data else []


def fit(args: TrainArgs, task: Task, config, params) -> dict:
    """Trains params (float32 masters, placed as loaded); returns a summary. Writes
    OUT/metrics.jsonl, OUT/checkpoints/<step>/ and the final model as OUT/final."""
    total = args.steps or args.epochs * task.steps_per_epoch
    train = TrainConfig(args.lr, args.warmup, total, args.decay, args.weight_decay,
                        args.clip_norm, args.grad_accum, args.remat)
    opt_state = optimizer(train).init(params)
    os.makedirs(args.out, exist_ok=True)
    checkpoints = ocp.CheckpointManager(
        os.path.abspath(os.path.join(args.out, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True,
                                             enable_async_checkpointing=True))
    step = 0
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    if args.resume and checkpoints.latest_step() is not None:
        step = checkpoints.latest_step()
        abstract = {"params": jax.tree.map(ocp.utils.to_shape_dtype_struct, params),
                    "opt_state": jax.tree.map(ocp.utils.to_shape_dtype_struct, opt_state)}
        restored = checkpoints.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract["params"]),
            opt_state=ocp.args.StandardRestore(abstract["opt_state"])))
        params, opt_state = restored["params"], restored["opt_state"]
        _truncate_metrics(metrics_path, step)
        logger.info("resumed from step %d", step)
    elif checkpoints.latest_step() is not None:
        raise ValueError(f"{args.out} already has checkpoints (step {checkpoints.latest_step()}); "
                         "pass --resume to continue, or choose another --out")
    elif os.path.exists(metrics_path):
        os.remove(metrics_path)

    bar = tqdm(total=total, initial=step, desc=task.name, disable=not args.progress,
               dynamic_ncols=True)
    with open(metrics_path, "a", encoding="utf-8") as log:
        while step < total:
            batch = task.batch(step)
            start = time.perf_counter()
            params, opt_state, m = train_step(task.objective, train, params, opt_state, batch,
                                              jnp.int32(step))
            record = {"step": step + 1, **{k: float(v) for k, v in m.items()}}  # waits
            record["tokens_per_s"] = float((batch["segment_ids"] > 0).sum()) / (
                time.perf_counter() - start)
            step += 1
            if step % args.save_every == 0 or step == total:
                checkpoints.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state)))
                if task.eval_batches:
                    record |= _evaluate(task, params)
            log.write(json.dumps(record) + "\n")
            log.flush()
            shown = {"loss": f"{record['loss']:.4f}"}
            shown |= {label: f"{record[k]:.3g}" for k, label in task.bar.items()}
            bar.set_postfix(shown | {"lr": f"{record['lr']:.2e}",
                                     "tok_s": f"{record['tokens_per_s']:.0f}"}, refresh=False)
            bar.update(1)
    bar.close()
    checkpoints.wait_until_finished()
    checkpoints.close()
    final = os.path.join(args.out, "final")
    _write_final(args, task.name, params, final)
    return {"steps": total, "final": final, **task.summary, "metrics": metrics_path}


def _evaluate(task: Task, params) -> dict[str, float]:
    """The objective's metrics over the whole eval set, as `eval_<name>` (TRL's names)."""
    weights, sums = [], {}
    for batch in task.eval_batches():
        weight, metrics = evaluate_step(task.objective, params, batch)
        weights.append(float(weight))
        for k, v in metrics.items():
            sums.setdefault(k, []).append(float(v))
    return {f"eval_{k}": float(np.dot(weights, v) / sum(weights)) for k, v in sums.items()}


def _truncate_metrics(path: str, step: int) -> None:
    """Drops the lines of steps after `step` (logged by a run killed before saving them)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _write_final(args: TrainArgs, name: str, params, final: str) -> None:
    """The trained model as an Orbax checkpoint folder (qwen2_jax.load reads it)."""
    with atomic_folder(final, force=True) as temp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.abspath(os.path.join(temp, PARAMS_DIR)), params)
        shutil.copyfile(os.path.join(args.model, "config.json"), os.path.join(temp, "config.json"))
        copy_model_files(args.model, temp)
        write_metadata(temp, dtype="float32", source=os.path.abspath(args.model),
                       trained_by=f"qwen2-jax {name}")
