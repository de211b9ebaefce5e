"""Direct Preference Optimization on the shared train loop, with TRL's losses and metrics.

Following trl 1.16's DPOTrainer: a sequence's log-probability is the sum of its completion
tokens' log-probs; delta = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected);
per pair, with beta b and label smoothing e:

    sigmoid  -(1 - e) logsig(b delta) - e logsig(-b delta)
    robust   (-(1 - e) logsig(b delta) + e logsig(-b delta)) / (1 - 2e)
    hinge    relu(1 - b delta)
    ipo      (delta' - 1 / (2b))^2, delta' from log-probs divided by completion lengths

averaged over the pairs of the global batch. trl 1.x keeps label smoothing for `robust` only;
`sigmoid` with e > 0 is conservative DPO as trl 0.x defines it (the same loss at e = 0).
--rpo-alpha adds alpha times the mean NLL over the chosen completion tokens (trl 1.x's
loss_type=["sigmoid", "sft"], loss_weights=[1, alpha]). Reference-free: reference log-probs
are 0. Metrics: rewards b * (policy - reference) log-probs, as TRL logs them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import qwen2_jax
from qwen2_jax.config import Qwen2Config
from qwen2_jax.sharding import to_host
from qwen2_jax.tokenizer import Tokenizer
from qwen2_jax.train import token_store
from qwen2_jax.train.feed import Feeder
from qwen2_jax.train.preference import Pair, load_pairs, pair_batch
from qwen2_jax.train.step import token_losses
from qwen2_jax.train.trainer import Task, TrainArgs, fit, load_trainable, prepare, read_data

LOSSES = ("sigmoid", "robust", "hinge", "ipo")
METRICS = {"rewards/accuracies": "acc", "rewards/margins": "margin", "rewards/chosen": "r_c",
           "rewards/rejected": "r_r", "logps/chosen": "lp_c", "logps/rejected": "lp_r"}


def preference_loss(policy, reference, lengths, loss: str, beta: float,
                    label_smoothing: float = 0.0):
    """Per-pair loss [B] from summed completion log-probs [B, 2] (chosen, rejected) of the
    policy and the reference, and completion lengths [B, 2] (for ipo)."""
    ratios = policy - reference  # [B, 2]
    delta = ratios[:, 0] - ratios[:, 1]
    e = label_smoothing
    if loss == "sigmoid":
        return -(1 - e) * jax.nn.log_sigmoid(beta * delta) - e * jax.nn.log_sigmoid(-beta * delta)
    if loss == "robust":
        return (-(1 - e) * jax.nn.log_sigmoid(beta * delta)
                + e * jax.nn.log_sigmoid(-beta * delta)) / (1 - 2 * e)
    if loss == "hinge":
        return jax.nn.relu(1 - beta * delta)
    if loss == "ipo":
        mean = ratios / jnp.maximum(lengths, 1.0)
        return (mean[:, 0] - mean[:, 1] - 1 / (2 * beta)) ** 2
    raise ValueError(f"unknown DPO loss {loss!r}; expected one of {LOSSES}")


def pair_logps(nll: jnp.ndarray) -> jnp.ndarray:
    """[B, 2] summed completion log-probs from per-token NLL [2B, T] (chosen rows first)."""
    return -nll.sum(-1).reshape(2, -1).T


@dataclasses.dataclass(frozen=True)
class DPOObjective:
    """A train_step objective (see step.SFTObjective). micro: pair_batch's arrays [2B, T] and
    [B], plus ref_logps [B, 2]."""

    config: Qwen2Config
    dtype: Any = jnp.float32
    remat: str = "none"
    mesh: Any = None
    rules: tuple = ()
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    adapters: Any = None  # LoRA settings (see step.SFTObjective)

    def totals(self, batch: dict) -> dict:
        pairs = batch["pair_weights"].shape[-1]
        return {"weight": jnp.maximum(batch["pair_weights"].sum(), 1.0),
                "chosen_tokens": jnp.maximum(batch["weights"][:, :pairs].sum(), 1.0)}

    def __call__(self, params, micro: dict, totals: dict):
        nll = token_losses(self.config, params, micro, self.dtype, self.remat, self.mesh,
                           self.rules, self.adapters)  # [2B, T]
        policy = pair_logps(nll)  # [B, 2]
        lengths = micro["completion_lengths"].reshape(2, -1).T
        per_pair = preference_loss(policy, micro["ref_logps"], lengths, self.loss, self.beta,
                                   self.label_smoothing)
        w = micro["pair_weights"] / totals["weight"]  # [B]: a mean over the global batch
        loss = (per_pair * w).sum()
        rewards = self.beta * jax.lax.stop_gradient(policy - micro["ref_logps"])  # [B, 2]
        policy = jax.lax.stop_gradient(policy)
        metrics = {"rewards/chosen": rewards[:, 0] @ w, "rewards/rejected": rewards[:, 1] @ w,
                   "rewards/accuracies": (rewards[:, 0] > rewards[:, 1]) @ w,
                   "rewards/margins": (rewards[:, 0] - rewards[:, 1]) @ w,
                   "logps/chosen": policy[:, 0] @ w, "logps/rejected": policy[:, 1] @ w}
        if self.rpo_alpha is not None:
            nll_loss = nll[:nll.shape[0] // 2].sum() / totals["chosen_tokens"]
            metrics["nll_loss"] = nll_loss
            loss = loss + self.rpo_alpha * nll_loss
        return loss, {"loss": loss, **metrics}


@functools.partial(jax.jit, static_argnames=("config", "dtype", "mesh", "rules"))
def sequence_logps(config, dtype, mesh, rules, params, batch) -> jnp.ndarray:
    """Summed completion log-probs [k, B, 2] of a global batch [k, 2B, T] (no gradient)."""
    keys = ("tokens", "segment_ids", "positions", "weights")
    return jax.lax.map(lambda micro: pair_logps(token_losses(
        config, params, micro, dtype, "none", mesh, rules)), {k: batch[k] for k in keys})


@dataclasses.dataclass
class DPOArgs(TrainArgs):
    DEFAULT_MAX_LEN: ClassVar[int] = 1024  # TRL's max_length
    lr: float = 1e-6  # TRL's DPO learning rate
    max_prompt_len: int | None = None
    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = None
    ref_model: str | None = None
    precompute_ref: bool = False
    reference_free: bool = False


def check_args(args: DPOArgs) -> None:
    """Raises ValueError for option combinations that have no meaning."""
    if args.loss not in LOSSES:
        raise ValueError(f"--loss {args.loss}: expected one of {', '.join(LOSSES)}")
    if args.beta <= 0:
        raise ValueError(f"--beta must be positive, got {args.beta}")
    if args.label_smoothing and args.loss not in ("sigmoid", "robust"):
        raise ValueError(f"--label-smoothing applies to the sigmoid and robust losses, not "
                         f"{args.loss}")
    if not 0 <= args.label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5), got {args.label_smoothing}")
    if args.rpo_alpha is not None and args.rpo_alpha < 0:
        raise ValueError(f"--rpo-alpha must be >= 0, got {args.rpo_alpha}")
    if args.reference_free and (args.ref_model or args.precompute_ref):
        raise ValueError("--reference-free uses no reference model: drop --ref-model and "
                         "--precompute-ref")
    if args.max_prompt_len is not None and not 0 < args.max_prompt_len < args.max_len:
        raise ValueError(f"--max-prompt-len must be in [1, --max-len), got {args.max_prompt_len}")


def _chunks(order: np.ndarray, size: int) -> np.ndarray:
    """Pair indices `order` in rows of `size` [chunks, size], the last padded with -1 (empty
    pairs)."""
    padded = np.full(math.ceil(len(order) / size) * size, -1)
    padded[:len(order)] = order
    return padded.reshape(-1, size)


def precompute_reference(config, params, pairs: Sequence[Pair], args: DPOArgs, feeder: Feeder,
                         desc: str) -> np.ndarray:
    """The reference's summed completion log-probs [len(pairs), 2], in pair order."""
    dtype = jnp.dtype(args.compute_dtype)
    table = np.zeros((len(pairs), 2), np.float32)
    progress = args.progress and pairs and jax.process_index() == 0
    for chunk in tqdm(_chunks(np.arange(len(pairs)), args.batch_size * args.grad_accum), desc=desc,
                      disable=not progress, dynamic_ncols=True):
        batch = feeder.place_whole(pair_batch(pairs, chunk, 1, args.max_len))
        logps = to_host(sequence_logps(config, dtype, feeder.mesh, feeder.rules, params,
                                       batch))[0]
        table[chunk[chunk >= 0]] = logps[chunk >= 0]
    return table


