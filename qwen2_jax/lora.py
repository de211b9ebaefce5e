"""LoRA adapters on our per-head layouts, in PEFT's format both ways.

A LoRA adapter adds `scale * dropout(x) @ A @ B` to a projection `x @ kernel`, with A
[*in, R] and B [R, *out] on the kernel's own layout (q_proj: A [D, R], B [R, N, H]; o_proj:
A [N, H, R], B [R, D]). `scale` is `alpha / R`, or `alpha / sqrt(R)` with rsLoRA. B starts at
zero and A as PEFT draws it (kaiming-uniform, bound 1 / sqrt(fan_in)), so a new adapter leaves
the model unchanged.

Adapters are a params-shaped tree holding only `lora_a`, `lora_b` leaves (stacked over layers
like the kernels); `combine(params, adapters)` puts them beside the kernels, where `Linear`
finds them. Training keeps the two trees apart, so only the adapters get gradients and
optimizer state; serving and `load(adapter=)` fold the scale into B (`folded`), so a combined
tree is an ordinary params tree.

Several adapters can serve one decode batch (`stack_adapters`): each leaf gets an adapter axis
after the layer axis ([L, A, *in, R]), slot 0 all zero (the base model), and `rows` (see
`settings`) gives each batch row its slot. Every row computes x @ A for every slot (R is
small), keeps its own, then one contraction over (slot, R) applies its B: no per-row copy of
any adapter.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import json
import math
import os
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from qwen2_jax.checkpoint.mapping import TensorRule, tensor_rules
from qwen2_jax.config import Qwen2Config

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """PEFT's LoraConfig fields that change the math; `targets` are module names."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = TARGETS
    rslora: bool = False

    def __post_init__(self):
        if not (isinstance(self.rank, int) and self.rank >= 1):
            raise ValueError(f"LoRA rank must be an integer >= 1, got {self.rank}")
        if not (math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"LoRA alpha must be a number > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {', '.join(unknown) or '(none)'}: expected some of "
                             f"{', '.join(TARGETS)}")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.rslora else self.rank)

    def peft_config(self, base_model: str | None) -> dict:
        """adapter_config.json, as peft 0.21 writes it for these settings."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.rank,
                "lora_alpha": self.alpha, "lora_dropout": self.dropout,
                "target_modules": sorted(self.targets), "bias": "none",
                "use_rslora": self.rslora, "use_dora": False, "fan_in_fan_out": False,
                "init_lora_weights": True, "modules_to_save": None,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {},
                "alpha_pattern": {}, "inference_mode": True,
                "base_model_name_or_path": base_model, "revision": None}

    @classmethod
    def from_peft(cls, raw: dict, where: str) -> LoRAConfig:
        """From adapter_config.json; what we cannot apply exactly is an error naming it."""
        def refuse(field: str, expected: str):
            raise ValueError(f"{where}: {field} is {raw.get(field)!r}; qwen2-jax applies "
                             f"{expected} only")

        if raw.get("peft_type") != "LORA":
            refuse("peft_type", "'LORA'")
        if raw.get("bias", "none") != "none":
            refuse("bias", "'none'")
        for field in ("use_dora", "fan_in_fan_out"):
            if raw.get(field):
                refuse(field, "false")
        for field in ("modules_to_save", "layers_to_transform", "rank_pattern", "alpha_pattern"):
            if raw.get(field):
                refuse(field, "none (the same rank and alpha on every layer and module)")
        targets = raw.get("target_modules")
        if isinstance(targets, str):
            targets = TARGETS if targets == "all-linear" else [targets]
        if not isinstance(targets, list | tuple):
            refuse("target_modules", "a list of module names")
        try:
            return cls(int(raw["r"]), float(raw["lora_alpha"]),
                       float(raw.get("lora_dropout") or 0.0), tuple(sorted(set(targets))),
                       bool(raw.get("use_rslora", False)))
        except KeyError as e:
            raise ValueError(f"{where}: missing field {e.args[0]!r}") from None
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None


# ---------------------------------------------------------------- the forward hook (Linear)


@dataclasses.dataclass(frozen=True)
class Settings:
    """How `Linear` applies the adapters it finds: scale (1.0 when folded into B), dropout
    rate (needs a "dropout" rng), rows: [B, A] one-hot slot of each row (stacked adapters)."""

    scale: float = 1.0
    dropout: float = 0.0
    rows: jax.Array | None = None


_SETTINGS: contextvars.ContextVar[Settings] = contextvars.ContextVar("lora")
_UNSET = Settings()


@contextlib.contextmanager
def settings(scale: float = 1.0, dropout: float = 0.0, rows=None) -> Iterator[None]:
    """Within it (at trace time), adapters are applied with these settings."""
    token = _SETTINGS.set(Settings(scale, dropout, rows))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def delta(module, x: jnp.ndarray, a: jnp.ndarray, b: jnp.ndarray, n_in: int, dtype,
          precision) -> jnp.ndarray:
    """The adapter's `scale * dropout(x) @ A @ B` for x [B, T, *in] -> [B, T, *out]."""
    s = _SETTINGS.get(_UNSET)
    x = x.astype(dtype)
    if s.dropout:
        keep = jax.random.bernoulli(module.make_rng("dropout"), 1 - s.dropout, x.shape)
        x = jnp.where(keep, x / (1 - s.dropout), 0).astype(dtype)
    in_dims = tuple(range(x.ndim - n_in, x.ndim))
    if s.rows is None:  # a: [*in, R], b: [R, *out]
        h = jax.lax.dot_general(x, a.astype(dtype), ((in_dims, tuple(range(n_in))), ((), ())),
                                precision=precision)  # [B, T, R]
        y = jax.lax.dot_general(h, b.astype(dtype), (((h.ndim - 1,), (0,)), ((), ())),
                                precision=precision)  # [B, T, *out]
        return y * s.scale if s.scale != 1.0 else y
    # stacked: a [A, *in, R], b [A, R, *out]; every slot's x @ A, then each row's own slot
    h = jax.lax.dot_general(x, a.astype(dtype), ((in_dims, tuple(range(1, n_in + 1))),
                                                 ((), ())), precision=precision)  # [B, T, A, R]
    h = h * s.rows[:, None, :, None].astype(dtype)
    y = jax.lax.dot_general(h, b.astype(dtype), (((2, 3), (0, 1)), ((), ())),
                            precision=precision)  # [B, T, *out]
    return y * s.scale if s.scale != 1.0 else y


