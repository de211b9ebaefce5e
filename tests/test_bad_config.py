"""A config.json with a wrong or missing value is refused up front, naming the file, the field,
the value found and what is expected; what transformers writes still loads."""

from __future__ import annotations

import json
import re

import pytest
from tokenizers import Tokenizer, models
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2MoeConfig as HFQwen2MoeConfig

from conftest import MOE, TINY
from qwen2_jax import cli
from qwen2_jax.config import ConfigError, Qwen2Config


def dense() -> dict:
    """A valid config.json as transformers 5 writes it (rope_parameters, layer_types, dtype)."""
    return HFQwen2Config(**TINY).to_dict()


def legacy() -> dict:
    """The same in the transformers-4 dialect (top-level rope_theta, rope_scaling)."""
    d = dense()
    d["rope_theta"] = d.pop("rope_parameters")["rope_theta"]
    d["rope_scaling"] = None
    return d


def moe() -> dict:
    return HFQwen2MoeConfig(**MOE).to_dict()


def yarn(**keys) -> dict:
    d = dense()
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                            "original_max_position_embeddings": 128, **keys}
    return d


def write(folder, config: dict):
    path = folder / "config.json"
    path.write_text(json.dumps(config))
    return path


def refused(tmp_path, config: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        Qwen2Config.from_file(write(tmp_path, config))


# (a valid config.json, the key to set, its value, the message after "config.json: ").
WRONG_VALUES = [
    (dense, "rms_norm_eps", "1e-6", "rms_norm_eps must be a positive number, got '1e-6' (a string)"),
    (dense, "rms_norm_eps", 0, "rms_norm_eps must be a positive number, got 0"),
    (dense, "rms_norm_eps", True, "rms_norm_eps must be a positive number, got True (a boolean)"),
    (dense, "rms_norm_eps", float("nan"), "rms_norm_eps must be a positive number, got nan"),
    (dense, "rms_norm_eps", None, "rms_norm_eps must be a positive number, got None (null)"),
    (legacy, "rope_theta", "1e6", "rope_theta must be a positive number, got '1e6' (a string)"),
    (legacy, "rope_theta", -1.0, "rope_theta must be a positive number, got -1.0"),
    (legacy, "rope_theta", float("inf"), "rope_theta must be a positive number, got inf"),
    (dense, "initializer_range", -0.02,
     "initializer_range must be a non-negative number, got -0.02"),
    (dense, "initializer_range", "0.02",
     "initializer_range must be a non-negative number, got '0.02' (a string)"),
    (dense, "attention_dropout", 1.5, "attention_dropout must be a number in [0, 1], got 1.5"),
    (dense, "attention_dropout", [0.1],
     "attention_dropout must be a number in [0, 1], got [0.1] (a list)"),
    (dense, "max_position_embeddings", 0,
     "max_position_embeddings must be a positive integer, got 0"),
    (dense, "max_position_embeddings", "512",
     "max_position_embeddings must be a positive integer, got '512' (a string)"),
    (dense, "max_window_layers", -1, "max_window_layers must be a non-negative integer, got -1"),
    (dense, "max_window_layers", 2.0, "max_window_layers must be a non-negative integer, got 2.0"),
    (dense, "head_dim", "14", "head_dim must be a positive integer, got '14' (a string)"),
    (dense, "tie_word_embeddings", "false",
     "tie_word_embeddings must be true or false, got 'false' (a string)"),
    (dense, "tie_word_embeddings", 1, "tie_word_embeddings must be true or false, got 1"),
    (dense, "use_sliding_window", "true",
     "use_sliding_window must be true or false, got 'true' (a string)"),
    (dense, "sliding_window", "4096",
     "sliding_window must be a non-negative integer, got '4096' (a string)"),
    (dense, "sliding_window", -1, "sliding_window must be a non-negative integer, got -1"),
    (moe, "norm_topk_prob", 0, "norm_topk_prob must be true or false, got 0"),
    (moe, "router_aux_loss_coef", "0.001",
     "router_aux_loss_coef must be a non-negative number, got '0.001' (a string)"),
    (moe, "num_experts", "8", "num_experts must be a non-negative integer, got '8' (a string)"),
    (moe, "decoder_sparse_step", 0, "decoder_sparse_step must be a positive integer, got 0"),
    (moe, "shared_expert_intermediate_size", 0,
     "shared_expert_intermediate_size must be a positive integer, got 0"),
    (legacy, "rope_scaling", "yarn",
     "rope_scaling must be an object or null, got 'yarn' (a string)"),
    (dense, "rope_parameters", "yarn",
     "rope_parameters must be an object or null, got 'yarn' (a string)"),
]


@pytest.mark.parametrize("base, key, value, message", WRONG_VALUES,
                         ids=[f"{key}={value!r}" for _, key, value, _ in WRONG_VALUES])
def test_wrong_value_is_refused(tmp_path, base, key, value, message):
    refused(tmp_path, {**base(), key: value}, f"config.json: {message}")


def test_rope_theta_inside_rope_parameters_is_checked(tmp_path):
    config = dense()
    config["rope_parameters"]["rope_theta"] = "1e6"
    refused(tmp_path, config,
            "config.json: rope_theta must be a positive number, got '1e6' (a string)")


def test_sliding_window_of_zero_is_refused_when_sliding(tmp_path):
    refused(tmp_path, {**dense(), "use_sliding_window": True, "sliding_window": 0},
            "config.json: sliding_window must be a positive integer, got 0")


YARN_VALUES = [
    ("factor", 0.5, "a number >= 1, got 0.5"),
    ("factor", "4", "a number >= 1, got '4' (a string)"),
    ("original_max_position_embeddings", 128.5, "a positive integer, got 128.5"),
    ("original_max_position_embeddings", 0, "a positive integer, got 0"),
    ("beta_fast", "32", "a number, got '32' (a string)"),
    ("beta_slow", True, "a number, got True (a boolean)"),
    ("attention_factor", "1.3", "a number, got '1.3' (a string)"),
    ("mscale", [1], "a number, got [1] (a list)"),
    ("mscale_all_dim", "1", "a number, got '1' (a string)"),
    ("truncate", "false", "true or false, got 'false' (a string)"),
]


@pytest.mark.parametrize("key, value, expected", YARN_VALUES,
                         ids=[f"{key}={value!r}" for key, value, _ in YARN_VALUES])
def test_wrong_yarn_value_is_refused(tmp_path, key, value, expected):
    refused(tmp_path, yarn(**{key: value}),
            f"config.json: rope_parameters.{key} must be {expected}")


def test_wrong_yarn_value_names_rope_scaling_in_the_legacy_dialect(tmp_path):
    config = {**legacy(), "rope_scaling": {"type": "yarn", "factor": 0.25,
                                           "original_max_position_embeddings": 128}}
    refused(tmp_path, config, "config.json: rope_scaling.factor must be a number >= 1, got 0.25")


def test_missing_fields_are_listed_at_once(tmp_path):
    config = dense()
    del config["hidden_size"], config["num_hidden_layers"]
    refused(tmp_path, config, "config.json: missing required fields: hidden_size, "
            "num_hidden_layers (a Qwen2 config.json from transformers always has them)")


@pytest.mark.parametrize("key", ["vocab_size", "intermediate_size", "num_attention_heads"])
def test_each_architecture_field_is_required(tmp_path, key):
    config = legacy()
    del config[key]
    refused(tmp_path, config, f"config.json: missing required fields: {key} (a Qwen2 ")


def test_missing_moe_fields_are_listed(tmp_path):
    config = moe()
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size",
                "shared_expert_intermediate_size"):
        del config[key]
    refused(tmp_path, config, "config.json: missing required fields: num_experts, "
            "num_experts_per_tok, moe_intermediate_size, shared_expert_intermediate_size "
            "(a Qwen2-MoE config.json from transformers always has them)")


def test_what_transformers_writes_still_loads(tmp_path):
    """Guards against refusing valid files: integers where floats belong, Qwen2-MoE's
    `sliding_window: 0`, null YaRN keys."""
    config = Qwen2Config.from_file(write(tmp_path, moe()))
    assert config.sliding_window == 0 and config.num_experts == 8
    config = Qwen2Config.from_file(write(tmp_path, {**legacy(), "rope_theta": 1000000,
                                                    "attention_dropout": 0, "rms_norm_eps": 1}))
    assert config.rope_theta == 1e6 and config.to_hf()["rope_theta"] == 1000000
    config = Qwen2Config.from_file(write(tmp_path, yarn(factor=4, beta_fast=None)))
    assert config.rope_type == "yarn"
    # Python callers may still rely on the defaults.
    assert Qwen2Config().vocab_size == 151936


def test_generate_reports_a_bad_config_before_reading_weights(tmp_path, capsys):
    """The folder has no weights: the error must come from config.json."""
    Tokenizer(models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>")).save(
        str(tmp_path / "tokenizer.json"))
    write(tmp_path, {**dense(), "rms_norm_eps": "1e-6"})
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'config.json'}: rms_norm_eps must be a positive number, got '1e-6' " \
           "(a string)" in err, err
