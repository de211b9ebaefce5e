"""Qwen2-MoE's sparse block: a float32 softmax router, top-k routed experts, a gated shared
expert; and the load-balancing auxiliary loss.

Routed experts are stacked along the `expert` logical axis. The default dispatch sorts the N*k
(token, expert) assignments by expert, pads each expert's group to whole blocks of `BLOCK`
rows and runs one expert's SwiGLU per block (a scan over blocks), so it computes about N*k
token-expert products instead of N*E. `dispatch="dense"` computes every expert for every token
and is kept as the reference the tests compare the sorted dispatch with.

Under a mesh whose `expert` axis splits the experts, the sorted dispatch moves tokens, not
weights (`expert_parallel_dispatch`): tokens are split over every mesh axis but the experts'
`mlp` axes, each device sends each of its (token, expert) assignments to the device holding
that expert (`all_to_all`), runs its local experts on what it received and sends the results
back. The buffers are sized for the worst case, so no token is ever dropped and the result
equals one device's.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from qwen2_jax import sharding
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


def sorted_dispatch(x, weights, experts, gate, up, down, dtype, block: int = BLOCK,
                    skip_none: bool = False):
    """The routed experts' output [N, D], computing ~N*k token-expert products.

    skip_none: `experts` may also hold E, "no expert" (the unused rows of expert
    parallelism's worst-case buffers): those give zeros, and the blocks of no expert are
    skipped (a lax.cond), so the work follows the rows used, not the buffer's size.
    """
    n, d = x.shape
    k, e = experts.shape[1], gate.shape[0]
    slot, block_expert, slots = dispatch_slots(experts, e + skip_none, block)
    token = jnp.full((slots,), n, jnp.int32).at[slot].set(jnp.repeat(jnp.arange(n), k))
    slot_weight = jnp.zeros((slots,), x.dtype).at[slot].set(weights.reshape(-1))
    rows = jnp.concatenate([x, jnp.zeros((1, d), x.dtype)])[token]  # [P, D]; padding: zeros

    def one_block(_, inputs):
        xb, i = inputs  # [block, D], expert id
        if not skip_none:
            return None, _swiglu(xb, gate[i], up[i], down[i], dtype)
        return None, jax.lax.cond(i < e, lambda: _swiglu(xb, gate[i], up[i], down[i], dtype),
                                  lambda: jnp.zeros_like(xb))

    _, out = jax.lax.scan(one_block, None, (rows.reshape(-1, block, d), block_expert))
    out = out.reshape(slots, d) * slot_weight[:, None]
    return jnp.zeros((n + 1, d), x.dtype).at[token].add(out)[:n]


def _axes(entry) -> tuple[str, ...]:
    """The mesh axes of one PartitionSpec entry."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def expert_parallel_layout(num_experts: int, hidden: int, mlp: int):
    """(mesh, expert axes, mlp axes) of the routed experts [E, D, F] under `use_mesh`, or None
    when no mesh splits the experts (the sorted dispatch then runs on the whole arrays)."""
    context = sharding.current_mesh_and_rules()
    if context is None:
        return None
    mesh, rules = context
    spec = sharding.logical_spec(("expert", None, "mlp"), (num_experts, hidden, mlp), mesh,
                                 rules)
    if not _axes(spec[0]):
        return None
    return sharding.auto_axes(mesh), _axes(spec[0]), _axes(spec[2])


def expert_parallel_dispatch(x, weights, experts, gate, up, down, dtype, mesh, expert_axes,
                             mlp_axes):
    """`sorted_dispatch` with the experts split over `expert_axes` and F over `mlp_axes`,
    moving tokens to the experts by two all-to-alls.

    x [N, D], weights and experts [N, k]; gate, up [E, D, F], down [E, F, D]. Tokens are split
    over every mesh axis of size > 1 but `mlp_axes` (padded to a whole number per device).
    A device may have to send all its n tokens' picks to one device, at most min(k, E_local)
    per token, so each send buffer holds that many rows: nothing is ever dropped. The
    buffers (ep x that, of D floats) are the price; the unused rows cost no expert matmuls.
    """
    n, d = x.shape
    e = gate.shape[0]
    token_axes = tuple(a for a, size in mesh.shape.items() if size > 1 and a not in mlp_axes)
    devices = math.prod(mesh.shape[a] for a in token_axes)
    pad = -n % devices
    x = jnp.pad(x, ((0, pad), (0, 0)))
    weights = jnp.pad(weights, ((0, pad), (0, 0)))
    experts = jnp.pad(experts, ((0, pad), (0, 0)), constant_values=e)  # padding: no expert
    ep = math.prod(mesh.shape[a] for a in expert_axes)
    axis = expert_axes[0] if len(expert_axes) == 1 else expert_axes
    mlp = mlp_axes or None
    replicated = tuple(a for a in token_axes if a not in expert_axes)  # the weights' copies

    def local(x, weights, experts, gate, up, down):  # x [n, D]; gate [E/ep, D, F/tp]
        n, k = experts.shape
        el = gate.shape[0]
        capacity = n * min(k, el)  # rows one device may send to another
        flat = experts.reshape(-1)  # [A]
        to = flat // el  # [A] destination device; ep (nowhere) for padding
        sent = jax.nn.one_hot(to, ep, dtype=jnp.int32)  # [A, ep]
        row = (jnp.cumsum(sent, 0) * sent).sum(1) - 1  # [A] its row in the send buffer
        source = x[jnp.repeat(jnp.arange(n), k)]  # [A, D]
        send = jnp.zeros((ep, capacity, d), x.dtype).at[to, row].set(source, mode="drop")
        local_expert = jnp.full((ep, capacity), el, jnp.int32).at[to, row].set(
            flat % el, mode="drop")  # [ep, C]; el: an unused row
        received = jax.lax.all_to_all(send, axis, 0, 0)  # [ep, C, D]: block j from device j
        received_expert = jax.lax.all_to_all(local_expert, axis, 0, 0).reshape(-1, 1)
        # Rows and weights cast here to vary over every axis, outside the blocks' lax.cond:
        # left implicit, the cast would sit inside it, and its transpose (the weights'
        # gradient summed over the token axes, a collective) would run only on the devices
        # that take the branch, and hang.
        if mlp:  # the same rows on each device of mlp_axes, each with its slice of F
            received = jax.lax.pcast(received, mlp_axes, to="varying")
        gate, up, down = (jax.lax.pcast(w, replicated, to="varying") if replicated else w
                          for w in (gate, up, down))
        out = sorted_dispatch(received.reshape(-1, d), jnp.ones(received_expert.shape, x.dtype),
                              received_expert, gate, up, down, dtype, skip_none=True)
        if mlp:
            out = jax.lax.psum(out, mlp)  # each device summed over its slice of F
        back = jax.lax.all_to_all(out.reshape(ep, capacity, d), axis, 0, 0)  # [ep, C, D]
        y = back.at[to, row].get(mode="fill", fill_value=0)  # [A, D]
        return (y.reshape(n, k, d) * weights[..., None]).sum(1)  # [n, D]

    tokens = P(token_axes)
    w_in, w_out = P(expert_axes, None, mlp), P(expert_axes, mlp, None)
    run = jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_in, w_in, w_out),
                        out_specs=tokens)
    return run(x, weights, experts, gate, up, down)[:n]


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
        layout = expert_parallel_layout(e, d, f) if self.dispatch == "sorted" else None
        if layout is not None:
            routed = expert_parallel_dispatch(flat, weights, experts, gate, up, down,
                                              self.dtype, *layout)  # [N, D]
        else:
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
