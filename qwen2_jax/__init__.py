"""qwen2-jax: the Qwen2 model family in JAX/Flax, numerically the same as transformers' Qwen2.

One dimension alphabet everywhere (einsums, shape comments, names):
B batch, T query length, S key length, D embed (hidden), F mlp (intermediate), N query heads,
K kv heads, G query heads per kv head, H head_dim, V vocab, L layers, E experts.

    config, params = qwen2_jax.load("path/to/hf_model")
    logits = qwen2_jax.forward(config, params, input_ids, attention_mask)
"""

from qwen2_jax.api import forward, init, load, param_logical_axes
from qwen2_jax.checkpoint.hf_io import CheckpointError
from qwen2_jax.config import PRESETS, ConfigError, Qwen2Config
from qwen2_jax.decoding import generate
from qwen2_jax.embedded import default_model

__version__ = "0.1.0"
__all__ = [
    "PRESETS",
    "CheckpointError",
    "ConfigError",
    "Qwen2Config",
    "default_model",
    "forward",
    "generate",
    "init",
    "load",
    "param_logical_axes",
]
