"""The one table between Hugging Face tensor names and our parameter paths.

Each rule states the HF name and shape (torch Linear: [out, in]), our path and per-layer
shape, and whether the 2-D HF matrix is transposed; `hf_groups` derives which of our dims each
HF dim unflattens into, so the layout is stated once (loading reads slices through it).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from qwen2_jax.config import Qwen2Config


@dataclasses.dataclass(frozen=True)
class TensorRule:
    hf_name: str
    path: tuple[str, ...]  # our path in the param pytree
    stack: tuple[int, ...]  # index on the leading stacked axes ([L] or [L, E]); () if none
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]  # per layer (without L)
    transpose: bool
    dims: str  # the config fields behind hf_shape, for error messages

    @property
    def layer(self) -> int | None:
        return self.stack[0] if self.stack else None

    def hf_groups(self) -> list[tuple[int, ...]]:
        """For each HF dim (in HF order), the consecutive dims of our shape it unflattens into.

        q_proj: HF [N*H, D] -> ours [D, N, H] gives [(1, 2), (0,)].
        """
        hf_dims = self.hf_shape[::-1] if self.transpose else self.hf_shape
        groups, d = [], 0
        for size in hf_dims:
            group, covered = [d], self.our_shape[d]
            d += 1
            while covered != size:
                covered *= self.our_shape[d]
                group.append(d)
                d += 1
            groups.append(tuple(group))
        groups[-1] += tuple(range(d, len(self.our_shape)))  # trailing size-1 dims
        return groups[::-1] if self.transpose else groups

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        """One layer's tensor from our layout back to HF's (a view; the inverse of reading)."""
        if self.transpose:
            return ours.reshape(self.hf_shape[::-1]).T
        return ours.reshape(self.hf_shape)


def tensor_rules(config: Qwen2Config) -> list[TensorRule]:
    """Every tensor of a Qwen2ForCausalLM / Qwen2MoeForCausalLM checkpoint for this config.

    Routed experts (`mlp.experts.J.*`) stack along a second leading axis of our
    `mlp/experts/*` arrays ([L, E, ...]), after the layer axis."""
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_size
    heads = f"num_attention_heads={n}, head_dim={h}, hidden_size={d}"
    kv_heads = f"num_key_value_heads={k}, head_dim={h}, hidden_size={d}"
    mlp = f"intermediate_size={f}, hidden_size={d}"

    rules = [TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding"), (),
                        (v, d), (v, d), False, f"vocab_size={v}, hidden_size={d}")]
    stacked = c.uniform_layers  # else each layer is its own subtree `layers_i` (model.py)
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."

        def rule(name, path, hf_shape, our_shape, transpose, dims, p=p, i=i, expert=()):
            where = ("layers", *path) if stacked else (f"layers_{i}", *path)
            return TensorRule(p + name, where, ((i,) if stacked else ()) + expert, hf_shape,
                              our_shape, transpose, dims)

        rules += [
            rule("input_layernorm.weight", ("input_layernorm", "scale"), (d,), (d,), False,
                 f"hidden_size={d}"),
            rule("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (n * h, d),
                 (d, n, h), True, heads),
            rule("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (n * h,), (n, h),
                 False, heads),
            rule("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (k * h, d),
                 (d, k, h), True, kv_heads),
            rule("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (k * h,), (k, h),
                 False, kv_heads),
            rule("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (k * h, d),
                 (d, k, h), True, kv_heads),
            rule("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (k * h,), (k, h),
                 False, kv_heads),
            rule("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (d, n * h),
                 (n, h, d), True, heads),
            rule("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (d,),
                 (d,), False, f"hidden_size={d}"),
        ]
        if not c.sparse_layers[i]:
            rules += _mlp_rules(rule, "mlp", ("mlp",), f, d, mlp)
            continue
        e, fe, fs = c.num_experts, c.moe_intermediate_size, c.shared_expert_intermediate_size
        rules.append(rule("mlp.gate.weight", ("mlp", "gate", "kernel"), (e, d), (d, e), True,
                          f"num_experts={e}, hidden_size={d}"))
        moe = f"moe_intermediate_size={fe}, hidden_size={d}"
        for j in range(e):
            rules += [
                rule(f"mlp.experts.{j}.gate_proj.weight", ("mlp", "experts", "gate_proj"),
                     (fe, d), (d, fe), True, moe, expert=(j,)),
                rule(f"mlp.experts.{j}.up_proj.weight", ("mlp", "experts", "up_proj"),
                     (fe, d), (d, fe), True, moe, expert=(j,)),
                rule(f"mlp.experts.{j}.down_proj.weight", ("mlp", "experts", "down_proj"),
                     (d, fe), (fe, d), True, moe, expert=(j,)),
            ]
        rules += _mlp_rules(rule, "mlp.shared_expert", ("mlp", "shared_expert"), fs, d,
                            f"shared_expert_intermediate_size={fs}, hidden_size={d}")
        rules.append(rule("mlp.shared_expert_gate.weight", ("mlp", "shared_expert_gate", "kernel"),
                          (1, d), (d, 1), True, f"hidden_size={d}"))
    rules.append(TensorRule("model.norm.weight", ("norm", "scale"), (), (d,), (d,), False,
                            f"hidden_size={d}"))
    if not c.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "embedding"), (), (v, d), (v, d),
                                False, f"vocab_size={v}, hidden_size={d}"))
    return rules


def _mlp_rules(rule, hf_prefix: str, path: tuple[str, ...], f: int, d: int, dims: str) -> list:
    """A SwiGLU MLP's three kernels (HF [out, in], ours [in, out])."""
    return [
        rule(f"{hf_prefix}.gate_proj.weight", (*path, "gate_proj", "kernel"), (f, d), (d, f), True,
             dims),
        rule(f"{hf_prefix}.up_proj.weight", (*path, "up_proj", "kernel"), (f, d), (d, f), True,
             dims),
        rule(f"{hf_prefix}.down_proj.weight", (*path, "down_proj", "kernel"), (d, f), (f, d), True,
             dims),
    ]


def is_ignorable(name: str, config: Qwen2Config) -> bool:
    """Tensors some checkpoints carry that hold no information for us.

    A tied checkpoint may still store `lm_head.weight` (a copy of the embedding); old exports
    store rotary `inv_freq` buffers, which we recompute from the config.
    """
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(
        "rotary_emb.inv_freq"
    )


def stacked_groups(rules: list[TensorRule]) -> dict[tuple[str, ...], dict[tuple[int, ...], TensorRule]]:
    """Rules by param path, then by stack index; each path's array is
    [*stack extent, *our_shape] (see `stacked_shape`)."""
    groups: dict[tuple[str, ...], dict[tuple[int, ...], TensorRule]] = {}
    for rule in rules:
        groups.setdefault(rule.path, {})[rule.stack] = rule
    return groups


def stacked_shape(group: dict[tuple[int, ...], TensorRule]) -> tuple[int, ...]:
    """The full array shape of one path: stack extents, then the per-item shape."""
    first = next(iter(group.values()))
    extents = tuple(max(index[i] for index in group) + 1 for i in range(len(first.stack)))
    return extents + first.our_shape
