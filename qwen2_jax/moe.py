"""Qwen2-MoE's sparse block: a float32 softmax router, top-k routed experts, a gated shared
expert; and the load-balancing auxiliary loss.

Routed experts are stacked along the `expert` logical axis. The default dispatch sorts the N*k
(token, expert) assignments by expert, pads each expert's group to whole blocks of `BLOCK`
rows and runs one expert's SwiGLU per block (a scan over blocks), so it computes about N*k
token-expert products instead of N*E. `dispatch="dense"` computes every expert for every token
and is kept as the reference the tests compare the sorted dispatch with.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import MLP, Dtype, Linear, logical_param, precision

BLOCK = 16  # rows per dispatch block: one expert's matmuls per block


def route(logits: jnp.ndarray, top_k: int, normalize: bool, dtype: Dtype):
    """Router logits [N, E] -> (weights [N, k] in `dtype`, expert ids [N, k]).

    As transformers: softmax in float32, top-k, renormalized only with norm_topk_prob, then
    cast to the hidden dtype.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, top_k)
    if normalize:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights.astype(dtype), experts


def _swiglu(x, gate, up, down, dtype):
    """x [..., D] through one expert's (gate, up: [D, F], down: [F, D])."""
    p = precision(dtype)
    h = nn.silu(jnp.matmul(x, gate, precision=p)) * jnp.matmul(x, up, precision=p)
    return jnp.matmul(h, down, precision=p)


def dense_dispatch(x, weights, experts, gate, up, down, dtype):
    """Every expert on every token, combined with the routing weights (the reference)."""
    p = precision(dtype)
    h = nn.silu(jnp.einsum("ND,EDF->NEF", x, gate, precision=p)) * jnp.einsum(
        "ND,EDF->NEF", x, up, precision=p)
    out = jnp.einsum("NEF,EFD->NED", h, down, precision=p)  # [N, E, D]
    combine = jnp.zeros(out.shape[:2], x.dtype).at[
        jnp.arange(x.shape[0])[:, None], experts].add(weights)  # [N, E]
    return jnp.einsum("NE,NED->ND", combine, out, precision=p)


def dispatch_slots(experts: jnp.ndarray, num_experts: int, block: int = BLOCK):
    """Where each (token, k) assignment goes when sorted by expert and padded to blocks.

    Returns (slot of each assignment [N*k], expert of each block [NB], number of slots P).
    NB = ceil(N*k / block) + E blocks bound any routing, so the shapes are static.
    """
    flat = experts.reshape(-1)  # [A]
    assignments = flat.shape[0]
    counts = jnp.bincount(flat, length=num_experts)  # [E]
    padded = (counts + block - 1) // block * block
    group_start = jnp.cumsum(counts) - counts  # first sorted index of each expert
    padded_start = jnp.cumsum(padded) - padded
    order = jnp.argsort(flat, stable=True)
    rank = jnp.zeros(assignments, jnp.int32).at[order].set(
        jnp.arange(assignments) - group_start[flat[order]])  # place within its expert's group
    slot = padded_start[flat] + rank  # [A]
    blocks = -(-assignments // block) + num_experts
    block_start = jnp.arange(blocks) * block
    block_expert = jnp.minimum(
        jnp.searchsorted(jnp.cumsum(padded), block_start, side="right"), num_experts - 1)
    return slot, block_expert, blocks * block


def sorted_dispatch(x, weights, experts, gate, up, down, dtype, block: int = BLOCK):
    """The routed experts' output [N, D], computing ~N*k token-expert products."""
    n, d = x.shape
    k = experts.shape[1]
    slot, block_expert, slots = dispatch_slots(experts, gate.shape[0], block)
    token = jnp.full((slots,), n, jnp.int32).at[slot].set(jnp.repeat(jnp.arange(n), k))
    slot_weight = jnp.zeros((slots,), x.dtype).at[slot].set(weights.reshape(-1))
    rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token]  # [P, D]; padding: zeros

    def one_block(_, inputs):
        xb, e = inputs  # [block, D], expert id
        return None, _swiglu(xb, gate[e], up[e], down[e], dtype)

    _, out = jax.lax.scan(one_block, None, (rows.reshape(-1, block, d), block_expert))
    out = out.reshape(slots, d) * slot_weight[:, None]
    return jnp.zeros((n + 1, d), x.dtype).at[token].add(out)[:n]


