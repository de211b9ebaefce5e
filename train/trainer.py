"""The SFT loop: data -> jitted steps -> metrics, Orbax checkpoints, exact resume.

Everything a step depends on is a function of the step number: the data order (packed once
per epoch with seed + epoch) and the batch within it. A checkpoint therefore needs params,
optimizer state and the step; a resumed run logs the same losses as one that never stopped.
The final model is written as an Orbax checkpoint folder (orbax_io) that load, generate and
export accept.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

import qwen2_jax
from qwen2_jax.convert.output import atomic_folder, copy_model_files
from qwen2_jax.orbax_io import PARAMS_DIR, write_metadata
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import load_examples, pack
from qwen2_jax.train.step import TrainConfig, optimizer, token_losses, train_step

logger = logging.getLogger("qwen2_jax")


@dataclasses.dataclass
class SFTArgs:
    model: str
    data: str
    out: str
    eval_data: str | None = None
    max_len: int = 2048
    overflow: str = "truncate"
    train_on_prompt: bool = False
    skip_bad_lines: bool = False
    batch_size: int = 8  # rows per micro-batch
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


def _batches(examples, args: SFTArgs, epoch: int) -> list[dict[str, np.ndarray]]:
    """The epoch's global batches [grad_accum, batch_size, max_len], the last one padded with
    empty rows (weight 0), in the order of the epoch's seed."""
    rows = pack(examples, args.max_len, args.seed + epoch)
    per_step = args.batch_size * args.grad_accum
    steps = math.ceil(len(rows["tokens"]) / per_step)
    out = []
    for s in range(steps):
        part = {k: v[s * per_step:(s + 1) * per_step] for k, v in rows.items()}
        missing = per_step - len(part["tokens"])
        part = {k: np.concatenate([v, np.zeros((missing, *v.shape[1:]), v.dtype)])
                for k, v in part.items()}
        out.append({k: v.reshape(args.grad_accum, args.batch_size, -1) for k, v in part.items()})
    return out


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"))
def _summed_loss(config, dtype, mesh, rules, params, batch):
    return token_losses(config, params, batch, dtype, "none", mesh, rules).sum()


def _eval_loss(config, params, examples, args: SFTArgs, dtype, mesh, rules) -> float:
    rows = pack(examples, args.max_len, 0)
    total, count = 0.0, 0.0
    for start in range(0, len(rows["tokens"]), args.batch_size):
        batch = {k: jnp.asarray(v[start:start + args.batch_size]) for k, v in rows.items()}
        total += float(_summed_loss(config, dtype, mesh, rules, params, batch))
        count += float(batch["weights"].sum())
    return total / max(count, 1.0)


def run(args: SFTArgs, mesh=None, rules=None) -> dict:
    """Trains; returns a summary. Writes OUT/metrics.jsonl, OUT/checkpoints/<step>/ and the
    final model as OUT/final (an Orbax checkpoint folder)."""
    tokenizer = Tokenizer(args.model)
    examples, stats = load_examples(args.data, tokenizer, args.max_len, args.overflow,
                                    args.train_on_prompt, args.skip_bad_lines)
    if not examples:
        raise ValueError(f"{args.data}: no usable examples ({dataclasses.asdict(stats)})")
    logger.info("data: %s", json.dumps(dataclasses.asdict(stats)))
    eval_examples = None
    if args.eval_data:
        eval_examples, _ = load_examples(args.eval_data, tokenizer, args.max_len, args.overflow,
                                         args.train_on_prompt, args.skip_bad_lines)
    config, params = qwen2_jax.load(args.model, dtype="float32", mesh=mesh, rules=rules)
    epoch_batches = {0: _batches(examples, args, 0)}  # only the current epoch is kept
    steps_per_epoch = len(epoch_batches[0])
    total = args.steps or args.epochs * steps_per_epoch
    train = TrainConfig(args.lr, args.warmup, total, args.decay, args.weight_decay,
                        args.clip_norm, args.grad_accum, args.remat)
    opt = optimizer(train)
    opt_state = opt.init(params)
    dtype = jnp.dtype(args.compute_dtype)
    rules = qwen2_jax.sharding.resolve_rules(rules)

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

    bar = tqdm(total=total, initial=step, desc="sft", disable=not args.progress,
               dynamic_ncols=True)
    with open(metrics_path, "a", encoding="utf-8") as log:
        while step < total:
            epoch, index = divmod(step, steps_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: _batches(examples, args, epoch)}
            batch = {k: jnp.asarray(v) for k, v in epoch_batches[epoch][index].items()}
            start = time.perf_counter()
            params, opt_state, m = train_step(config, train, dtype, mesh, rules, params,
                                              opt_state, batch, jnp.int32(step))
            loss = float(m["loss"])  # waits for the step
            seconds = time.perf_counter() - start
            step += 1
            record = {"step": step, "loss": loss, "lr": float(m["lr"]),
                      "grad_norm": float(m["grad_norm"]),
                      "tokens_per_s": float((batch["segment_ids"] > 0).sum()) / seconds}
            if step % args.save_every == 0 or step == total:
                checkpoints.save(step, args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state)))
                if eval_examples:
                    record["eval_loss"] = _eval_loss(config, params, eval_examples, args, dtype,
                                                     mesh, rules)
            log.write(json.dumps(record) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{record['lr']:.2e}",
                            tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            bar.update(1)
    bar.close()
    checkpoints.wait_until_finished()
    checkpoints.close()
    final = os.path.join(args.out, "final")
    _write_final(args, config, params, final)
    return {"steps": total, "final": final, "data": dataclasses.asdict(stats),
            "metrics": metrics_path}


def _truncate_metrics(path: str, step: int) -> None:
    """Drops the lines of steps after `step` (logged by a run killed before saving them)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(kept)


def _write_final(args: SFTArgs, config, params, final: str) -> None:
    """The trained model as an Orbax checkpoint folder (qwen2_jax.load reads it)."""
    with atomic_folder(final, force=True) as temp:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(os.path.abspath(os.path.join(temp, PARAMS_DIR)), params)
        shutil.copyfile(os.path.join(args.model, "config.json"), os.path.join(temp, "config.json"))
        copy_model_files(args.model, temp)
        write_metadata(temp, dtype="float32", source=os.path.abspath(args.model),
                       trained_by="qwen2-jax sft")
