"""`qwen2-jax serve --lora NAME=DIR`: several LoRA adapters beside one base, picked per request,
sharing decode steps. Every expected value comes from `qwen2_jax.generate` (or `forward`) on
params with that request's adapter merged into the kernels (`lora.merge`): another path than
the engine's unmerged, per-row one."""

from __future__ import annotations

import concurrent.futures
import json
import threading

import jax
import numpy as np
import openai
import pytest
from test_serve import STOPS, TOKENIZER_SIZE, make_serving_model

from conftest import make_hf_model
from qwen2_jax import lora
from serving import free_port, get, running_server

# Two adapters unlike each other: another rank, other modules, rsLoRA's scale.
ADAPTERS = {"alpha": lora.LoRAConfig(rank=2, alpha=4.0),
            "beta": lora.LoRAConfig(rank=5, alpha=3.0, rslora=True,
                                    targets=("q_proj", "v_proj", "o_proj", "down_proj"))}


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random Qwen2 with the real tokenizer and two random PEFT adapters saved beside
    it; returns (folder, config, params, tokenizer, {name: (folder, merged params)})."""
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("serve_lora")
    folder = root / "base"
    make_serving_model(folder, qwen2_tokenizer_dir)
    config, params = qwen2_jax.load(str(folder))
    adapters = {}
    for i, (name, settings) in enumerate(ADAPTERS.items()):
        tree = lora.init(config, settings, jax.random.key(i))
        # B starts at zero: random values, large enough to change the greedy tokens
        tree = jax.tree.map(lambda x, i=i: 0.5 * jax.random.normal(jax.random.key(10 + i),
                                                                   x.shape), tree)
        path = str(root / name)
        lora.save_adapter(path, config, settings, tree, str(folder))
        loaded, weights = lora.load_adapter(path, config)
        adapters[name] = path, lora.merge(config, params, weights, loaded)
    return str(folder), config, params, Tokenizer(str(folder)), adapters


def merged_greedy(model, adapter: str | None, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of `generate` alone, on the base or with `adapter` merged."""
    import qwen2_jax

    _, config, params, _, adapters = model
    merged = params if adapter is None else adapters[adapter][1]
    return qwen2_jax.generate(config, merged, [prompt], max_new_tokens=max_tokens,
                              stop_token_ids=STOPS, vocab_size=TOKENIZER_SIZE)[0]


def test_a_mixed_batch_equals_each_request_alone_with_its_adapter_merged(model):
    """Requests for both adapters and the base, submitted together, run in shared decode
    steps (seen from the scheduler thread: rows of all three slots decoding at once), each row
    with its own adapter: their greedy tokens equal `generate` alone on the merged model, and
    the mix compiles nothing new. An echo request's prompt log-probs (the scoring program)
    equal `forward`'s on the merged model."""
    import qwen2_jax
    from qwen2_jax.serve.engine import Engine, Sequence, Settings
    from qwen2_jax.serve.programs import xla_compilations

    _, config, params, _, adapters = model
    stacked = lora.stack_adapters(config, [lora.load_adapter(adapters[name][0], config)
                                           for name in ADAPTERS])
    engine = Engine(config, params, max_batch=4, max_model_len=128, prefill_chunk=64,
                    vocab_size=TOKENIZER_SIZE, adapters=stacked)
    assert engine.adapter_count == 3
    engine.start()
    try:
        rng = np.random.default_rng(7)
        prompts = [rng.integers(0, 151000, n).tolist() for n in (6, 9, 6, 70)]
        names = ["alpha", "beta", None, "beta"]
        slots = [0 if n is None else list(ADAPTERS).index(n) + 1 for n in names]
        mixes = []
        compilations = xla_compilations()
        tokens = run_adapters(engine, prompts, slots, 12, mixes)
        assert xla_compilations() == compilations
        assert {0, 1, 2} in mixes, mixes
        for prompt, name, got in zip(prompts, names, tokens, strict=True):
            assert got == merged_greedy(model, name, prompt, 12), name
        # the adapters matter: each changes the base's tokens
        assert tokens[0] != merged_greedy(model, None, prompts[0], 12)
        assert tokens[1] != merged_greedy(model, None, prompts[1], 12)

        done, prompt = threading.Event(), prompts[3]
        echoed = []
        engine.submit([Sequence(prompt, Settings(0, prompt_logprobs=True), lambda t: None,
                                lambda r, p: (echoed.extend(p or []), done.set()),
                                adapter=slots[3])])
        assert done.wait(300)
        logits = qwen2_jax.forward(config, adapters["beta"][1], np.array([prompt]))[0, :-1]
        expected = np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)),
                                      np.array(prompt[1:])[:, None], axis=-1)[:, 0]
        np.testing.assert_allclose([t.logprob for t in echoed], expected, atol=2e-4)
    finally:
        engine.stop()


