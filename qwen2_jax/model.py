"""The dense Qwen2 causal LM as Flax linen modules, layers scanned.

Parameters (a plain nested dict; paths mirror the Hugging Face names, `layers` stacked on a
leading L axis by the scan):

    embed_tokens/embedding             [V, D]
    layers/input_layernorm/scale       [L, D]
    layers/self_attn/q_proj/kernel     [L, D, N, H]   q_proj/bias [L, N, H]
    layers/self_attn/{k,v}_proj/kernel [L, D, K, H]   {k,v}_proj/bias [L, K, H]
    layers/self_attn/o_proj/kernel     [L, N, H, D]
    layers/post_attention_layernorm/scale [L, D]
    layers/mlp/{gate,up}_proj/kernel   [L, D, F]
    layers/mlp/down_proj/kernel        [L, F, D]
    norm/scale                         [D]
    lm_head/embedding                  [V, D]         (absent when embeddings are tied)
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwen2_jax.attention import Attention
from qwen2_jax.config import Qwen2Config
from qwen2_jax.layers import MLP, Dtype, Embedding, RMSNorm
from qwen2_jax.masks import causal_mask, sliding_window_mask
from qwen2_jax.rope import rope_cos_sin
from qwen2_jax.sharding import constrain

# What the backward pass keeps of each layer; the rest is recomputed. "none": keep everything
# (no remat); "full": keep only the layer inputs; "dots": keep matmul outputs;
# "dots_no_batch": keep matmul outputs that have no batch dimension (weights-like).
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


class DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `y = h + mlp(norm(h))`."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, sliding, cos, sin, full_mask, window_mask):
        """x: [B, T, D]; sliding: bool scalar (this layer's window flag); masks: [B, T, S]."""
        c = self.config
        mask = jnp.where(sliding, window_mask, full_mask)
        attn_in = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        h = x + Attention(c, self.dtype, self.param_dtype, name="self_attn")(attn_in, cos, sin, mask)
        mlp_in = RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(h)
        y = h + MLP(c.intermediate_size, c.initializer_range, self.dtype, self.param_dtype,
                    name="mlp")(mlp_in)
        return constrain(y, ("batch", "length", "embed")), None


class Qwen2ForCausalLM(nn.Module):
    """`apply({'params': p}, input_ids, positions, token_mask, segment_ids)` -> logits.

    All inputs int [B, T]. Returns float32 logits [B, T, V]. `dtype` is the compute dtype,
    `param_dtype` the storage dtype of freshly initialized parameters.
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"

    @nn.compact
    def __call__(self, input_ids, positions, token_mask, segment_ids):
        c = self.config

        def table(name: str) -> Embedding:
            return Embedding(c.vocab_size, c.hidden_size, c.initializer_range, self.dtype,
                             self.param_dtype, name=name)

        embed_tokens = table("embed_tokens")
        x = embed_tokens(input_ids)  # [B, T, D]
        x = constrain(x, ("batch", "length", "embed"))

        cos, sin = rope_cos_sin(c, positions, self.dtype)  # [B, T, H]
        full_mask = causal_mask(token_mask, segment_ids)  # [B, T, S]
        windows = c.layer_windows
        window = max(windows)
        window_mask = sliding_window_mask(full_mask, window) if window else full_mask

        layer = DecoderLayer
        if REMAT_POLICIES[self.remat] is not None:
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        layers = nn.scan(
            layer,
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
            length=c.num_hidden_layers,
            metadata_params={nn.PARTITION_NAME: "layers"},
        )(c, self.dtype, self.param_dtype, name="layers")
        sliding = jnp.asarray([w > 0 for w in windows])  # [L]
        x, _ = layers(x, sliding, cos, sin, full_mask, window_mask)

        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(x)
        lm_head = embed_tokens if c.tie_word_embeddings else table("lm_head")
        logits = lm_head.attend(x)  # [B, T, V]
        return constrain(logits, ("batch", "length", "vocab"))
