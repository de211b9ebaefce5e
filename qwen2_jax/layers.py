"""Building blocks shared by the decoder layers: parameters with logical axes, RMSNorm, SwiGLU."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax import lora, quantize
from qwen2_jax.sharding import constrain

Dtype = Any


def precision(dtype: Dtype) -> jax.lax.Precision | None:
    """Float32 compute means float32 matmuls: without HIGHEST, GPUs use TF32 and TPUs bf16
    passes (~1e-2 off transformers' float32). Other dtypes keep the backend's default."""
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def compute_dtype(params: dict) -> jnp.dtype:
    """The float dtype params were loaded in (the final norm's: never quantized)."""
    return params["norm"]["scale"].dtype


def logical_param(module: nn.Module, name: str, init: Callable, shape: Sequence[int],
                  axes: tuple[str, ...], dtype: Dtype) -> jnp.ndarray:
    """A parameter whose every dimension carries a logical axis name (see sharding rules)."""
    assert len(axes) == len(shape), (name, shape, axes)
    return module.param(name, nn.with_logical_partitioning(init, axes), tuple(shape), dtype)


class RMSNorm(nn.Module):
    """`scale * (x32 * rsqrt(mean(x32^2) + eps)).astype(x.dtype)`: statistics in float32."""

    eps: float
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [..., D]
        scale = logical_param(self, "scale", nn.initializers.ones, (x.shape[-1],), ("embed",),
                              self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def check_token_ids(ids: np.ndarray, vocab_size: int, name: str) -> None:
    """Raises ValueError naming the first id of `ids` [B, T] outside [0, vocab_size).

    Called on host arrays before jit, because under jit the lookup cannot raise: `jnp.take`
    gives NaN rows for ids past the table and wraps negative ids around to its end.
    """
    bad = np.argwhere((ids < 0) | (ids >= vocab_size))
    if len(bad):
        row, col = bad[0]
        more = f"; {len(bad) - 1} more such ids" if len(bad) > 1 else ""
        raise ValueError(f"token id {ids[row, col]} at [{row}, {col}] of {name} is outside "
                         f"[0, {vocab_size}) (the model's vocab_size is {vocab_size}){more}")


class Embedding(nn.Module):
    """A [V, D] table: looked up for input ids, or multiplied for logits (the lm_head).
    Given `qembedding` and `qscale` instead of `embedding`, a quantized one (`quantize.py`)."""

    vocab_size: int
    hidden_size: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        if self.has_variable("params", "qembedding"):
            self.quantized = (self.get_variable("params", "qembedding"),  # [V, D] or [V, D/2]
                              self.get_variable("params", "qscale"))  # [V] or [V, D/GROUP]
            return
        self.quantized = None
        self.embedding = logical_param(self, "embedding", nn.initializers.normal(self.init_std),
                                       (self.vocab_size, self.hidden_size), ("vocab", "embed"),
                                       self.param_dtype)

    def __call__(self, ids: jnp.ndarray) -> jnp.ndarray:  # [B, T] -> [B, T, D]
        if self.quantized is not None:
            return quantize.quantized_lookup(*self.quantized, ids, self.dtype)
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D] -> float32 [B, T, V]
        if self.quantized is not None:
            return quantize.quantized_attend(x, *self.quantized, self.dtype,
                                             precision(self.dtype))
        return jnp.einsum("BTD,VD->BTV", x, self.embedding.astype(self.dtype),
                          preferred_element_type=jnp.float32, precision=precision(self.dtype))


class Linear(nn.Module):
    """`x @ kernel (+ bias)` over the trailing input dims of x; kernel is [*in, *features].

    Storing the kernel split by head (q: [D, N, H], o: [N, H, D]) lets tensor parallelism over
    heads be a sharding rule instead of a reshape. Given `qkernel` and `qscale` instead of
    `kernel`, a weight-only quantized one (`quantize.py`). Given `lora_a` and `lora_b`
    besides, plus a LoRA adapter's output (`lora.py`).
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]  # logical names of the kernel dims: input dims, then feature dims
    init_std: float
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        n_in = len(self.axes) - len(self.features)
        if self.has_variable("params", "qkernel"):
            y = quantize.quantized_dot(x, self.get_variable("params", "qkernel"),
                                       self.get_variable("params", "qscale"), n_in, self.dtype,
                                       precision(self.dtype))
        else:
            shape = (*x.shape[x.ndim - n_in:], *self.features)
            kernel = logical_param(self, "kernel", nn.initializers.normal(self.init_std), shape,
                                   self.axes, self.param_dtype)
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                    (contract, ((), ())), precision=precision(self.dtype))
        if self.use_bias:
            bias = logical_param(self, "bias", nn.initializers.zeros, self.features,
                                 self.axes[n_in:], self.param_dtype)
            y = y + bias.astype(self.dtype)
        if self.has_variable("params", "lora_a"):
            y = y + lora.delta(self, x, self.get_variable("params", "lora_a"),
                               self.get_variable("params", "lora_b"), n_in, self.dtype,
                               precision(self.dtype))
        return y


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(x)) * up(x))`, no biases."""

    intermediate_size: int
    init_std: float
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:  # [B, T, D]
        def linear(features: int, axes: tuple[str, str], name: str) -> Linear:
            return Linear((features,), axes, self.init_std, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)

        f, d = self.intermediate_size, x.shape[-1]
        gate = linear(f, ("embed", "mlp"), "gate_proj")(x)  # [B, T, F]
        up = linear(f, ("embed", "mlp"), "up_proj")(x)  # [B, T, F]
        hidden = constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
        return linear(d, ("mlp", "embed"), "down_proj")(hidden)  # [B, T, D]