class Experts(nn.Module):
    """The routed experts' SwiGLU weights, stacked: gate_proj, up_proj [E, D, F] and
    down_proj [E, F, D]."""

    num_experts: int
    hidden_size: int
    intermediate_size: int
    init_std: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self):
        e, d, f = self.num_experts, self.hidden_size, self.intermediate_size
        init = nn.initializers.normal(self.init_std)
        return (
            logical_param(self, "gate_proj", init, (e, d, f), ("expert", "embed", "mlp"),
                          self.param_dtype),
            logical_param(self, "up_proj", init, (e, d, f), ("expert", "embed", "mlp"),
                          self.param_dtype),
            logical_param(self, "down_proj", init, (e, f, d), ("expert", "mlp", "embed"),
                          self.param_dtype),
        )


class SparseMoE(nn.Module):
    """`y = sum_k w_k expert_k(x) + sigmoid(x w_sg) * shared(x)`; sows the router logits
    (`intermediates/router_logits`, [N, E] float32) for the auxiliary loss."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    dispatch: str = "sorted"

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D]
        c = self.config
        e, f, d = c.num_experts, c.moe_intermediate_size, c.hidden_size
        flat = x.reshape(-1, d).astype(self.dtype)  # [N, D]
        router = Linear((e,), ("embed", None), c.initializer_range, dtype=self.dtype,
                        param_dtype=self.param_dtype, name="gate")
        logits = router(flat)  # [N, E]
        self.sow("intermediates", "router_logits", logits.astype(jnp.float32))
        weights, experts = route(logits, c.num_experts_per_tok, c.norm_topk_prob, self.dtype)

        gate, up, down = (w.astype(self.dtype) for w in Experts(
            e, d, f, c.initializer_range, self.param_dtype, name="experts")())
        run = sorted_dispatch if self.dispatch == "sorted" else dense_dispatch
        routed = run(flat, weights, experts, gate, up, down, self.dtype)  # [N, D]

        shared = MLP(c.shared_expert_intermediate_size, c.initializer_range, self.dtype,
                     self.param_dtype, name="shared_expert")(flat[None])[0]  # [N, D]
        shared_gate = Linear((1,), ("embed", None), c.initializer_range, dtype=self.dtype,
                             param_dtype=self.param_dtype, name="shared_expert_gate")(flat)
        y = routed + nn.sigmoid(shared_gate) * shared
        return y.reshape(x.shape)


def load_balancing_loss(router_logits: jnp.ndarray, num_experts: int, top_k: int,
                        token_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """transformers' `load_balancing_loss_func` (Qwen2-MoE): E * sum_e f_e * P_e over all
    sparse layers' tokens, where f_e counts top-k picks of expert e per token and P_e is the
    mean router probability; padding (token_mask 0) excluded.

    router_logits: [layers, N, E]; token_mask: [N] (the flattened attention mask) or None.
    """
    probs = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)  # [L, N, E]
    _, picked = jax.lax.top_k(probs, top_k)  # [L, N, k]
    mask = (jnp.ones(router_logits.shape[1]) if token_mask is None
            else token_mask.reshape(-1).astype(jnp.float32))  # [N]
    counts = (jax.nn.one_hot(picked, num_experts) * mask[None, :, None, None]).sum((0, 1, 2))
    prob_sum = (probs * mask[None, :, None]).sum((0, 1))
    rows = mask.sum() * router_logits.shape[0]
    return num_experts * jnp.sum((counts / rows) * (prob_sum / rows))