# ---------------------------------------------------------------- adapter trees


@dataclasses.dataclass(frozen=True)
class Target:
    """One adapted projection: its module path in the params, its HF module name per layer
    (the rules of that path), and how many leading kernel dims are inputs."""

    path: tuple[str, ...]  # e.g. ("layers", "self_attn", "q_proj")
    rules: tuple[TensorRule, ...]  # one per layer, in stack order
    n_in: int

    @property
    def name(self) -> str:
        return self.path[-1]

    @property
    def in_shape(self) -> tuple[int, ...]:
        return self.rules[0].our_shape[:self.n_in]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.rules[0].our_shape[self.n_in:]


def targets(config: Qwen2Config, modules: tuple[str, ...] = TARGETS) -> list[Target]:
    """The projections named by `modules`, from mapping's tensor table (one source for names
    and layouts). Routed MoE experts are not adapted (PEFT's target names do not reach their
    fused weights either); a Qwen2-MoE's shared expert and attention are."""
    by_path: dict[tuple[str, ...], list[TensorRule]] = {}
    for rule in tensor_rules(config):
        module = rule.path[-2] if len(rule.path) >= 2 else ""
        if rule.path[-1] == "kernel" and module in modules and "experts" not in rule.path:
            by_path.setdefault(rule.path[:-1], []).append(rule)
    out = []
    for path, rules in by_path.items():
        rules.sort(key=lambda r: r.stack)
        fan_in, n_in = rules[0].hf_shape[1], 0
        while math.prod(rules[0].our_shape[:n_in]) != fan_in:
            n_in += 1
        out.append(Target(path, tuple(rules), n_in))
    return out


def _stacked(target: Target) -> tuple[int, ...]:
    """The leading layer axis of this path's arrays ([L]), or () for `layers_i` paths."""
    return (len(target.rules),) if target.rules[0].stack else ()


def init(config: Qwen2Config, lora: LoRAConfig, key: jax.Array) -> dict:
    """New adapters: A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's kaiming_uniform(a=sqrt(5))
    of a [R, in] weight), B = 0; float32."""
    adapters: dict = {}
    for i, t in enumerate(targets(config, lora.targets)):
        bound = 1 / math.sqrt(math.prod(t.in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, i), (*_stacked(t), *t.in_shape,
                                                            lora.rank), jnp.float32,
                               -bound, bound)
        b = jnp.zeros((*_stacked(t), lora.rank, *t.out_shape), jnp.float32)
        _set(adapters, t.path, {"lora_a": a, "lora_b": b})
    return adapters


