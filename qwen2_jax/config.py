"""Qwen2Config: the architecture, read from and written to Hugging Face `config.json`.

Two dialects of `config.json` exist. Published checkpoints use the transformers-4 keys
(`rope_theta`, `rope_scaling` with `type` or `rope_type`, `max_window_layers`, `torch_dtype`);
files saved by transformers 5 carry `rope_parameters` (with `rope_theta` inside), `layer_types`
and `dtype`. `from_hf` reads both and remembers which of those keys the file used (`hf_keys`),
so `to_hf` writes the same dialect back: a round trip changes no key of the file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from flax.core import FrozenDict

SUPPORTED_MODEL_TYPES = ("qwen2", "qwen2_moe")
SUPPORTED_ROPE_TYPES = ("default", "yarn")
SUPPORTED_ACTIVATIONS = ("silu",)
LAYER_TYPES = ("full_attention", "sliding_attention")

# Qwen2-MoE's fields: written back to config.json only for model_type qwen2_moe.
MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
              "shared_expert_intermediate_size", "norm_topk_prob", "decoder_sparse_step",
              "mlp_only_layers", "router_aux_loss_coef", "output_router_logits")

# Keys whose spelling differs between dialects; `hf_keys` records which ones a file used.
_DIALECT_KEYS = ("rope_theta", "rope_scaling", "rope_parameters", "torch_dtype", "dtype")


class ConfigError(ValueError):
    """A config.json that this library cannot run, with what was found and what is expected."""


# The architecture keys every config.json that transformers writes has: a file without one is
# broken, and a default would silently build another model.
REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads")
REQUIRED_MOE_FIELDS = ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                       "shared_expert_intermediate_size")


def is_int(value: Any) -> bool:
    """A JSON integer (true/false are not); shared with generation_config.json's checks."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite JSON number (integers included, true/false not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# What a scalar field must be, as the error states it, and the test.
_EXPECTED = {
    "a positive integer": lambda v: is_int(v) and v > 0,
    "a non-negative integer": lambda v: is_int(v) and v >= 0,
    "a positive number": lambda v: is_number(v) and v > 0,
    "a non-negative number": lambda v: is_number(v) and v >= 0,
    "a number in [0, 1]": lambda v: is_number(v) and 0 <= v <= 1,
    "a number >= 1": lambda v: is_number(v) and v >= 1,
    "a number": is_number,
    "true or false": lambda v: isinstance(v, bool),
}
# Checked before anything computes with them (head_dim and sliding_window may also be null).
_FIELD_EXPECTED = {
    **dict.fromkeys(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"),
                    "a positive integer"),
    "max_window_layers": "a non-negative integer",
    "rms_norm_eps": "a positive number",
    "rope_theta": "a positive number",
    "initializer_range": "a non-negative number",
    "router_aux_loss_coef": "a non-negative number",
    "attention_dropout": "a number in [0, 1]",
    **dict.fromkeys(("tie_word_embeddings", "use_sliding_window", "norm_topk_prob",
                     "output_router_logits"), "true or false"),
}
# The YaRN keys rope.py reads; each may be absent or null.
_YARN_EXPECTED = {"factor": "a number >= 1",
                  "original_max_position_embeddings": "a positive integer",
                  **dict.fromkeys(("beta_fast", "beta_slow", "attention_factor", "mscale",
                                   "mscale_all_dim"), "a number"),
                  "truncate": "true or false"}
_JSON_KINDS = {str: "a string", bool: "a boolean", type(None): "null", tuple: "a list",
               list: "a list", dict: "an object", FrozenDict: "an object"}


def _got(value: Any) -> str:
    """`value` as an error shows it, with its JSON type where that is the mistake."""
    kind = _JSON_KINDS.get(type(value))
    return f"got {_thaw(value)!r}" + (f" ({kind})" if kind else "")