def run_adapters(engine, prompts, slots, max_tokens, mixes) -> list[list[int]]:
    """Every prompt through a started engine at once, each with its adapter slot; the tokens
    of each. `mixes` gets, at each token, the adapter slots of the rows decoding."""
    from qwen2_jax.serve.engine import Sequence, Settings

    results, done = {}, threading.Event()

    def sequence(i):
        tokens = []

        def on_token(info):  # on the scheduler's thread, between steps
            tokens.append(info.token)
            mixes.append({s.sequence.adapter for s in engine.slots
                          if s is not None and not s.chunks})

        def on_finish(reason, _):
            results[i] = tokens
            if len(results) == len(prompts):
                done.set()

        return Sequence(prompts[i], Settings(max_tokens, stop_token_ids=frozenset(STOPS)),
                        on_token, on_finish, adapter=slots[i])

    engine.submit([sequence(i) for i in range(len(prompts))])
    assert done.wait(300)
    return [results[i] for i in range(len(prompts))]


def test_chat_picks_the_adapter_by_model_name(model, tmp_path):
    """Through the real server and the `openai` client: a chat naming an adapter equals
    `generate` with it merged (and the reply carries that name), one naming the base equals
    the base, /v1/models lists both adapters under the base, and an unknown name is a 404
    with OpenAI's error body."""
    import httpx

    folder, _, _, tokenizer, adapters = model
    flags = ["--max-batch", "4", "--max-model-len", "256", "--prefill-chunk", "64",
             "--served-model-name", "tiny", "--no-compile-cache",
             *(f for name in ADAPTERS for f in ("--lora", f"{name}={adapters[name][0]}"))]
    messages = [{"role": "user", "content": "Tell me about adapters."}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages,
                                                            add_generation_prompt=True))
    with running_server(folder, *flags, log=tmp_path / "server.log") as server:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                               timeout=120)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            replies = dict(zip(["beta", "tiny", "alpha"], pool.map(
                lambda name: client.chat.completions.create(model=name, messages=messages,
                                                            max_tokens=10),
                ["beta", "tiny", "alpha"]), strict=True))
        for name, reply in replies.items():
            expected = merged_greedy(model, None if name == "tiny" else name, prompt, 10)
            assert reply.choices[0].message.content == tokenizer.decode(
                expected, skip_special_tokens=True), name
            assert reply.model == name
        assert replies["alpha"].choices[0].message.content != \
            replies["tiny"].choices[0].message.content
        status, text = get(f"{server.url}/v1/models")
        cards = {c["id"]: c for c in json.loads(text)["data"]}
        assert status == 200 and list(cards) == ["tiny", "alpha", "beta"]
        assert cards["beta"]["parent"] == "tiny" and cards["beta"]["root"] == \
            adapters["beta"][0] and cards["tiny"]["parent"] is None
        with pytest.raises(openai.NotFoundError, match="gamma"):
            client.chat.completions.create(model="gamma", messages=messages, max_tokens=2)
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "gamma", "prompt": "x"},
                       timeout=30)
        error = r.json()["error"]
        assert r.status_code == 404 and error["type"] == "NotFoundError" and \
            error["param"] == "model" and "'alpha'" in error["message"]


