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


CACHE_NAMES = ("k", "v", "k_scale", "v_scale")  # the order `Attention` takes them in


class DecoderLayer(nn.Module):
    """Pre-norm block: `h = x + attn(norm(x))`, `y = h + mlp(norm(h))`; the MLP is the sparse
    MoE block when `sparse`."""

    config: Qwen2Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    sparse: bool = False
    moe_dispatch: str = "sorted"
    window: int = 0  # the attention window (0: none), when every layer has the same

    @nn.compact
    def __call__(self, carry, scanned, cos, sin, segments, cache_index, slot_rope=None):
        """carry: (x [B, T, D], the (keys, values) cache or None); scanned: (this layer's
        attention window when layers differ, else None; its index into a cache of every
        layer [L, B, K, S, H], or None for this layer's own [B, K, S, H]); segments: see
        `attention.attend`. Returns ((y, the updated cache), None): a scan body.

        The cache rides in the carry, not the scanned inputs, so each layer writes its new
        keys and values in place: scanning over it would copy the whole cache.
        """
        c = self.config
        x, cache = carry
        window, layer = scanned
        window = self.window if window is None else window
        attn_in = RMSNorm(c.rms_norm_eps, self.param_dtype, name="input_layernorm")(x)
        attn = Attention(c, self.dtype, self.param_dtype, name="self_attn")(
            attn_in, cos, sin, segments, window, cache, cache_index, layer, slot_rope)
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
        return (constrain(y, ("batch", "length", "embed")), cache), None


def lm_head(config: Qwen2Config, params: dict, dtype: Dtype = jnp.float32):
    """The vocab projection of `params` on its own: float32 logits [B, T, V] of final-normed
    hidden states [B, T, D] (`hidden_only`), the table tied to the embeddings or not."""
    name = "embed_tokens" if config.tie_word_embeddings else "lm_head"
    table = Embedding(config.vocab_size, config.hidden_size, config.initializer_range, dtype)
    return lambda x: table.apply({"params": params[name]}, x, method=Embedding.attend)


class Qwen2ForCausalLM(nn.Module):
    """`apply({'params': p}, input_ids, positions, token_mask, segment_ids)` -> logits.

    All inputs int [B, T]; token_mask and segment_ids may both be None (one unpadded
    sequence per row; positions may then be None too). Returns float32 logits [B, T, V].
    `dtype` is the compute dtype, `param_dtype` the storage dtype of freshly initialized
    parameters. `rope_scale` [B]: each row's YaRN factor (dynamic YaRN, `rope.py`); None:
    the config's.

    With `cache` ({"k", "v"}: [L, B, K, S, H], and "k_scale", "v_scale" [L, B, K, S] for an int8
    cache; see `decoding.init_cache`) and `cache_index` [B], row b's
    tokens are its next ones: at positions cache_index[b] + t, written into those cache slots,
    attending to every slot before (`positions`, `token_mask` and `segment_ids` are then
    ignored); returns (logits, updated cache). `logits_at` [B]: logits only at that index of
    each row, [B, V] (generation needs no others; the vocab projection is the largest matmul).
    `hidden_only`: the final-normed hidden states [B, T, D] instead of logits (the training
    loss applies the lm_head in chunks, `train/step.py`; see `lm_head`).
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
                 cache_index=None, logits_at=None, rope_scale=None, hidden_only=False):
        c = self.config

        def table(name: str) -> Embedding:
            return Embedding(c.vocab_size, c.hidden_size, c.initializer_range, self.dtype,
                             self.param_dtype, name=name)

        embed_tokens = table("embed_tokens")
        x = embed_tokens(input_ids)  # [B, T, D]
        x = constrain(x, ("batch", "length", "embed"))

        per_layer_cache = cache is not None and isinstance(cache["k"], tuple | list)
        cache_names = None if cache is None else tuple(n for n in CACHE_NAMES if n in cache)
        segments = None
        if cache is not None:
            positions = cache_index[:, None] + jnp.arange(input_ids.shape[1])  # [B, T]
        elif token_mask is not None:
            # Padding gets a segment of its own: no real token sees it, and it sees only
            # padding (never an empty row, which the TPU kernel refuses).
            segments = jnp.where(token_mask != 0, segment_ids, jnp.iinfo(jnp.int32).min)
        elif positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1]), input_ids.shape)
        cos, sin = rope_cos_sin(c, positions, self.dtype, rope_scale)  # [B, T, H]

        slot_rope = None  # an int8 cache's keys get their rotated bias back (`Attention`)
        if cache is not None and len(cache_names) == 4:
            slots = cache["k"][0].shape[2] if per_layer_cache else cache["k"].shape[3]
            slot_positions = jnp.broadcast_to(jnp.arange(slots), (x.shape[0], slots))  # [B, S]
            slot_rope = rope_cos_sin(c, slot_positions, self.dtype, rope_scale)  # [B, S, H]

        layer = DecoderLayer
        if REMAT_POLICIES[self.remat] is not None:
            layer = nn.remat(layer, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        windows = c.layer_windows
        # One window for all layers stays a static int (the accelerator kernels need that);
        # differing ones are scanned over with the layers.
        uniform = len(set(windows)) == 1
        static_window = windows[0] if uniform else 0
        # [L, B, K, S, H] keys and values (and [L, B, K, S] scales)
        layer_cache = None if cache is None else tuple(cache[n] for n in cache_names)
        sparse = c.sparse_layers
        if self.scan_layers and c.uniform_layers:
            layers = nn.scan(
                layer,
                variable_axes={"params": 0, "intermediates": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast,
                         nn.broadcast),
                length=c.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )(c, self.dtype, self.param_dtype, sparse[0], self.moe_dispatch, static_window,
              name="layers")
            layer_window = None if uniform else jnp.asarray(windows)  # [L]
            layer_index = None if cache is None else jnp.arange(c.num_hidden_layers)  # [L]
            (x, layer_cache), _ = layers((x, layer_cache), (layer_window, layer_index), cos,
                                         sin, segments, cache_index, slot_rope)
        else:  # a Python loop; layer i's cache is layer_cache[.][i]: [B, K, S, H]
            updated = []
            for i in range(c.num_hidden_layers):
                this_cache = None if cache is None else tuple(c_[i] for c_ in layer_cache)
                (x, this_cache), _ = layer(c, self.dtype, self.param_dtype, sparse[i],
                                           self.moe_dispatch, windows[i], name=f"layers_{i}")(
                    (x, this_cache), (None, None), cos, sin, segments, cache_index, slot_rope)
                updated.append(this_cache)
            if cache is not None:
                layer_cache = tuple(zip(*updated, strict=True))
                if not per_layer_cache:
                    layer_cache = tuple(jnp.stack(c_) for c_ in layer_cache)

        if logits_at is not None:
            x = x[jnp.arange(x.shape[0]), logits_at][:, None]  # [B, 1, D]
        x = RMSNorm(c.rms_norm_eps, self.param_dtype, name="norm")(x)
        if hidden_only:
            return x
        lm_head = embed_tokens if c.tie_word_embeddings else table("lm_head")
        logits = constrain(lm_head.attend(x), ("batch", "length", "vocab"))  # [B, T, V]
        if logits_at is not None:
            logits = logits[:, 0]  # [B, V]
        if cache is None:
            return logits
        return logits, dict(zip(cache_names, layer_cache, strict=True))