def _check(name: str, value: Any, expected: str) -> None:
    """Raises ConfigError unless `value` is what `expected` (a key of _EXPECTED) says."""
    if not _EXPECTED[expected](value):
        raise ConfigError(f"{name} must be {expected}, {_got(value)}")


def _freeze(value: Any) -> Any:
    """Makes JSON values hashable (the config is a static argument of jitted functions)."""
    if isinstance(value, dict):
        return FrozenDict({k: _freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    if isinstance(value, FrozenDict | dict):
        return {k: _thaw(v) for k, v in value.items()}
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    """Every field of transformers' `Qwen2Config`, with its defaults.

    `rope_scaling` is the scaling dict exactly as the source spelled it (`type` or `rope_type`),
    without `rope_theta`; None for plain RoPE. `hf_keys` are the dialect-specific keys the source
    file used (see the module docstring). `layer_types` is None when the source did not list
    them (then transformers derives them from `use_sliding_window` and `max_window_layers`).
    `extra` keeps every other key of the source file (architectures, transformers_version, ...)
    so nothing is lost on the way back.
    """

    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 22016
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 32  # transformers' default; None means = heads
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: FrozenDict | None = None
    use_sliding_window: bool = False
    sliding_window: int | None = 4096
    max_window_layers: int = 28
    layer_types: tuple[str, ...] | None = None
    attention_dropout: float = 0.0
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | tuple[int, ...] | None = None
    dtype: str | None = None
    model_type: str = "qwen2"
    # Qwen2-MoE (model_type qwen2_moe; transformers' Qwen2MoeConfig defaults).
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    shared_expert_intermediate_size: int = 5632
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001
    # SFT adds router_aux_loss_coef * the load-balancing loss (train/step.py), as transformers'
    # training loss does when this is set.
    output_router_logits: bool = False
    hf_keys: tuple[str, ...] = ("rope_theta", "rope_scaling", "torch_dtype")
    extra: FrozenDict = dataclasses.field(default_factory=FrozenDict, compare=False)

    def __post_init__(self):
        for name in ("rope_scaling", "layer_types", "eos_token_id", "extra", "mlp_only_layers"):
            object.__setattr__(self, name, _freeze(getattr(self, name)))
        if self.num_key_value_heads is None:
            object.__setattr__(self, "num_key_value_heads", self.num_attention_heads)
        self.validate()

    # ----- derived quantities -----------------------------------------------------------------

    @property
    def head_size(self) -> int:
        """Per-head dimension H: `head_dim` when the file gives one, else hidden / heads."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rope_type(self) -> str:
        if not self.rope_scaling:
            return "default"
        return self.rope_scaling.get("rope_type", self.rope_scaling.get("type", "default"))

    @property
    def layer_windows(self) -> tuple[int, ...]:
        """Sliding-window size of each layer, 0 for full attention.

        Exactly transformers' rule: a layer slides iff its layer type is `sliding_attention`
        (derived as `use_sliding_window and i >= max_window_layers` when the file lists no
        layer types) and `use_sliding_window` is set (transformers drops `sliding_window`
        otherwise, whatever `layer_types` says).
        """
        if not self.use_sliding_window or self.sliding_window is None:
            return (0,) * self.num_hidden_layers
        types = self.layer_types or tuple(
            "sliding_attention" if i >= self.max_window_layers else "full_attention"
            for i in range(self.num_hidden_layers)
        )
        return tuple(self.sliding_window if t == "sliding_attention" else 0 for t in types)

    @property
    def sparse_layers(self) -> tuple[bool, ...]:
        """Whether each layer's MLP is the sparse MoE block, as transformers decides it."""
        if self.model_type != "qwen2_moe":
            return (False,) * self.num_hidden_layers
        return tuple(i not in self.mlp_only_layers and self.num_experts > 0
                     and (i + 1) % self.decoder_sparse_step == 0
                     for i in range(self.num_hidden_layers))

    @property
    def uniform_layers(self) -> bool:
        """All layers have the same parameters (so they stack and scan)."""
        return len(set(self.sparse_layers)) == 1

    # ----- validation ---------------------------------------------------------------------------

    def validate(self) -> None:
        """Raises ConfigError naming the field, the value found and what is expected."""
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"model_type {self.model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)} (Qwen2 dense and MoE causal LMs; qwen2_vl, "
                "llama and other families are out of scope)"
            )
        for name, expected in _FIELD_EXPECTED.items():
            _check(name, getattr(self, name), expected)
        if self.head_dim is not None:
            _check("head_dim", self.head_dim, "a positive integer")
        if self.sliding_window is not None:  # Qwen2-MoE writes 0 when not sliding
            _check("sliding_window", self.sliding_window,
                   "a positive integer" if self.use_sliding_window else "a non-negative integer")
        rope_key = "rope_parameters" if "rope_parameters" in self.hf_keys else "rope_scaling"
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, FrozenDict):
            raise ConfigError(f"{rope_key} must be an object or null, {_got(self.rope_scaling)}")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads} (and no head_dim is given)"
            )
        if self.head_size % 2:
            raise ConfigError(f"head_dim={self.head_size} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads={self.num_attention_heads} is not divisible by "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported; expected silu")
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(
                f"rope scaling type {self.rope_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        if self.rope_type == "yarn":
            for key, expected in _YARN_EXPECTED.items():
                if self.rope_scaling.get(key) is not None:
                    _check(f"{rope_key}.{key}", self.rope_scaling[key], expected)
            if self.rope_scaling.get("factor") is None and (
                self.rope_scaling.get("original_max_position_embeddings") is None
            ):
                raise ConfigError(
                    "yarn rope_scaling needs `factor` or `original_max_position_embeddings`")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(
                    f"layer_types has {len(self.layer_types)} entries; expected num_hidden_layers="
                    f"{self.num_hidden_layers}"
                )
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(f"layer_types has {unknown}; expected only {list(LAYER_TYPES)}")
        if self.model_type == "qwen2_moe":
            _check("num_experts", self.num_experts, "a non-negative integer")
            _check("decoder_sparse_step", self.decoder_sparse_step, "a positive integer")
        if any(self.sparse_layers):
            for name in ("num_experts_per_tok", "moe_intermediate_size",
                         "shared_expert_intermediate_size"):
                _check(name, getattr(self, name), "a positive integer")
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"num_experts_per_tok={self.num_experts_per_tok} exceeds "
                                  f"num_experts={self.num_experts}")

    # ----- Hugging Face config.json -------------------------------------------------------------

    @classmethod
    def from_hf(cls, config: dict[str, Any]) -> Qwen2Config:
        """Builds the config from a parsed `config.json` of either dialect."""
        if "model_type" not in config:
            raise ConfigError("config.json has no model_type; expected 'qwen2'")
        fields = {f.name for f in dataclasses.fields(cls)} - {"hf_keys", "extra", "dtype"}
        kwargs = {k: v for k, v in config.items() if k in fields and k not in _DIALECT_KEYS}
        extra = {k: v for k, v in config.items() if k not in fields and k not in _DIALECT_KEYS}
        theta = config.get("rope_theta", 10000.0)
        scaling = config.get("rope_scaling")
        if "rope_parameters" in config:
            if not isinstance(config["rope_parameters"] or {}, dict):
                raise ConfigError("rope_parameters must be an object or null, "
                                  + _got(config["rope_parameters"]))
            rope = dict(config["rope_parameters"] or {})
            theta = rope.pop("rope_theta", theta)
            scaling = rope if rope not in ({}, {"rope_type": "default"}) else None
        dtypes = {config[k] for k in ("torch_dtype", "dtype") if config.get(k) is not None}
        if len(dtypes) > 1:
            raise ConfigError(f"torch_dtype and dtype disagree: {sorted(dtypes)}")
        return cls(**kwargs, rope_theta=theta, rope_scaling=scaling,
                   dtype=dtypes.pop() if dtypes else None,
                   hf_keys=tuple(k for k in _DIALECT_KEYS if k in config), extra=extra)

    def to_hf(self) -> dict[str, Any]:
        """The `config.json` dict, with the keys the source file used."""
        out = dict(_thaw(self.extra))
        skip = {"rope_theta", "rope_scaling", "dtype", "hf_keys", "extra", "layer_types", "head_dim"}
        if self.model_type != "qwen2_moe":
            skip |= set(MOE_FIELDS)
        for f in dataclasses.fields(self):
            if f.name not in skip:
                out[f.name] = _thaw(getattr(self, f.name))
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        if self.layer_types is not None:
            out["layer_types"] = list(self.layer_types)
        scaling = _thaw(self.rope_scaling)
        values = {
            "rope_theta": self.rope_theta,
            "rope_scaling": scaling,
            "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": self.rope_theta},
            "torch_dtype": self.dtype,
            "dtype": self.dtype,
        }
        out.update((k, values[k]) for k in self.hf_keys)
        return out

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Qwen2Config:
        """Reads `config.json` (or a folder holding one). Unlike `from_hf` on a dict, refuses a
        file without an architecture key (REQUIRED_FIELDS) instead of taking a default."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"{path}: no such file; a model folder needs a config.json")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        try:
            _check_required(data)
            return cls.from_hf(data)
        except (ConfigError, TypeError) as e:
            raise ConfigError(f"{path}: {e}") from e


def _check_required(data: dict[str, Any]) -> None:
    """Refuses a config.json without an architecture key (Python callers may rely on defaults)."""
    model_type = data.get("model_type")
    required = REQUIRED_FIELDS + (REQUIRED_MOE_FIELDS if model_type == "qwen2_moe" else ())
    missing = [k for k in required if k not in data]
    if model_type in SUPPORTED_MODEL_TYPES and missing:
        family = "Qwen2-MoE" if model_type == "qwen2_moe" else "Qwen2"
        raise ConfigError(f"missing required fields: {', '.join(missing)} (a {family} config.json "
                          "from transformers always has them)")


def _preset(**kwargs: Any) -> Qwen2Config:
    common = dict(rope_theta=1000000.0, rms_norm_eps=1e-6, max_position_embeddings=131072,
                  use_sliding_window=False, sliding_window=131072, bos_token_id=151643,
                  eos_token_id=151643, dtype="bfloat16", hidden_act="silu",
                  extra={"architectures": ["Qwen2ForCausalLM"]})
    return Qwen2Config(**{**common, **kwargs})


# The published shapes of the Qwen2 base models (their config.json on the Hugging Face hub).
PRESETS: dict[str, Qwen2Config] = {
    "Qwen2-0.5B": _preset(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                          num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                          max_window_layers=24, tie_word_embeddings=True),
    "Qwen2-1.5B": _preset(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                          num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                          max_window_layers=28, tie_word_embeddings=True),
    "Qwen2-7B": _preset(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                        max_window_layers=28, tie_word_embeddings=False),
    # 64 routed experts (top-8, 2560 wide) and a 20480-wide shared expert in every layer.
    "Qwen2-57B-A14B": _preset(model_type="qwen2_moe", hidden_size=3584, intermediate_size=18944,
                              num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                              vocab_size=151936, max_window_layers=28, tie_word_embeddings=False,
                              num_experts=64, num_experts_per_tok=8, moe_intermediate_size=2560,
                              shared_expert_intermediate_size=20480, norm_topk_prob=False,
                              decoder_sparse_step=1, mlp_only_layers=(),
                              router_aux_loss_coef=0.001,
                              extra={"architectures": ["Qwen2MoeForCausalLM"]}),
    "Qwen2-72B": _preset(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                         num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                         max_window_layers=80, tie_word_embeddings=False, rms_norm_eps=1e-5),
}