def run(args: DPOArgs, mesh=None, rules=None) -> dict:
    """DPO-trains args.model on args.data (a JSONL file, or a `qwen2-jax tokenize` folder);
    returns the summary of `trainer.fit`."""
    config = prepare(args, "dpo")
    check_args(args)
    tokenizer = Tokenizer(args.model)

    def read(path):
        if os.path.isdir(path):  # a `qwen2-jax tokenize` folder
            settings = {k: getattr(args, k) for k in token_store.SETTINGS["dpo"]}
            return token_store.open_pairs(path, settings, config.vocab_size, args.model)
        return load_pairs(path, tokenizer, args.max_len, args.max_prompt_len, args.overflow,
                          args.skip_bad_lines, config.vocab_size)

    pairs, stats, eval_pairs = read_data(args, read)
    rules = qwen2_jax.sharding.resolve_rules(rules, mesh)
    # chosen and rejected rows lie apart, so every process builds the whole (small) batch
    # and places its own slices of it
    feeder = Feeder(2 * args.batch_size, mesh, rules)
    dtype = jnp.dtype(args.compute_dtype)
    ref_path = args.ref_model or args.model
    reference, tables, ref_params = "none (reference-free)", None, None
    # LoRA without --ref-model: the base without adapters is the reference (TRL with PEFT)
    base_reference = args.lora_config() is not None and args.ref_model is None
    if not args.reference_free and not base_reference:
        ref_config, ref_params = qwen2_jax.load(ref_path, dtype=args.compute_dtype, mesh=mesh,
                                                rules=rules)
        reference = f"frozen copy of {ref_path}"
        if args.precompute_ref:  # the reference leaves memory before the policy is loaded
            tables = [precompute_reference(ref_config, ref_params, p, args, feeder, name)
                      for p, name in ((pairs, "reference log-probs"),
                                      (eval_pairs, "reference log-probs (eval)"))]
            ref_params, reference = None, f"precomputed from {ref_path}"
    config, params, frozen = load_trainable(args, mesh, rules)
    if base_reference and not args.reference_free:
        ref_params, reference = frozen, "the base model without adapters"
        if args.precompute_ref:
            tables = [precompute_reference(config, frozen, p, args, feeder, name)
                      for p, name in ((pairs, "reference log-probs"),
                                      (eval_pairs, "reference log-probs (eval)"))]
            ref_params, reference = None, "precomputed from the base model without adapters"
    elif not args.reference_free and ref_config.vocab_size != config.vocab_size:
        raise ValueError(f"--ref-model {ref_path}: vocab_size {ref_config.vocab_size} differs "
                         f"from the model's {config.vocab_size}")

    def batch_of(indices, pairs, table, grad_accum) -> dict:
        batch = pair_batch(pairs, indices, grad_accum, args.max_len)
        if table is not None:  # precomputed; zeros when reference-free
            batch["ref_logps"] = np.where(indices[:, None] >= 0, table[indices], 0.0).reshape(
                grad_accum, -1, 2).astype(np.float32)
        elif ref_params is None:
            batch["ref_logps"] = np.zeros((*batch["pair_weights"].shape, 2), np.float32)
        batch = feeder.place_whole(batch)
        if "ref_logps" not in batch:
            batch["ref_logps"] = sequence_logps(config, dtype, mesh, rules, ref_params, batch)
        return batch

    per_step = args.batch_size * args.grad_accum
    steps_per_epoch = math.ceil(len(pairs) / per_step)
    orders: dict[int, np.ndarray] = {}  # the current epoch's [steps, per_step] pair indices

    def batch(step: int) -> dict:
        epoch, index = divmod(step, steps_per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = _chunks(
                np.random.default_rng(args.seed + epoch).permutation(len(pairs)), per_step)
        return batch_of(orders[epoch][index], pairs, tables and tables[0], args.grad_accum)

    def eval_batches() -> list[dict]:
        return [batch_of(chunk, eval_pairs, tables and tables[1], 1)
                for chunk in _chunks(np.arange(len(eval_pairs)), args.batch_size)]

    objective = DPOObjective(config, dtype, args.remat, mesh, rules, args.loss, args.beta,
                             args.label_smoothing, args.rpo_alpha, args.lora_config())
    task = Task("dpo", objective, steps_per_epoch, batch, eval_batches if eval_pairs else None,
                bar=METRICS, summary={"data": dataclasses.asdict(stats), "reference": reference},
                feeder=feeder)
    return fit(args, task, config, params, frozen)
