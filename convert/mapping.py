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
    layer: int | None  # index on the stacked L axis, None for non-layer tensors
    hf_shape: tuple[int, ...]
    our_shape: tuple[int, ...]  # per layer (without L)
    transpose: bool
    dims: str  # the config fields behind hf_shape, for error messages

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
    """Every tensor of a Qwen2ForCausalLM checkpoint for this config, in file order."""
    c = config
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    n, k, h = c.num_attention_heads, c.num_key_value_heads, c.head_size
    heads = f"num_attention_heads={n}, head_dim={h}, hidden_size={d}"
    kv_heads = f"num_key_value_heads={k}, head_dim={h}, hidden_size={d}"
    mlp = f"intermediate_size={f}, hidden_size={d}"

    rules = [TensorRule("model.embed_tokens.weight", ("embed_tokens", "embedding"), None,
                        (v, d), (v, d), False, f"vocab_size={v}, hidden_size={d}")]
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."

        def rule(name, path, hf_shape, our_shape, transpose, dims, p=p, i=i):
            return TensorRule(p + name, ("layers", *path), i, hf_shape, our_shape, transpose, dims)

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
            rule("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (f, d), (d, f), True, mlp),
            rule("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (f, d), (d, f), True, mlp),
            rule("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (d, f), (f, d), True, mlp),
        ]
    rules.append(TensorRule("model.norm.weight", ("norm", "scale"), None, (d,), (d,), False,
                            f"hidden_size={d}"))
    if not c.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head", "embedding"), None, (v, d), (v, d),
                                False, f"vocab_size={v}, hidden_size={d}"))
    return rules


def is_ignorable(name: str, config: Qwen2Config) -> bool:
    """Tensors some checkpoints carry that hold no information for us.

    A tied checkpoint may still store `lm_head.weight` (a copy of the embedding); old exports
    store rotary `inv_freq` buffers, which we recompute from the config.
    """
    return (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith(
        "rotary_emb.inv_freq"
    )
