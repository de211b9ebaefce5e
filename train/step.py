"""The SFT loss and the jitted train step (AdamW, schedule, clipping, gradient accumulation).

One step serves every training objective (SFT here, DPO in train/dpo.py). The SFT loss is the
sum of next-token cross-entropies over the target tokens of the whole global batch, divided
once by their number: k accumulated micro-batches give the same value and gradient as one
batch k times larger, and packed rows the same as unpacked ones.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qwen2_jax import lora
from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.sharding import use_mesh


def token_losses(config: Qwen2Config, params: dict, batch: dict, dtype=jnp.float32,
                 remat: str = "none", mesh=None, rules=(),
                 adapters: lora.LoRAConfig | None = None) -> jnp.ndarray:
    """Per-token next-token cross-entropy [R, T] in float32 (0 where weights are 0).

    batch: tokens, segment_ids, positions [R, T] int32; weights [R, T] float32. Segment 0 is
    padding. adapters: the settings of the LoRA leaves in params (unfolded B), whose dropout
    draws from batch["dropout_key"] when present (none: no dropout, as in evaluation).
    """
    model = Qwen2ForCausalLM(config, dtype=dtype, remat=remat)
    scale, dropout = (1.0, 0.0) if adapters is None else (adapters.scale, adapters.dropout)
    dropout = dropout if "dropout_key" in batch else 0.0
    rngs = {"dropout": batch["dropout_key"]} if dropout else None
    with use_mesh(mesh, rules), lora.settings(scale, dropout):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             (batch["segment_ids"] > 0).astype(jnp.int32), batch["segment_ids"],
                             rngs=rngs)
    targets = jnp.roll(batch["tokens"], -1, axis=1)  # token t + 1 (weights are 0 at row ends)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return nll * batch["weights"]


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    learning_rate: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    decay: str = "cosine"  # or "linear"
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    remat: str = "none"


def schedule(t: TrainConfig) -> optax.Schedule:
    """Linear warmup to the peak, then cosine or linear decay to 0 at total_steps."""
    decay_steps = max(1, t.total_steps - t.warmup_steps)
    decay = (optax.cosine_decay_schedule(t.learning_rate, decay_steps) if t.decay == "cosine"
             else optax.linear_schedule(t.learning_rate, 0.0, decay_steps))
    if not t.warmup_steps:
        return decay
    warmup = optax.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
    return optax.join_schedules([warmup, decay], [t.warmup_steps])


def optimizer(t: TrainConfig) -> optax.GradientTransformation:
    return optax.chain(optax.clip_by_global_norm(t.clip_norm),
                       optax.adamw(schedule(t), weight_decay=t.weight_decay))


@dataclasses.dataclass(frozen=True)
class SFTObjective:
    """Next-token cross-entropy over the target tokens, averaged over the global batch's targets.

    An objective (this one, or train/dpo.py's) is a hashable static argument of train_step:
    `totals(batch)` gives the denominators of the whole global batch [k, ...] (its "weight"
    weights the batch when eval batches are averaged), and `__call__(params, micro, totals)`
    returns (loss, metrics) of one micro-batch already divided by them, so that the sums over
    the k micro-batches are the global batch's values.
    """

    config: Qwen2Config
    dtype: Any = jnp.float32
    remat: str = "none"
    mesh: Any = None
    rules: tuple = ()
    adapters: lora.LoRAConfig | None = None  # LoRA: params hold unfolded adapter leaves

    def totals(self, batch: dict) -> dict:
        return {"weight": jnp.maximum(batch["weights"].sum(), 1.0)}

    def __call__(self, params, micro: dict, totals: dict):
        loss = token_losses(self.config, params, micro, self.dtype, self.remat, self.mesh,
                            self.rules, self.adapters).sum() / totals["weight"]
        return loss, {"loss": loss}


def with_frozen(objective, frozen):
    """The objective of the trainable params alone: with LoRA (frozen: the base), they are
    the adapters, combined with the base inside, so only they get gradients."""
    if frozen is None:
        return objective
    return lambda params, micro, totals: objective(lora.combine(frozen, params), micro, totals)


def batch_gradients(objective, params, batch, frozen=None) -> tuple[dict, dict]:
    """(metrics, gradient of metrics["loss"]) of a global batch [k, ...]: the micro-batches'
    losses, metrics and gradients summed in a scan (each already divided by the global
    totals, so the sums are exact, not means of means). frozen: see `with_frozen`."""
    totals = objective.totals(batch)
    loss = with_frozen(objective, frozen)

    def accumulate(carry, micro):
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, micro, totals)
        return jax.tree.map(jnp.add, carry, (metrics, grads)), None

    first = jax.tree.map(lambda x: x[0], batch)
    shapes = jax.eval_shape(lambda: loss(params, first, totals)[1])
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes, params))
    (metrics, grads), _ = jax.lax.scan(accumulate, zeros, batch)
    return metrics, grads


@functools.partial(jax.jit, static_argnames=("objective", "train"),
                   donate_argnames=("params", "opt_state"))
def train_step(objective, train: TrainConfig, params, opt_state, batch, step=0, frozen=None):
    """Optimizer step number `step` (from 0; the count of updates opt_state has seen, whose
    learning rate the schedule gives) on a global batch of train.grad_accum micro-batches.

    batch: arrays [k, ...] (k = grad_accum). frozen: with LoRA, the base (params are then the
    adapters; see `with_frozen`). Returns (params, opt_state, metrics: the objective's,
    grad_norm, lr).
    """
    metrics, grads = batch_gradients(objective, params, batch, frozen)
    updates, opt_state = optimizer(train).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    return params, opt_state, {**metrics, "grad_norm": optax.global_norm(grads),
                               "lr": schedule(train)(step)}


@functools.partial(jax.jit, static_argnames=("objective",))
def evaluate_step(objective, params, batch, frozen=None) -> tuple[jnp.ndarray, dict]:
    """(weight, metrics) of a global batch [k, ...] without gradients: metrics averaged
    over eval batches with these weights are exact for the whole eval set."""
    totals = objective.totals(batch)
    loss = with_frozen(objective, frozen)
    per_micro = jax.lax.map(lambda micro: loss(params, micro, totals)[1], batch)
    return totals["weight"], jax.tree.map(lambda x: x.sum(0), per_micro)
