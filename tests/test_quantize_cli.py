"""The quantization flags on the command line: `convert --quantize`, and --quantize,
--quantize-embeddings and --kv-cache-dtype on the commands that load a model. Every expected
value comes from the Python API (`qwen2_jax.load(quantize=)`, `qwen2_jax.generate(
kv_cache_dtype=)`), so the flags are checked to mean what the library means."""

from __future__ import annotations

import json

import jax
import numpy as np
import openai
import pytest
from test_bad_input import SMALL, run_cli

from conftest import make_hf_model
from serving import running_server

STOPS = [151645, 151643]  # <|im_end|>, <|endoftext|>


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random Qwen2 folder with the real tokenizer, greedy, stopping at eos."""
    folder = tmp_path_factory.mktemp("quantize_cli_model")
    make_hf_model(folder, **SMALL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": STOPS}))
    return folder


def reference_text(folder, prompt: str, max_new_tokens: int, chat: bool = False,
                   kv_cache_dtype: str = "auto", **quantize) -> str:
    """What the Python API generates greedily for `prompt`, as text."""
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer(str(folder))
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else \
        prompt
    config, params = qwen2_jax.load(str(folder), **quantize)
    (tokens,) = qwen2_jax.generate(config, params, [tokenizer.encode(text)], max_new_tokens,
                                   stop_token_ids=STOPS, vocab_size=len(tokenizer),
                                   kv_cache_dtype=kv_cache_dtype)
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_convert_quantize_writes_the_params_load_quantizes(model, tmp_path, capsys):
    """`convert --quantize int8 --verify` writes exactly `load(quantize="int8")`'s params,
    and `generate` from that folder says what `generate --quantize int8` from the source
    says."""
    import qwen2_jax

    out = tmp_path / "int8"
    status, stdout, err = run_cli(capsys, "convert", model, out, "--quantize", "int8", "--verify")
    assert status == 0, err
    summary = json.loads(stdout)
    assert summary["quantize"] == "int8" and summary["verify"] == {"max_abs_logit_diff": 0.0,
                                                                   "ok": True}
    _, written = qwen2_jax.load(str(out))
    _, expected = qwen2_jax.load(str(model), quantize="int8")
    assert jax.tree.structure(written) == jax.tree.structure(expected)
    for a, b in zip(jax.tree.leaves(written), jax.tree.leaves(expected), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert written["layers"]["self_attn"]["q_proj"]["qkernel"].dtype == np.int8

    prompt = ("--prompt", "Hello world", "--max-new-tokens", "8")
    status, from_folder, err = run_cli(capsys, "generate", "--model", out, *prompt)
    assert status == 0, err
    status, at_load, err = run_cli(capsys, "generate", "--model", model, "--quantize", "int8",
                                   *prompt)
    assert status == 0, err
    assert from_folder == at_load and from_folder.strip()


@pytest.mark.parametrize("command, flags, named", [
    ("generate", ["--quantize", "int3"], "--quantize"),
    ("generate", ["--quantize-embeddings"], "--quantize-embeddings"),
    ("serve", ["--quantize-embeddings"], "--quantize-embeddings"),
    ("convert", ["--quantize-embeddings"], "--quantize-embeddings"),
    ("convert", ["--quantize", "int8", "--mesh", "fsdp=2"], "--mesh"),
    ("generate", ["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
    ("eval", ["--kv-cache-dtype", "fp8"], "--kv-cache-dtype"),
])
def test_bad_quantize_flags_exit_2_naming_the_flag(model, tmp_path, capsys, command, flags,
                                                   named):
    """Refused before anything loads or is written: exit 2, the flag named, no traceback."""
    where = {"generate": ["--model", model, "--prompt", "x"],
             "serve": ["--model", model, "--port", "1"],
             "eval": ["--model", model, "--data", model / "config.json"],
             "convert": [model, tmp_path / "out"]}[command]
    status, _, err = run_cli(capsys, command, *where, *flags)
    assert status == 2 and named in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


def test_generate_kv_cache_int8_equals_the_python_api(model, capsys):
    """`generate --chat --kv-cache-dtype int8` streams the text of `qwen2_jax.generate(...,
    kv_cache_dtype="int8")` for the same prompt."""
    status, out, err = run_cli(capsys, "generate", "--model", model, "--prompt", "Count to five.",
                               "--chat", "--max-new-tokens", "12", "--kv-cache-dtype", "int8")
    assert status == 0, err
    assert out == reference_text(model, "Count to five.", 12, chat=True,
                                 kv_cache_dtype="int8") + "\n"


def chunked_nll(config, params, ids: list[int], window: int, kv_cache_dtype: str) -> float:
    """Mean NLL of every token but the first of each `window`-token window, each predicted
    through a KV cache filled 16 tokens at a time, as generation's chunked prefill does."""
    import jax.numpy as jnp

    from qwen2_jax.decoding import init_cache
    from qwen2_jax.model import Qwen2ForCausalLM

    @jax.jit
    def chunk_logits(params, cache, chunk, start):
        return Qwen2ForCausalLM(config).apply({"params": params}, chunk, None, None, None,
                                              cache=cache, cache_index=jnp.full((1,), start))

    total = count = 0.0
    for begin in range(0, len(ids), window):
        tokens = ids[begin:begin + window]
        cache = init_cache(config, 1, window, jnp.float32, kv_cache_dtype=kv_cache_dtype)
        logits = []
        for start in range(0, len(tokens), 16):
            piece = tokens[start:start + 16]
            chunk = np.zeros((1, 16), np.int32)
            chunk[0, :len(piece)] = piece
            out, cache = chunk_logits(params, cache, chunk, np.int32(start))
            logits.append(np.asarray(out[0, :len(piece)]))
        logits = np.concatenate(logits)
        logprobs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        total -= sum(logprobs[t - 1, tokens[t]] for t in range(1, len(tokens)))
        count += len(tokens) - 1
    return total / count