def logical_axes(config: Qwen2Config, lora: LoRAConfig, kernel_axes: dict) -> dict:
    """The logical axes of each adapter leaf, from its kernel's (`param_logical_axes`): A
    keeps the input axes, B the output axes; the rank axis is never split."""
    out: dict = {}
    for t in targets(config, lora.targets):
        axes = tuple(_at(kernel_axes, (*t.path, "kernel")))
        lead = axes[:len(_stacked(t))]
        inputs, outputs = axes[len(lead):len(lead) + t.n_in], axes[len(lead) + t.n_in:]
        _set(out, t.path, {"lora_a": (*lead, *inputs, None), "lora_b": (*lead, None, *outputs)})
    return out


def combine(params: dict, adapters: dict) -> dict:
    """params with the adapter leaves beside their kernels (no copies: a new dict tree)."""
    out = dict(params)
    for key, value in adapters.items():
        out[key] = combine(params[key], value) if isinstance(value, dict) else value
    return out


def folded(adapters: dict, lora: LoRAConfig) -> dict:
    """Adapters with the scale folded into B, for combining without `settings(scale=)`."""
    return _map(adapters, lambda name, x: x * lora.scale if name == "lora_b" else x)


def merge(config: Qwen2Config, params: dict, adapters: dict, lora: LoRAConfig) -> dict:
    """params with `kernel += scale * A @ B` in float32 (float kernels only: merge into the
    float model, then quantize)."""
    out = params
    for t in targets(config, lora.targets):
        node = _get(adapters, t.path)
        if node is None:
            continue
        module = dict(_at(params, t.path))
        if "kernel" not in module:
            raise ValueError(f"{'/'.join(t.path)} is quantized: merge adapters into the float "
                             "model, then quantize")
        lead, r = _stacked(t), lora.rank
        a = node["lora_a"].reshape(*lead, -1, r).astype(jnp.float32)  # [*lead, in, R]
        b = node["lora_b"].reshape(*lead, r, -1).astype(jnp.float32)  # [*lead, R, out]
        update = jnp.einsum("...ir,...ro->...io", a, b, precision=jax.lax.Precision.HIGHEST)
        kernel = module["kernel"]
        module["kernel"] = (kernel.astype(jnp.float32)
                            + lora.scale * update.reshape(kernel.shape)).astype(kernel.dtype)
        out = _replaced(out, t.path, module)
    return out


def _replaced(tree: dict, path: tuple[str, ...], value) -> dict:
    """A copy of tree's dicts along path with the node at path replaced."""
    if not path:
        return value
    return {**tree, path[0]: _replaced(tree[path[0]], path[1:], value)}


def stack_adapters(config: Qwen2Config, named: list[tuple[LoRAConfig, dict]]) -> dict:
    """Several adapters (scales folded) as one tree with an adapter axis after the layer axis:
    slot 0 all zero (the base), slot i + 1 adapter i; ranks are padded with zeros to the
    largest, modules an adapter lacks stay zero."""
    rank = max(lora.rank for lora, _ in named)
    modules = tuple(sorted({t for lora, _ in named for t in lora.targets}))
    out: dict = {}
    for t in targets(config, modules):
        lead = _stacked(t)
        a = np.zeros((*lead, len(named) + 1, *t.in_shape, rank), np.float32)
        b = np.zeros((*lead, len(named) + 1, rank, *t.out_shape), np.float32)
        s = len(lead)
        for slot, (lora, adapters) in enumerate(named, start=1):
            node = _get(adapters, t.path)
            if node is None:
                continue
            index = (slice(None),) * s + (slot,)
            a[(*index, Ellipsis, slice(0, lora.rank))] = np.asarray(node["lora_a"])
            b[(*index, slice(0, lora.rank))] = np.asarray(node["lora_b"]) * lora.scale
        _set(out, t.path, {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)})
    return out


# ---------------------------------------------------------------- PEFT's files


