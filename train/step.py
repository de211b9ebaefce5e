"""The SFT loss and the jitted train step (AdamW, schedule, clipping, gradient accumulation).

One step serves every training objective (SFT here, DPO in train/dpo.py). The SFT loss is the
sum of next-token cross-entropies over the target tokens of the whole global batch, divided
once by their number: k accumulated micro-batches give the same value and gradient as one
batch k times larger, and packed rows the same as unpacked ones.

A Qwen2-MoE config with `output_router_logits` adds `router_aux_loss_coef` times the
load-balancing loss, as transformers' training loss does. That loss is a product of two sums
over tokens, so it does not split into per-micro-batch parts: each micro-batch adds its own
(over its real tokens) divided by k, making the global value the mean over the k
micro-batches (exactly transformers' for k = 1).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax

from qwen2_jax import lora
from qwen2_jax.api import sparse_router_logits
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import precision
from qwen2_jax.model import Qwen2ForCausalLM, lm_head
from qwen2_jax.moe import load_balancing_loss
from qwen2_jax.sharding import constrain, use_mesh

LOSS_CHUNK = 128  # tokens of each row whose logits [R, LOSS_CHUNK, V] exist at once


def token_losses(config: Qwen2Config, params: dict, batch: dict, dtype=jnp.float32,
                 remat: str = "none", mesh=None, rules=(),
                 adapters: lora.LoRAConfig | None = None, router_aux: bool = False,
                 summed: bool = False):
    """Per-token next-token cross-entropy [R, T] in float32 (0 where weights are 0).

    batch: tokens, segment_ids, positions [R, T] int32; weights [R, T] float32. Segment 0 is
    padding. adapters: the settings of the LoRA leaves in params (unfolded B), whose dropout
    draws from batch["dropout_key"] when present (none: no dropout, as in evaluation).
    router_aux (MoE): returns (those losses, the load-balancing loss of the batch's real
    tokens, float32 scalar), from router logits the same forward pass sows. summed: their
    sum, a scalar, instead of the losses (`fused_cross_entropy_sum` for a trained head).
    """
    model = Qwen2ForCausalLM(config, dtype=dtype, remat=remat)
    scale, dropout = (1.0, 0.0) if adapters is None else (adapters.scale, adapters.dropout)
    dropout = dropout if "dropout_key" in batch else 0.0
    rngs = {"dropout": batch["dropout_key"]} if dropout else None
    token_mask = (batch["segment_ids"] > 0).astype(jnp.int32)  # [R, T]
    with use_mesh(mesh, rules), lora.settings(scale, dropout):
        # Without router_aux the sown router logits are not collected at all.
        hidden = model.apply({"params": params}, batch["tokens"], batch["positions"],
                             token_mask, batch["segment_ids"], rngs=rngs, hidden_only=True,
                             mutable=["intermediates"] if router_aux else False)  # [R, T, D]
        if router_aux:
            hidden, state = hidden
        targets = jnp.roll(batch["tokens"], -1, axis=1)  # token t + 1 (weights 0 at row ends)
        if summed and not adapters:
            table = params["embed_tokens" if config.tie_word_embeddings else "lm_head"]
            losses = fused_cross_entropy_sum(table["embedding"], hidden, targets,
                                             batch["weights"], dtype)
        else:
            head = lm_head(config, params, dtype)
            nll = (frozen_head_cross_entropy(head, hidden, targets) if adapters
                   else chunked_cross_entropy(head, hidden, targets))
            losses = nll * batch["weights"]  # [R, T]
            losses = losses.sum() if summed else losses
    if not router_aux:
        return losses
    router = sparse_router_logits(config, state["intermediates"])  # [layers, R*T, E]
    return losses, load_balancing_loss(router, config.num_experts, config.num_experts_per_tok,
                                       token_mask)


def chunked_cross_entropy(head, hidden: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """-log softmax(head(hidden))[targets], [R, T] float32, LOSS_CHUNK positions of each row
    at a time.

    The float32 logits of all R x T tokens (0.6 GB for 1k tokens of Qwen2's 152k vocab, and
    as much again for their gradient) would be the step's largest buffer. Each chunk's logits
    are made, reduced to [R, C] and dropped; the backward pass makes them again (one more
    vocab matmul) instead of keeping them.
    """
    return _over_chunks(functools.partial(_cross_entropy, head), hidden, targets)


def frozen_head_cross_entropy(head, hidden: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    """`chunked_cross_entropy` for a head that gets no gradient (LoRA: the table is frozen).

    The gradient to hidden is made with the loss, chunk by chunk (softmax - one_hot, times
    the table), and kept ([R, T, D], small); the backward pass only scales it. This saves the
    vocab matmul that the backward pass would otherwise spend making each chunk's logits
    again: about 15% of a LoRA step of the 0.5B model. A head that is differentiated is an
    error (jax refuses a custom_vjp closing over it), never a silent zero gradient.
    """

    @jax.custom_vjp
    def loss(h):
        return chunked_cross_entropy(head, h, targets)

    def loss_and_grad(h):
        return _over_chunks(functools.partial(_cross_entropy_and_grad, head), h, targets)

    def backward(dloss_dh, g):  # g: the cotangent of the losses [R, T]
        return ((g[..., None] * dloss_dh).astype(hidden.dtype),)

    loss.defvjp(loss_and_grad, backward)
    return loss(hidden)


def fused_cross_entropy_sum(table: jnp.ndarray, hidden: jnp.ndarray, targets: jnp.ndarray,
                            weights: jnp.ndarray, dtype) -> jnp.ndarray:
    """sum(weights * -log softmax(hidden @ table.T)[targets]): float32 scalar, with its
    gradients to the table [V, D] and to hidden [R, T, D] made in the same chunked pass (the
    fused linear cross-entropy of Liger-Kernel).

    A trained head's gradient needs each token's cotangent, which per-token losses leave
    unknown until the backward pass; so `chunked_cross_entropy` must make every chunk's
    logits again there. A weighted sum has one scalar cotangent, so the gradients can be made
    with the loss and only scaled afterwards: three vocab matmuls instead of four, and the
    logits still exist one chunk at a time. Outside differentiation only the loss is made.
    """
    head = functools.partial(_table_logits, dtype)

    @jax.custom_vjp
    def loss(table, hidden):
        per_token = _over_chunks(lambda h, t: _cross_entropy(functools.partial(head, table),
                                                             h, t), hidden, targets)
        return (per_token * weights).sum()

    def loss_and_grads(table, hidden):
        R, T, D = hidden.shape
        n = -(-T // LOSS_CHUNK)
        pad = n * LOSS_CHUNK - T
        chunks = [jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2)).reshape(
            R, n, LOSS_CHUNK, *x.shape[2:]).swapaxes(0, 1) for x in (hidden, targets, weights)]

        def chunk(dtable, inputs):  # [n, R, C, D], [n, R, C] x2 -> one chunk's share
            h, t, w = inputs
            logits, vjp = jax.vjp(head, table, h)  # [R, C, V] float32
            lse = jax.nn.logsumexp(logits, axis=-1)  # [R, C]
            picked = jnp.take_along_axis(logits, t[..., None], axis=-1)[..., 0]
            dlogits = w[..., None] * (jnp.exp(logits - lse[..., None])
                                      - jax.nn.one_hot(t, logits.shape[-1], dtype=jnp.float32))
            dtable_c, dh = vjp(dlogits)
            return dtable + dtable_c.astype(jnp.float32), (((lse - picked) * w).sum(), dh)

        dtable = constrain(jnp.zeros(table.shape, jnp.float32), ("vocab", "embed"))
        dtable, (sums, dhidden) = jax.lax.scan(chunk, dtable, chunks)
        dhidden = dhidden.swapaxes(0, 1).reshape(R, n * LOSS_CHUNK, D)[:, :T]  # [R, T, D]
        return sums.sum(), (dtable, dhidden)

    def backward(grads, g):
        dtable, dhidden = grads
        return (g * dtable).astype(table.dtype), (g * dhidden).astype(hidden.dtype)

    loss.defvjp(loss_and_grads, backward)
    return loss(table, hidden)


def _table_logits(dtype, table: jnp.ndarray, hidden: jnp.ndarray) -> jnp.ndarray:
    """hidden [R, C, D] @ table [V, D].T -> float32 [R, C, V], as `Embedding.attend`."""
    logits = jnp.einsum("BTD,VD->BTV", hidden, table.astype(dtype),
                        preferred_element_type=jnp.float32, precision=precision(dtype))
    return constrain(logits, ("batch", "length", "vocab"))


def _over_chunks(fn, hidden: jnp.ndarray, targets: jnp.ndarray):
    """fn(hidden [R, C, D], targets [R, C]) -> arrays [R, C, ...], over LOSS_CHUNK positions
    of each row at a time (the last chunk padded), each chunk recomputed in a backward pass
    rather than kept; the results joined to [R, T, ...]."""
    R, T, D = hidden.shape
    n = -(-T // LOSS_CHUNK)
    if n == 1:
        return fn(hidden, targets)
    pad = n * LOSS_CHUNK - T
    hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)))
    hidden = hidden.reshape(R, n, LOSS_CHUNK, D).swapaxes(0, 1)  # [n, R, C, D]
    targets = targets.reshape(R, n, LOSS_CHUNK).swapaxes(0, 1)  # [n, R, C]
    one = jax.checkpoint(fn)
    out = jax.lax.map(lambda chunk: one(*chunk), (hidden, targets))  # [n, R, C, ...]
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape(R, n * LOSS_CHUNK, *x.shape[3:])
                        [:, :T], out)


def _logits(head, hidden: jnp.ndarray) -> jnp.ndarray:  # [R, C, D] -> float32 [R, C, V]
    return constrain(head(hidden).astype(jnp.float32), ("batch", "length", "vocab"))


def _cross_entropy(head, hidden: jnp.ndarray, targets: jnp.ndarray) -> jnp.ndarray:
    logits = _logits(head, hidden)  # [R, C, V]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [R, C]
    return jax.nn.logsumexp(logits, axis=-1) - picked


def _cross_entropy_and_grad(head, hidden: jnp.ndarray, targets: jnp.ndarray):
    """(losses [R, C], their gradients to hidden [R, C, D]), one vocab matmul each way."""
    logits, head_vjp = jax.vjp(functools.partial(_logits, head), hidden)  # [R, C, V]
    lse = jax.nn.logsumexp(logits, axis=-1)  # [R, C]
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    dlogits = (jnp.exp(logits - lse[..., None])
               - jax.nn.one_hot(targets, logits.shape[-1], dtype=jnp.float32))  # [R, C, V]
    (dhidden,) = head_vjp(dlogits)
    return lse - picked, dhidden


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
    the k micro-batches are the global batch's values. With the MoE aux loss (see the module
    docstring) "loss" includes router_aux_loss_coef times "aux_loss", the mean of the
    micro-batches' load-balancing losses.
    """

    config: Qwen2Config
    dtype: Any = jnp.float32
    remat: str = "none"
    mesh: Any = None
    rules: tuple = ()
    adapters: lora.LoRAConfig | None = None  # LoRA: params hold unfolded adapter leaves

    def totals(self, batch: dict) -> dict:
        return {"weight": jnp.maximum(batch["weights"].sum(), 1.0),
                "micro_batches": batch["weights"].shape[0]}

    def __call__(self, params, micro: dict, totals: dict):
        c = self.config
        router_aux = c.output_router_logits and any(c.sparse_layers)
        out = token_losses(c, params, micro, self.dtype, self.remat, self.mesh, self.rules,
                           self.adapters, router_aux, summed=True)
        total, aux = out if router_aux else (out, None)
        loss = total / totals["weight"]
        if aux is None:
            return loss, {"loss": loss}
        aux = aux / totals["micro_batches"]
        loss = loss + c.router_aux_loss_coef * aux
        return loss, {"loss": loss, "aux_loss": aux}


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
    if jax.tree.leaves(batch)[0].shape[0] == 1:  # one micro-batch: nothing to accumulate
        (_, metrics), grads = jax.value_and_grad(loss, has_aux=True)(params, first, totals)
        return metrics, grads
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
