"""The train loop shared by SFT and DPO: jitted steps -> metrics, Orbax checkpoints, resume.

A `Task` (train/sft.py, train/dpo.py) supplies the objective and the global batch of each step.
Everything a step depends on is a function of the step number (the data order is fixed by
seed + epoch), so a checkpoint needs params, optimizer state and the step, and a resumed run
logs the same metrics as one that never stopped. The final model is written as an Orbax
checkpoint folder (orbax_io) that load, generate and export accept.

In a multi-process job every process runs this same loop on its share of each batch (see
train/feed.py). Checkpoints and the final weights are Orbax's collective saves, to which each
process writes the shards it holds; process 0 alone writes the files of OUT that are not
sharded (metrics.jsonl, run.json, the final folder's config), between barriers.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Hashable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import qwen2_jax
from qwen2_jax import lora
from qwen2_jax.api import place_adapters
from qwen2_jax.checkpoint.orbax_io import PARAMS_DIR, write_metadata
from qwen2_jax.checkpoint.output import (
    atomic_folder,
    check_replaceable,
    copy_model_files,
    is_model_folder,
)
from qwen2_jax.config import Qwen2Config
from qwen2_jax.decoding import position_limit
from qwen2_jax.model import REMAT_POLICIES
from qwen2_jax.sharding import mesh_of, to_host
from qwen2_jax.train.feed import Feeder
from qwen2_jax.train.step import TrainConfig, evaluate_step, optimizer, train_step

logger = logging.getLogger("qwen2_jax")

RUN_FILE = "run.json"  # the model and shape flags of OUT's run, checked by --resume
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "final", RUN_FILE)  # all a run writes in OUT
# a checkpoint's batches and trees depend on them
RESUME_FLAGS = ("max_len", "batch_size", "grad_accum", "lora_rank", "lora_alpha", "lora_targets",
                "rslora", "quantize")


class TrainingFailed(RuntimeError):
    """Training stopped on a non-finite loss or gradient norm."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says where to resume."""


@dataclasses.dataclass
class TrainArgs:
    """The options every training command shares (the CLI flags of `sft` and `dpo`)."""

    model: str
    data: str
    out: str
    eval_data: str | None = None
    max_len: int | None = None  # None: DEFAULT_MAX_LEN, capped at max_position_embeddings
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
    overwrite: bool = False
    allow_long: bool = False
    remat: str = "none"
    compute_dtype: str = "float32"
    lora_rank: int | None = None  # None: full fine-tune
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: str = ",".join(lora.TARGETS)
    rslora: bool = False
    quantize: str | None = None  # the frozen base's, with LoRA
    progress: bool = True

    def lora_config(self) -> lora.LoRAConfig | None:
        """The LoRA settings, or None for a full fine-tune; bad values raise, naming the flag."""
        if self.lora_rank is None:
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())
        try:
            return lora.LoRAConfig(self.lora_rank, self.lora_alpha, self.lora_dropout, targets,
                                   self.rslora)
        except ValueError as e:
            flag = next((f for f in ("rank", "alpha", "dropout", "targets") if f in str(e)), "")
            raise ValueError(f"--lora-{flag}: {e}" if flag else str(e)) from None

    DEFAULT_MAX_LEN: ClassVar[int] = 2048


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
    feeder: Feeder = dataclasses.field(default_factory=lambda: Feeder(1))


def read_data(args: TrainArgs, read: Callable[[str], tuple[list, Any]]) -> tuple[list, Any, list]:
    """(training items, their stats, eval items) via read(path) -> (items, stats dataclass);
    no usable training item is an error, and the stats go to the log."""
    items, stats = read(args.data)
    if not items:
        raise ValueError(f"{args.data}: nothing usable to train on ({dataclasses.asdict(stats)})")
    logger.info("data: %s", json.dumps(dataclasses.asdict(stats)))
    return items, stats, read(args.eval_data)[0] if args.eval_data else []


def prepare(args: TrainArgs, command: str) -> Qwen2Config:
    """The model's config, after every check of the flags and OUT that needs no data or
    weights (check_args, check_output): a bad flag costs nothing and writes nothing."""
    config = Qwen2Config.from_file(args.model)
    check_args(args, config)
    check_output(args, command)
    return config


