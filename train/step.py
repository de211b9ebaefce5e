"""The loss and the jitted train step (AdamW, schedule, clipping, gradient accumulation).

The loss is the sum of next-token cross-entropies over the target tokens of the whole global
batch, divided once by their number: k accumulated micro-batches give the same value and
gradient as one batch k times larger, and packed rows the same as unpacked ones.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from qwen2_jax.config import Qwen2Config
from qwen2_jax.model import Qwen2ForCausalLM
from qwen2_jax.sharding import use_mesh


def token_losses(config: Qwen2Config, params: dict, batch: dict, dtype=jnp.float32,
                 remat: str = "none", mesh=None, rules=()) -> jnp.ndarray:
    """Per-token next-token cross-entropy [R, T] in float32 (0 where weights are 0).

    batch: tokens, segment_ids, positions [R, T] int32; weights [R, T] float32. Segment 0 is
    padding.
    """
    model = Qwen2ForCausalLM(config, dtype=dtype, remat=remat)
    with use_mesh(mesh, rules):
        logits = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             (batch["segment_ids"] > 0).astype(jnp.int32), batch["segment_ids"])
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


def batch_gradients(config, remat, dtype, mesh, rules, params, batch):
    """(mean loss, target count, its gradient) of a global batch [k, R, T]: the micro-batches'
    summed losses and gradients accumulated in a scan, divided once by the total count."""
    def summed(p, micro):
        return token_losses(config, p, micro, dtype, remat, mesh, rules).sum()

    def accumulate(carry, micro):
        loss_sum, grads = carry
        value, g = jax.value_and_grad(summed)(params, micro)
        return (loss_sum + value, jax.tree.map(jnp.add, grads, g)), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    (loss_sum, grads), _ = jax.lax.scan(accumulate, (jnp.float32(0), zeros), batch)
    count = jnp.maximum(batch["weights"].sum(), 1.0)
    return loss_sum / count, count, jax.tree.map(lambda g: g / count, grads)


@functools.partial(jax.jit, static_argnames=("config", "train", "dtype", "mesh", "rules"),
                   donate_argnames=("params", "opt_state"))
def train_step(config: Qwen2Config, train: TrainConfig, dtype, mesh, rules, params, opt_state,
               batch, step=0):
    """Optimizer step number `step` (from 0; the count of updates opt_state has seen, whose
    learning rate the schedule gives) on a global batch of train.grad_accum micro-batches.

    batch: arrays [k, R, T] (k = grad_accum). Gradients of the summed loss are accumulated
    over the micro-batches (a scan), then divided by the batch's total target count.
    Returns (params, opt_state, metrics: loss, targets, grad_norm, lr).
    """
    loss, count, grads = batch_gradients(config, train.remat, dtype, mesh, rules, params, batch)
    updates, opt_state = optimizer(train).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    metrics = {"loss": loss, "targets": count, "grad_norm": optax.global_norm(grads),
               "lr": schedule(train)(step)}
    return params, opt_state, metrics