def test_bad_lora_flags_exit_2_naming_the_flag(model, tmp_path, capsys):
    """Each found before the server starts, with --lora and the value named."""
    import qwen2_jax
    from qwen2_jax.cli import main

    folder, _, _, _, adapters = model
    make_hf_model(tmp_path / "other", hidden_size=48)  # another width: the adapter cannot fit
    other = qwen2_jax.Qwen2Config.from_file(str(tmp_path / "other"))
    settings = ADAPTERS["alpha"]
    lora.save_adapter(str(tmp_path / "wrong"), other, settings,
                      lora.init(other, settings, jax.random.key(0)), None)
    alpha = adapters["alpha"][0]
    cases = [(["alpha"], "--lora alpha: expected NAME=DIR"),
             ([f"alpha={tmp_path / 'missing'}"], "missing: no such folder"),
             ([f"alpha={folder}"], "not a PEFT adapter folder"),
             ([f"tiny={alpha}"], "is the base model's name"),
             ([f"alpha={alpha}", f"alpha={alpha}"], "given twice"),
             ([f"alpha={tmp_path / 'wrong'}"], "has shape")]
    for values, message in cases:
        flags = [f for v in values for f in ("--lora", v)]
        code = main(["serve", "--model", folder, "--port", str(free_port()),
                     "--served-model-name", "tiny", "--no-compile-cache", *flags])
        err = capsys.readouterr().err
        assert code == 2 and message in err and "--lora" in err, (values, err)
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    assert "--lora NAME=DIR" in capsys.readouterr().out


def test_adapters_on_a_tensor_parallel_mesh_equal_merged_generate(tmp_path):
    """On a mesh over the 8 test devices the stacked adapters are placed by their kernels'
    logical axes (B's heads split like q_proj's, the adapter axis whole), and a mixed batch
    still equals `generate` with each adapter merged, on one device."""
    import qwen2_jax
    from qwen2_jax.serve.engine import Engine
    from qwen2_jax.sharding import make_mesh

    folder = str(tmp_path / "base")
    make_hf_model(folder, num_attention_heads=4, num_key_value_heads=2)
    config, params = qwen2_jax.load(folder)
    named = [(settings, jax.tree.map(
        lambda x, i=i: 0.5 * jax.random.normal(jax.random.key(10 + i), x.shape),
        lora.init(config, settings, jax.random.key(i))))
        for i, settings in enumerate(ADAPTERS.values())]
    mesh = make_mesh("data=2,tensor=4")
    _, sharded = qwen2_jax.load(folder, mesh=mesh)
    engine = Engine(config, sharded, max_batch=2, max_model_len=64, prefill_chunk=16,
                    mesh=mesh, adapters=lora.stack_adapters(config, named))
    q = engine.params["layers_0"]["self_attn"]["q_proj"]
    assert q["lora_a"].shape == (3, 56, 5) and q["lora_b"].shape == (3, 5, 4, 14)
    assert tuple(q["lora_b"].sharding.spec) == (None, None, "tensor")
    engine.start()
    try:
        prompts, slots = [[5, 6, 7, 8], [9, 10, 11], [1, 2, 3, 4, 5]], [1, 2, 0]
        tokens = run_adapters(engine, prompts, slots, 6, [])
    finally:
        engine.stop()
    for prompt, slot, got in zip(prompts, slots, tokens, strict=True):
        merged = params if slot == 0 else lora.merge(config, params, named[slot - 1][1],
                                                     named[slot - 1][0])
        assert got == qwen2_jax.generate(config, merged, [prompt], max_new_tokens=6)[0]