def load_trainable(args: TrainArgs, mesh=None, rules=None) -> tuple[Qwen2Config, dict, Any]:
    """(config, trainable params, frozen base or None). A full fine-tune trains float32
    params; LoRA trains new float32 adapters (`lora.init`, seeded by --seed) on a base kept in
    --compute-dtype, or int8 with --quantize."""
    settings = args.lora_config()
    if settings is None:
        config, params = qwen2_jax.load(args.model, dtype="float32", mesh=mesh, rules=rules)
        return config, params, None
    config, base = qwen2_jax.load(args.model, dtype=args.compute_dtype, mesh=mesh, rules=rules,
                                  quantize=args.quantize)
    adapters = place_adapters(config, settings, lora.init(config, settings,
                                                          jax.random.key(args.seed)),
                              mesh, rules)
    count = sum(x.size for x in jax.tree.leaves(adapters))
    logger.info("LoRA r=%d alpha=%g on %s: %d trainable parameters; the base (%s) is frozen",
                settings.rank, settings.alpha, ",".join(settings.targets), count,
                args.quantize or args.compute_dtype)
    return config, adapters, base


def check_args(args: TrainArgs, config: Qwen2Config) -> None:
    """Flag values, checked before anything is read or written; errors name the flag. Sets
    args.max_len when it is None (DEFAULT_MAX_LEN, capped at the model's
    max_position_embeddings)."""
    for name in ("batch_size", "grad_accum", "save_every", "keep", "epochs", "steps"):
        value = getattr(args, name)
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    for name, minimum in (("lr", 0.0), ("clip_norm", 0.0), ("weight_decay", None),
                          ("warmup", None)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (minimum is not None and value <= minimum):
            bound = "> 0" if minimum is not None else ">= 0"
            raise ValueError(f"--{name.replace('_', '-')} must be a number {bound}, got {value}")
    if args.lora_config() is None and args.quantize is not None:
        raise ValueError(f"--quantize {args.quantize} keeps the base frozen: it needs LoRA "
                         "(--lora-rank)")
    if args.lora_config() is not None and any(config.sparse_layers):
        raise ValueError("--lora-rank: LoRA supports the dense Qwen2 models, not qwen2_moe")
    if args.remat not in REMAT_POLICIES:
        raise ValueError(f"--remat {args.remat}: expected one of {', '.join(REMAT_POLICIES)}")
    limit = position_limit(config)
    if args.max_len is None:
        args.max_len = min(args.DEFAULT_MAX_LEN, limit)
    if args.max_len < 2:
        raise ValueError(f"--max-len must be >= 2 (a token and the one it predicts), got "
                         f"{args.max_len}")
    if args.max_len > limit:
        message = (f"--max-len {args.max_len} is past the model's max_position_embeddings "
                   f"{config.max_position_embeddings}"
                   + (f" ({limit} with YaRN)" if limit != config.max_position_embeddings else ""))
        if not args.allow_long:
            raise ValueError(f"{message}; lower it, or pass --allow-long to train anyway")
        logger.warning("%s: training anyway (--allow-long)", message)


def check_output(args: TrainArgs, command: str) -> None:
    """Refuses an OUT that holds a run unless --resume (of the same model and shape flags) or
    --overwrite, and a --resume with nothing to resume; before anything is written."""
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} exists and is not a folder")
    found = [name for name in RUN_OUTPUTS if os.path.lexists(os.path.join(args.out, name))]
    if args.resume:
        if _latest_checkpoint(args.out) is None:
            raise ValueError(f"--resume: {args.out} has no checkpoint to resume from; leave "
                             "out --resume to start a new run")
        run = _read_run(args.out)
        now = _run_record(args, command)
        for key in now:
            if key in run and run[key] != now[key]:
                flag = "--" + key.replace("_", "-") if key != "command" else "the command"
                raise ValueError(f"--resume: {args.out} holds a run with {flag} {run[key]}, "
                                 f"not {now[key]}; resume with the same, or choose another "
                                 "--out")
    final = os.path.join(args.out, "final")
    if (os.path.isdir(final) and os.listdir(final) and not is_model_folder(final)
            and not lora.is_adapter_folder(final)):
        raise ValueError(f"{final} is not a model folder; the run's final model would replace "
                         "it: move it away or choose another --out")
    if found and not (args.resume or args.overwrite):
        raise ValueError(f"--out {args.out} already holds a training run ({', '.join(found)}); "
                         "pass --resume to continue it, --overwrite to start afresh (removing "
                         "them), or choose another --out")


def _run_record(args: TrainArgs, command: str) -> dict:
    """What a checkpoint of this run depends on, kept in OUT/run.json for --resume."""
    return {"command": command, "model": os.path.realpath(args.model),
            **{name: getattr(args, name) for name in RESUME_FLAGS}}


def _read_run(out: str) -> dict:
    path = os.path.join(out, RUN_FILE)
    if not os.path.exists(path):  # a run from before run.json existed
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _latest_checkpoint(out: str) -> int | None:
    """The last complete checkpoint's step (Orbax renames a step folder into place when it is
    complete), or None."""
    folder = os.path.join(out, "checkpoints")
    steps = [int(n) for n in os.listdir(folder) if n.isdigit()] if os.path.isdir(folder) else []
    return max(steps, default=None)