def test_eval_kv_cache_int8_scores_through_the_cache(model, tmp_path, capsys):
    """`eval --kv-cache-dtype int8` (stride = max-len: every token scored once) is the mean
    NLL of each window's tokens predicted through an int8 cache filled in chunks (not the
    float cache's number)."""
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    text = "The quick brown fox jumps over the lazy dog. " * 8
    (tmp_path / "text.txt").write_text(text)
    status, out, err = run_cli(capsys, "eval", "--model", model, "--data", tmp_path / "text.txt",
                               "--max-len", "64", "--stride", "64", "--no-progress",
                               "--kv-cache-dtype", "int8")
    assert status == 0, err
    nll = json.loads(out)["nll"]
    config, params = qwen2_jax.load(str(model))
    ids = Tokenizer(str(model)).encode(text)
    assert len(ids) > 64  # two windows, the second shorter
    np.testing.assert_allclose(nll, chunked_nll(config, params, ids, 64, "int8"), rtol=1e-5)
    assert abs(nll - chunked_nll(config, params, ids, 64, "auto")) > 1e-5


def test_serve_int8_weights_and_cache_equal_generate(model, tmp_path):
    """`serve --quantize int8 --kv-cache-dtype int8`: a greedy chat completion through the
    openai client equals `qwen2_jax.generate` on the int8-loaded params with an int8 cache,
    and the startup log says how weights and cache are stored."""
    flags = ("--max-batch", "2", "--max-model-len", "128", "--prefill-chunk", "16",
             "--served-model-name", "tiny", "--no-compile-cache", "--quantize", "int8",
             "--kv-cache-dtype", "int8")
    question = "Write a haiku about the sea."
    with running_server(str(model), *flags, log=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               timeout=120)
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": question}], max_tokens=16)
        log = server.tail()
    assert reply.choices[0].message.content == reference_text(
        model, question, 16, chat=True, kv_cache_dtype="int8", quantize="int8")
    assert "weights int8, KV cache int8" in log


def test_engine_int8_cache_on_a_mesh_equals_generate(model):
    """The engine's int8 cache (scales [B, K, S] per layer, split as the keys are) on a mesh
    over the 8 test devices, three requests at once on two slots (chunked prefill, batched
    decode, a freed slot taken by the third): each request's greedy tokens equal `generate`
    with kv_cache_dtype="int8" on the same int8 weights."""
    from test_serve import run_engine

    import qwen2_jax
    from qwen2_jax.serve.engine import Engine
    from qwen2_jax.sharding import make_mesh

    mesh = make_mesh("data=2,tensor=4")
    config, params = qwen2_jax.load(str(model), mesh=mesh, quantize="int8")
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 151000, n).tolist() for n in (5, 40, 20)]
    expected = qwen2_jax.generate(config, params, prompts, 6, stop_token_ids=STOPS,
                                  kv_cache_dtype="int8")
    engine = Engine(config, params, max_batch=2, max_model_len=64, prefill_chunk=16,
                    mesh=mesh, kv_cache_dtype="int8")
    engine.start(warm_up=False)  # each program compiled at first use: scoring never is
    try:
        k, scale = engine.cache["k"][0], engine.cache["k_scale"][0]
        assert k.dtype == np.int8 and scale.shape == (2, 1, engine.cache_slots)
        assert scale.sharding.spec[0] == k.sharding.spec[0] == "data"  # the slots split
        assert run_engine(engine, prompts, 6) == expected
    finally:
        engine.stop()
