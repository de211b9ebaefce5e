"""Supervised fine-tuning: chat JSONL or a tokenize folder -> packed rows -> the shared train
loop."""

from __future__ import annotations

import dataclasses
import math
import os

import jax.numpy as jnp
import numpy as np

import qwen2_jax
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train import token_store
from qwen2_jax.train.data import DataStats, Examples, load_examples, plan_rows
from qwen2_jax.train.feed import Feeder
from qwen2_jax.train.step import SFTObjective
from qwen2_jax.train.trainer import Task, TrainArgs, fit, load_trainable, prepare, read_data


@dataclasses.dataclass
class SFTArgs(TrainArgs):
    train_on_prompt: bool = False


def batch_rows(data: Examples, plan, which: np.ndarray, row_length: int
               ) -> dict[str, np.ndarray]:
    """Rows `which` [k, r] of a plan_rows plan (past its last: empty rows) as arrays
    [k, r, T]: a batch's, or this process's part of one."""
    rows = data.rows(plan, which, row_length)
    return {k: v.reshape(*which.shape, row_length) for k, v in rows.items()}


def run(args: SFTArgs, mesh=None, rules=None) -> dict:
    """Fine-tunes args.model on args.data (a JSONL file, or a `qwen2-jax tokenize` folder);
    returns the summary of `trainer.fit`."""
    config = prepare(args, "sft")
    tokenizer = Tokenizer(args.model)

    def read(path) -> tuple[Examples, DataStats]:
        if os.path.isdir(path):
            settings = {k: getattr(args, k) for k in token_store.SETTINGS["sft"]}
            return token_store.open_examples(path, settings, config.vocab_size, args.model)
        examples, stats = load_examples(path, tokenizer, args.max_len, args.overflow,
                                        args.train_on_prompt, args.skip_bad_lines,
                                        config.vocab_size)
        return Examples.from_list(examples), stats

    data, stats, eval_data = read_data(args, read)
    config, params, frozen = load_trainable(args, mesh, rules)
    rules = qwen2_jax.sharding.resolve_rules(rules, mesh)
    per_step = args.batch_size * args.grad_accum
    # the epoch's packing, planned from the lengths alone; only the current one is kept
    plans = {0: plan_rows(data.lengths, args.max_len, args.seed)}
    steps_per_epoch = math.ceil((len(plans[0][1]) - 1) / per_step)

    feeder = Feeder(args.batch_size, mesh, rules)

    def batch(step: int) -> dict:
        """Batch `index` of the epoch: its rows [grad_accum, batch_size] in the epoch's packing
        (past the last row: empty rows, weight 0), of which this process builds its own. Another
        seed may pack into a row or two fewer (that epoch wraps to its start) or into more (its
        last rows are left out)."""
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = plan_rows(data.lengths, args.max_len, args.seed + epoch)
        plan = plans[epoch]
        index %= math.ceil((len(plan[1]) - 1) / per_step)
        which = (index * per_step + np.arange(per_step)).reshape(args.grad_accum,
                                                                 args.batch_size)
        return feeder.place(batch_rows(data, plan, which[:, feeder.rows], args.max_len))

    def eval_batches() -> list[dict]:
        plan = plan_rows(eval_data.lengths, args.max_len, 0)
        return [feeder.place(batch_rows(eval_data, plan,
                                        (start + np.arange(args.batch_size))[None, feeder.rows],
                                        args.max_len))
                for start in range(0, len(plan[1]) - 1, args.batch_size)]

    objective = SFTObjective(config, jnp.dtype(args.compute_dtype), args.remat, mesh, rules,
                             args.lora_config())
    task = Task("sft", objective, steps_per_epoch, batch, eval_batches if eval_data else None,
                summary={"data": dataclasses.asdict(stats)}, feeder=feeder)
    return fit(args, task, config, params, frozen)