def _remove_run(out: str) -> None:
    """Removes the files of a training run from OUT, and nothing else."""
    for name in RUN_OUTPUTS:
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def fit(args: TrainArgs, task: Task, config, params, frozen=None) -> dict:
    """Trains params (float32 masters, placed as loaded); returns a summary. Every process of
    a job calls it alike. Writes
    OUT/metrics.jsonl, OUT/checkpoints/<step>/, OUT/run.json and the final model as OUT/final.
    With LoRA (args.lora_rank), params are the adapters and frozen the base: checkpoints hold
    the adapters and their optimizer state only, and OUT/final is a PEFT adapter folder.

    A non-finite loss or grad norm raises TrainingFailed, and Ctrl-C TrainingInterrupted,
    after pending checkpoints are complete; no OUT/final is written then. A run that fails
    before its first checkpoint removes what it wrote (and OUT, if it made it).
    """
    total = args.steps or args.epochs * task.steps_per_epoch
    train = TrainConfig(args.lr, args.warmup, total, args.decay, args.weight_decay,
                        args.clip_norm, args.grad_accum, args.remat)
    opt_state = optimizer(train).init(params)
    made_out = not os.path.exists(args.out)
    _barrier("checked OUT")  # every process has looked at OUT before any changes it
    if args.overwrite and _first():
        _remove_run(args.out)
    os.makedirs(args.out, exist_ok=True)
    _barrier("prepared OUT")
    checkpoints = ocp.CheckpointManager(
        os.path.abspath(os.path.join(args.out, "checkpoints")),
        options=ocp.CheckpointManagerOptions(max_to_keep=args.keep, create=True,
                                             enable_async_checkpointing=True))
    step = 0
    metrics_path = os.path.join(args.out, "metrics.jsonl")
    try:
        if args.resume:
            step = checkpoints.latest_step()
            mesh = mesh_of(params)
            abstract = {"params": _restore_target(params, mesh),
                        "opt_state": _restore_target(opt_state, mesh)}
            restored = checkpoints.restore(step, args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract["params"]),
                opt_state=ocp.args.StandardRestore(abstract["opt_state"])))
            params, opt_state = restored["params"], restored["opt_state"]
            if _first():
                _truncate_metrics(metrics_path, step)
            logger.info("resumed from step %d", step)
        elif _first():
            with open(os.path.join(args.out, RUN_FILE), "w", encoding="utf-8") as f:
                json.dump(_run_record(args, task.name), f)
        params = _loop(args, task, train, params, opt_state, step, total, checkpoints,
                       metrics_path, frozen)
        checkpoints.wait_until_finished()
    except BaseException:
        checkpoints.wait_until_finished()  # the last good checkpoint stays whole
        if checkpoints.latest_step() is None and _first():
            _remove_run(args.out)
            if made_out and not os.listdir(args.out):
                os.rmdir(args.out)
        raise
    finally:
        checkpoints.close()
    final = os.path.join(args.out, "final")
    if args.lora_config() is not None:
        adapters = jax.tree.map(to_host, params)  # an all-gather: every process takes part
        if _first():
            lora.save_adapter(final, config, args.lora_config(), adapters,
                              os.path.abspath(args.model), force=True)
        _barrier("wrote the final adapter")
    else:
        write_params(final, params, args.model, force=True, trained_by=f"qwen2-jax {task.name}")
    return {"steps": total, "final": final, **task.summary, "metrics": metrics_path}


