"""Supervised fine-tuning: chat JSONL -> packed rows -> the shared train loop."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np

import qwen2_jax
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train.data import load_examples, pack
from qwen2_jax.train.step import SFTObjective
from qwen2_jax.train.trainer import Task, TrainArgs, fit, load_trainable, prepare, read_data


@dataclasses.dataclass
class SFTArgs(TrainArgs):
    train_on_prompt: bool = False


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


def run(args: SFTArgs, mesh=None, rules=None) -> dict:
    """Fine-tunes args.model on args.data; returns the summary of `trainer.fit`."""
    config = prepare(args, "sft")
    tokenizer = Tokenizer(args.model)

    def read(path):
        return load_examples(path, tokenizer, args.max_len, args.overflow, args.train_on_prompt,
                             args.skip_bad_lines, config.vocab_size)

    examples, stats, eval_examples = read_data(args, read)
    config, params, frozen = load_trainable(args, mesh, rules)
    rules = qwen2_jax.sharding.resolve_rules(rules, mesh)
    epochs = {0: _batches(examples, args, 0)}  # only the current epoch is kept
    steps_per_epoch = len(epochs[0])

    def batch(step: int) -> dict:
        """Batch `index` of the epoch. Another seed may pack into a row or two fewer (that
        epoch wraps to its start) or into more (its last rows are left out)."""
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in epochs:
            epochs.clear()
            epochs[epoch] = _batches(examples, args, epoch)
        batches = epochs[epoch]
        return {k: jnp.asarray(v) for k, v in batches[index % len(batches)].items()}

    def eval_batches() -> list[dict]:
        rows = pack(eval_examples, args.max_len, 0)
        return [{k: jnp.asarray(v[start:start + args.batch_size])[None] for k, v in rows.items()}
                for start in range(0, len(rows["tokens"]), args.batch_size)]

    objective = SFTObjective(config, jnp.dtype(args.compute_dtype), args.remat, mesh, rules,
                             args.lora_config())
    task = Task("sft", objective, steps_per_epoch, batch,
                eval_batches if eval_examples else None,
                summary={"data": dataclasses.asdict(stats)})
    return fit(args, task, config, params, frozen)
