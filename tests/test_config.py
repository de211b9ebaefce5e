"""Qwen2Config: both config.json dialects round-trip, validation errors, published presets."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from transformers import Qwen2Config as HFQwen2Config

from qwen2_jax import PRESETS, ConfigError, Qwen2Config, init

# A transformers-4 style file (as published on the hub), every field away from its default.
LEGACY = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.1, "bos_token_id": 7,
    "eos_token_id": [8, 9], "hidden_act": "silu", "hidden_size": 64, "initializer_range": 0.01,
    "intermediate_size": 96, "max_position_embeddings": 4096, "max_window_layers": 2,
    "model_type": "qwen2", "num_attention_heads": 8, "num_hidden_layers": 4,
    "num_key_value_heads": 2, "pad_token_id": 5, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 1024},
    "sliding_window": 256, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.40.1", "use_cache": False, "use_sliding_window": True,
    "vocab_size": 300,
}


def hf_view(config_dict: dict) -> dict:
    """What transformers makes of a config.json (its own normalized dict)."""
    d = HFQwen2Config.from_dict(dict(config_dict)).to_dict()
    d.pop("transformers_version", None)
    return d


def test_legacy_dialect_round_trips_key_for_key():
    config = Qwen2Config.from_hf(LEGACY)
    assert config.to_hf() == LEGACY
    assert config.rope_type == "yarn" and config.rope_theta == 500000.0
    assert config.dtype == "bfloat16" and config.eos_token_id == (8, 9)
    assert hf_view(config.to_hf()) == hf_view(LEGACY)


def test_transformers5_dialect_round_trips_key_for_key(tmp_path):
    HFQwen2Config.from_dict(dict(LEGACY)).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in saved and "rope_theta" not in saved  # the 5.x dialect
    config = Qwen2Config.from_file(tmp_path)
    assert config.to_hf() == saved
    assert config.rope_type == "yarn" and config.rope_scaling["factor"] == 4.0
    assert config.rope_theta == 500000.0 and config.dtype == "bfloat16"
    assert config.layer_windows == tuple(
        256 if t == "sliding_attention" else 0 for t in saved["layer_types"])


def test_every_transformers_field_is_kept():
    """Each field transformers' Qwen2Config declares has a typed field here."""
    hf_fields = set(HFQwen2Config.__annotations__) - {"rope_parameters"}  # dialect key
    ours = set(Qwen2Config.__dataclass_fields__)
    assert len(hf_fields) > 15
    assert hf_fields <= ours


@pytest.mark.parametrize("dialect_key", ["rope_theta", "rope_parameters"])
def test_defaults_equal_transformers(dialect_key):
    """A config.json that omits every optional key means the same model here and there."""
    minimal = {"model_type": "qwen2", "num_attention_heads": 64,
               dialect_key: 10000.0 if dialect_key == "rope_theta" else {"rope_type": "default"}}
    assert hf_view(Qwen2Config.from_hf(minimal).to_hf()) == hf_view(minimal)


@pytest.mark.parametrize("use_sliding_window", [False, True])
@pytest.mark.parametrize("max_window_layers", [0, 2, 5])
@pytest.mark.parametrize("sliding_window", [None, 3])
def test_sliding_layers_match_transformers(use_sliding_window, max_window_layers, sliding_window):
    d = {**LEGACY, "num_hidden_layers": 5, "use_sliding_window": use_sliding_window,
         "max_window_layers": max_window_layers, "sliding_window": sliding_window}
    hf = HFQwen2Config.from_dict(d)
    expected = tuple(hf.sliding_window if t == "sliding_attention" and hf.sliding_window else 0
                     for t in hf.layer_types)
    assert Qwen2Config.from_hf(d).layer_windows == expected


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 65}, "hidden_size=65 is not divisible by num_attention_heads=8"),
        ({"num_key_value_heads": 3}, "num_attention_heads=8 is not divisible by num_key_value_heads=3"),
        ({"model_type": "llama"}, "model_type 'llama' is not supported; supported: qwen2"),
        ({"model_type": "qwen2_vl"}, "model_type 'qwen2_vl' is not supported; supported: qwen2"),
        ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "'dynamic' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
        ({"layer_types": ["full_attention"]}, "layer_types has 1 entries; expected num_hidden_layers=4"),
        ({"vocab_size": 0}, "vocab_size must be a positive integer"),
    ],
)
def test_invalid_configs_say_what_is_wrong(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Qwen2Config.from_hf({**LEGACY, **change})


def test_config_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        Qwen2Config.from_file(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "qwen2",\n "hidden_size": }')
    with pytest.raises(ConfigError, match=r"config.json: line 2, column .*invalid JSON"):
        Qwen2Config.from_file(tmp_path)


def test_config_is_hashable_and_equal_by_value():
    a, b = Qwen2Config.from_hf(LEGACY), Qwen2Config.from_hf(json.loads(json.dumps(LEGACY)))
    assert a == b and hash(a) == hash(b)


# The published config.json of each model (Hugging Face hub, Qwen/Qwen2-*), architecture keys.
PUBLISHED = {
    "Qwen2-0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_window_layers=24),
    "Qwen2-1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                       num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                       tie_word_embeddings=True, rms_norm_eps=1e-6, max_window_layers=28),
    "Qwen2-7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                     tie_word_embeddings=False, rms_norm_eps=1e-6, max_window_layers=28),
    "Qwen2-72B": dict(hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, vocab_size=152064,
                      tie_word_embeddings=False, rms_norm_eps=1e-5, max_window_layers=80),
}
COMMON = dict(model_type="qwen2", hidden_act="silu", rope_theta=1000000.0,
              max_position_embeddings=131072, use_sliding_window=False, sliding_window=131072,
              bos_token_id=151643, eos_token_id=151643, torch_dtype="bfloat16", rope_scaling=None)
# Parameter counts in billions, from the model cards / technical report.
PUBLISHED_PARAMS = {"Qwen2-0.5B": 0.494, "Qwen2-1.5B": 1.544, "Qwen2-7B": 7.616,
                    "Qwen2-72B": 72.706}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_presets_equal_published_configs(name):
    written = PRESETS[name].to_hf()
    for key, value in {**COMMON, **PUBLISHED[name]}.items():
        assert written[key] == value, key
    assert PRESETS[name].head_size == (64 if name == "Qwen2-0.5B" else 128)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_parameter_counts(name):
    """jax.eval_shape of the scanned model on every size: no memory, exact counts."""
    shapes = jax.eval_shape(lambda: init(PRESETS[name], jax.random.key(0)))
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    assert round(count / 1e9, 3) == PUBLISHED_PARAMS[name]