def _loop(args: TrainArgs, task: Task, train: TrainConfig, params, opt_state, step: int,
          total: int, checkpoints, metrics_path: str, frozen=None):
    """Steps from `step` to `total`, logging each and checkpointing; returns the params."""
    bar = tqdm(total=total, initial=step, desc=task.name, disable=not (args.progress and _first()),
               dynamic_ncols=True)
    # process 0 logs; the others write to nowhere
    with open(metrics_path if _first() else os.devnull, "a", encoding="utf-8") as log:
        try:
            while step < total:
                batch = task.batch(step)
                adapters = args.lora_config()
                if adapters is not None and adapters.dropout:  # a function of the step alone
                    batch["dropout_key"] = task.feeder.step_keys(args.seed, step,
                                                                 args.grad_accum)
                start = time.perf_counter()
                params, opt_state, m = train_step(task.objective, train, params, opt_state,
                                                  batch, jnp.int32(step), frozen)
                record = {"step": step + 1, **{k: float(v) for k, v in m.items()}}  # waits
                record["tokens_per_s"] = float(_token_count(batch["segment_ids"])) / (
                    time.perf_counter() - start)
                if not (math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])):
                    log.write(json.dumps(record) + "\n")
                    raise TrainingFailed(_non_finite(args, record, checkpoints))
                step += 1
                if step % args.save_every == 0 or step == total:
                    checkpoints.save(step, args=ocp.args.Composite(
                        params=ocp.args.StandardSave(params),
                        opt_state=ocp.args.StandardSave(opt_state)))
                    if task.eval_batches:
                        record |= _evaluate(task, params, frozen)
                log.write(json.dumps(record) + "\n")
                log.flush()
                shown = {"loss": f"{record['loss']:.4f}"}
                shown |= {label: f"{record[k]:.3g}" for k, label in task.bar.items()}
                bar.set_postfix(shown | {"lr": f"{record['lr']:.2e}",
                                         "tok_s": f"{record['tokens_per_s']:.0f}"},
                                refresh=False)
                bar.update(1)
        except KeyboardInterrupt:
            bar.close()
            checkpoints.wait_until_finished()
            latest = checkpoints.latest_step()
            if latest is None:
                raise TrainingInterrupted(
                    f"interrupted at step {step}, before the first checkpoint (--save-every "
                    f"{args.save_every}); nothing to resume") from None
            raise TrainingInterrupted(f"interrupted at step {step}; resume with --resume (from "
                                      f"the checkpoint of step {latest})") from None
    bar.close()
    return params


def _restore_target(tree, mesh) -> Any:
    """What Orbax restores tree as: each array's shape, dtype and sharding, except that an
    array on one device (the optimizer's step counts, which a fresh jit may move) comes back
    replicated over `mesh` (the params'), as a step of a multi-process job needs."""

    def one(x):
        struct = ocp.utils.to_shape_dtype_struct(x)
        if mesh is None or isinstance(struct.sharding, jax.sharding.NamedSharding):
            return struct
        return jax.ShapeDtypeStruct(x.shape, x.dtype,
                                    sharding=jax.sharding.NamedSharding(mesh, P()))

    return jax.tree.map(one, tree)


@jax.jit
def _token_count(segment_ids: jax.Array) -> jax.Array:
    return (segment_ids > 0).sum()  # a replicated scalar, which every process can read


def _first() -> bool:
    """Whether this is the process that writes OUT's unsharded files (process 0)."""
    return jax.process_index() == 0


def _barrier(name: str) -> None:
    """Waits until every process of a multi-process job gets here (nothing on one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _non_finite(args: TrainArgs, record: dict, checkpoints) -> str:
    """The message for a step whose loss or grad norm is not finite."""
    checkpoints.wait_until_finished()
    latest = checkpoints.latest_step()
    kept = (f"the last good checkpoint is step {latest} in {args.out}/checkpoints (--resume "
            "continues from it; lower --lr first)" if latest is not None else
            "no checkpoint was saved before it")
    return (f"step {record['step']}: the loss is {record['loss']} and the gradient norm "
            f"{record['grad_norm']}; stopped there, {kept}; no {args.out}/final was written")


def _evaluate(task: Task, params, frozen=None) -> dict[str, float]:
    """The objective's metrics over the whole eval set, as `eval_<name>` (TRL's names)."""
    weights, sums = [], {}
    for batch in task.eval_batches():
        weight, metrics = evaluate_step(task.objective, params, batch, frozen)
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


def write_params(out: str, params: dict, source: str, force: bool = False,
                 guard_source: bool = False, **metadata) -> None:
    """Params in memory as an Orbax checkpoint folder (qwen2_jax.load reads it), with the
    config and model files of `source` (a model folder); atomic. guard_source: refuse an
    `out` that is, holds or lies inside source.

    Every process of a job calls it: the weights are saved by all (each its shards) into a
    staging folder beside `out`, which process 0 then moves into the new folder with the
    rest, so `out` appears once, whole.
    """
    sources = (source,) if guard_source else ()
    check_replaceable(out, force, sources)  # before anything is written
    parent, name = os.path.split(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staged = os.path.join(parent, f".{name}.params-staged")
    if _first() and os.path.lexists(staged):  # left by an interrupted run
        shutil.rmtree(staged)
    _barrier("cleared the staging folder")
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staged, params)
        _barrier("staged the weights")
        if _first():
            with atomic_folder(out, force=force, sources=sources) as temp:
                os.rename(staged, os.path.join(temp, PARAMS_DIR))
                shutil.copyfile(os.path.join(source, "config.json"),
                                os.path.join(temp, "config.json"))
                copy_model_files(source, temp)
                write_metadata(temp, dtype=str(jax.tree.leaves(params)[0].dtype),
                               source=os.path.abspath(source), **metadata)
    finally:
        if _first() and os.path.lexists(staged):
            shutil.rmtree(staged)
    _barrier("wrote the final folder")