def peft_name(rule: TensorRule, which: str) -> str:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` for which="A"."""
    return PEFT_PREFIX + rule.hf_name.removesuffix(".weight") + f".lora_{which}.weight"


def to_peft_tensors(config: Qwen2Config, lora: LoRAConfig, adapters: dict) -> dict:
    """{PEFT name: float32 array}: lora_A [R, in], lora_B [out, R] per layer and module."""
    out = {}
    for t in targets(config, lora.targets):
        node = _get(adapters, t.path)
        a, b = np.asarray(node["lora_a"], np.float32), np.asarray(node["lora_b"], np.float32)
        for rule in t.rules:
            index = rule.stack[:1]
            out[peft_name(rule, "A")] = a[index].reshape(-1, lora.rank).T
            out[peft_name(rule, "B")] = b[index].reshape(lora.rank, -1).T
    return out


def from_peft_tensors(config: Qwen2Config, lora: LoRAConfig, tensors: dict,
                      where: str) -> dict:
    """The inverse of to_peft_tensors; a missing, extra or misshapen tensor is an error."""
    wanted, adapters = set(), {}
    for t in targets(config, lora.targets):
        a = np.zeros((*_stacked(t), *t.in_shape, lora.rank), np.float32)
        b = np.zeros((*_stacked(t), lora.rank, *t.out_shape), np.float32)
        fan_in, fan_out = math.prod(t.in_shape), math.prod(t.out_shape)
        for rule in t.rules:
            for which, shape, array in (("A", (lora.rank, fan_in), a),
                                        ("B", (fan_out, lora.rank), b)):
                name = peft_name(rule, which)
                wanted.add(name)
                if name not in tensors:
                    raise ValueError(f"{where}: tensor {name} is missing (target_modules names "
                                     f"{t.name})")
                value = np.asarray(tensors[name], np.float32)
                if value.shape != shape:
                    raise ValueError(f"{where}: tensor {name} has shape {list(value.shape)}; "
                                     f"expected {list(shape)} (r={lora.rank})")
                index = rule.stack[:1]
                if which == "A":
                    array[index] = value.T.reshape(*t.in_shape, lora.rank)
                else:
                    array[index] = value.T.reshape(lora.rank, *t.out_shape)
        _set(adapters, t.path, {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)})
    extra = sorted(set(tensors) - wanted)
    if extra:
        raise ValueError(f"{where}: {len(extra)} tensors this model has no place for, e.g. "
                         f"{extra[0]}")
    return adapters


def save_adapter(folder: str, config: Qwen2Config, lora: LoRAConfig, adapters: dict,
                 base_model: str | None, force: bool = False) -> None:
    """A PEFT adapter folder (adapter_config.json, adapter_model.safetensors), atomically."""
    from qwen2_jax.checkpoint.output import atomic_folder
    from qwen2_jax.checkpoint.safetensors_file import write_safetensors

    tensors = to_peft_tensors(config, lora, adapters)
    with atomic_folder(folder, force=force) as temp:
        with open(os.path.join(temp, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(lora.peft_config(base_model), f, indent=2)
        write_safetensors(os.path.join(temp, WEIGHTS_FILE),
                          [(name, np.float32, array.shape, lambda array=array: [array])
                           for name, array in sorted(tensors.items())], {"format": "pt"})


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_adapter(folder: str, config: Qwen2Config) -> tuple[LoRAConfig, dict]:
    """(settings, adapters) of a PEFT LoRA folder, checked against the model's config."""
    from qwen2_jax.checkpoint.safetensors_file import SafetensorsFile

    config_path = os.path.join(folder, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{folder}: not a PEFT adapter folder (no {CONFIG_FILE})")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_path}: not JSON ({e})") from None
    lora = LoRAConfig.from_peft(raw, config_path)
    weights = os.path.join(folder, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise ValueError(f"{folder}: {WEIGHTS_FILE} is missing")
    file = SafetensorsFile(weights)
    tensors = {name: np.array(file.read(name), np.float32) for name in file.tensors}
    return lora, from_peft_tensors(config, lora, tensors, weights)


# ---------------------------------------------------------------- tree helpers


def _at(tree: dict, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def _get(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _set(tree: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        tree = tree.setdefault(key, {})
    tree[path[-1]] = value


def _map(tree: dict, fn) -> dict:
    return {k: _map(v, fn) if isinstance(v, dict) else fn(k, v) for k, v in tree.items()}


def stacked_logical_axes(config: Qwen2Config, adapters: dict, kernel_axes: dict) -> dict:
    """`logical_axes` of a `stack_adapters` tree: the adapter axis A, after the layer axis,
    is never split (every device holds every adapter's slice, as it does the base's)."""
    out: dict = {}
    for t in targets(config):
        if _get(adapters, t.path) is None:
            continue
        axes = tuple(_at(kernel_axes, (*t.path, "kernel")))
        s = len(_stacked(t))
        lead, inputs, outputs = axes[:s], axes[s:s + t.n_in], axes[s + t.n_in:]
        _set(out, t.path, {"lora_a": (*lead, None, *inputs, None),
                           "lora_b": (*lead, None, None, *outputs)})
    return out
