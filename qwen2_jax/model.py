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
from qwen2_jax.masks import cache_masks, causal_mask, sliding_window_mask
from qwen2_jax.moe import SparseMoE
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
    """Pre-norm block: `h = x + attn(norm(x))`, `y = h + mlp(norm(h))`; the MLP is the sparse
    MoE block when `sparse`."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sparse: bool = False
    moe_dispatch: str = "sorted"

    @nn.compact
    def __call__(self, x, scanned, cos, sin, full_mask, window_mask, cache_index):
        """x: [B, T, D]; scanned: (this layer's sliding-window flag, its (keys, values) cache
        [B, S, K, H] or None); masks: [B, T, S]. Returns (y, the updated cache or None)."""
        c = self.config
        sliding, cache = scanned
        mask = jnp.where(sliding, window_mask, full_mask)
        attn_in = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn = Attention(c, self.dtype, self.param_dtype, name="self_attn")(
            attn_in, cos, sin, mask, cache, cache_index)
        if cache is not None:
            attn, cache = attn
        h = x + attn
        mlp_in = RMSNorm(c.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(h)
        if self.sparse:
            mlp = SparseMoE(c, self.dtype, self.param_dtype, self.moe_dispatch, name="mlp")
        else:
            mlp = MLP(c.intermediate_size, c.initializer_range, self.dtype, self.param_dtype,
                      name="mlp")
        y = h + mlp(mlp_in)
        return constrain(y, ("batch", "length", "embed")), cache


class Qwen2ForCausalLM(nn.Module):
    """`apply({'params': p}, input_ids, positions, token_mask, segment_ids)` -> logits.

    All inputs int [B, T]. Returns float32 logits [B, T, V]. `dtype` is the compute dtype,
    `param_dtype` the storage dtype of freshly initialized parameters.

    With `cache` ({"k", "v"}: [L, B, S, K, H], see `cache.py`) and `cache_index` [B], row b's
    tokens are its next ones: at positions cache_index[b] + t, written into those cache slots,
    attending to every slot before (`positions`, `token_mask` and `segment_ids` are then
    ignored); returns (logits, updated cache). `logits_at` [B]: logits only at that index of
    each row, [B, V] (generation needs no others; the vocab projection is the largest matmul).
    """

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat: str = "none"
    # False: a Python loop over layers with params `layers_0`.. (see `unstack_layers`) and a
    # cache of per-layer arrays. Decoding on CPU runs ~2x faster so: XLA:CPU copies each
    # layer's weights out of the stacked array before its matmuls, tripling memory traffic.
    scan_layers: bool = True
    moe_dispatch: str = "sorted"  # or "dense": every expert on every token (the reference)

    @nn.compact
    def __call__(self, input_ids, positions, token_mask, segment_ids, cache=None,
                 cache_index=None, logits_at=None):
        c = self.config

        def table(name: str) -> Embedding:
            return Embedding(c.vocab_size, c.hidden_size, c.initializer_range, self.dtype,
                             self.param_dtype, name=name)

        embed_tokens = table("embed_tokens")
        x = embed_tokens(input_ids)  # [B, T, D]
        x = constrain(x, ("batch", "length", "embed"))

        windows = c.layer_windows
        window = max(windows)
        per_layer_cache = cache is not None and isinstance(cache["k"], tuple | list)
        if cache is None:
            full_mask = causal_mask(token_mask, segment_ids)  # [B, T, S]
            window_mask = sliding_window_mask(full_mask, window) if window else full_mask
        else:
            positions = cache_index[:, None] + jnp.arange(input_ids.shape[1])  # [B, T]
            slots = cache["k"][0].shape[1] if per_layer_cache else cache["k"].shape[2]
            full_mask, window_mask = cache_masks(positions, slots, window)
        cos, sin = rope_cos_sin(c, positions, self.dtype)  # [B, T, H]

        layer = DecoderLayer
        if REMAT_POLICIES[self.remat] is not None:
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        sliding = jnp.asarray([w > 0 for w in windows])  # [L]
        layer_cache = None if cache is None else (cache["k"], cache["v"])  # [L, B, S, K, H]
        sparse = c.sparse_layers
        if self.scan_layers and c.uniform_layers:
            layers = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.param_dtype, sparse[0], self.moe_dispatch, name="layers")
            x, layer_cache = layers(x, (sliding, layer_cache), cos, sin, full_mask,
                                    window_mask, cache_index)
        else:  # a Python loop; layer i's cache is layer_cache[.][i]: [B, S, K, H]
            updated = []
            for i in range(c.num_hidden_layers):
                this_cache = None if cache is None else (layer_cache[0][i], layer_cache[1][i])
                x, this_cache = layer(c, self.dtype, self.param_dtype, sparse[i],
                                      self.moe_dispatch, name=f"layers_{i}")(
                    x, (sliding[i], this_cache), cos, sin, full_mask, window_mask, cache_index)
                updated.append(this_cache)
            if cache is not None:
                layer_cache = tuple(zip(*updated, strict=True))
                if not per_layer_cache:
                    layer_cache = tuple(jnp.stack(c_) for c_ in layer_cache)

        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(x)
        lm_head = embed_tokens if c.tie_word_embeddings else table("lm_head")
        logits = constrain(lm_head.attend(x), ("batch", "length", "vocab"))  # [B, T, V]
        if logits_at is not None:
            logits = logits[:, 0]  # [B, V]
        if cache is None:
            return logits
        return logits, {"k": layer_cache[0], "v": layer_cache[1]}
