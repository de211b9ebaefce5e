"""`qwen2-jax serve` through real clients: the `openai` package and raw HTTP against a server
the test starts, on a tiny random Qwen2 with the real tokenizer. Every expected value comes
from another path: `qwen2_jax.generate` (solo, greedy), `qwen2_jax.forward`'s log-softmax,
or the same request sent alone."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import socket
import time

import httpx
import numpy as np
import openai
import pytest

from conftest import make_hf_model
from serving import free_port, get, running_server

STOPS = [151645, 151643]  # <|im_end|>, <|endoftext|>
TOKENIZER_SIZE = 151646
KEY = "test-key"
FLAGS = ("--max-batch", "4", "--max-model-len", "256", "--prefill-chunk", "64",
         "--served-model-name", "tiny", "--api-key", KEY)


@pytest.fixture(scope="module")
def model(tmp_path_factory, qwen2_tokenizer_dir):
    """A tiny random Qwen2 with the real vocabulary and tokenizer, greedy, stopping at eos;
    returns (folder, config, params, tokenizer)."""
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    folder = tmp_path_factory.mktemp("serve_model")
    make_serving_model(folder, qwen2_tokenizer_dir)
    config, params = qwen2_jax.load(str(folder))
    return str(folder), config, params, Tokenizer(str(folder))


def make_serving_model(folder, tokenizer_dir) -> None:
    """Saves a tiny random Qwen2 with the real vocabulary and tokenizer, greedy, stopping at
    eos, into folder."""
    make_hf_model(folder, vocab_size=151936, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tokenizer_dir / name).read_bytes())
    (folder / "generation_config.json").write_text(
        json.dumps({"do_sample": False, "eos_token_id": STOPS}))


@pytest.fixture(scope="module")
def server(model, tmp_path_factory):
    cache = tmp_path_factory.mktemp("compile_cache")
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(model[0], *FLAGS, "--compile-cache", str(cache), log=log) as s:
        s.compile_cache = cache
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def solo_greedy(model, prompt_ids, max_tokens, **settings) -> str:
    import qwen2_jax

    _, config, params, tokenizer = model
    tokens = qwen2_jax.generate(config, params, [prompt_ids], max_new_tokens=max_tokens,
                                stop_token_ids=STOPS, vocab_size=TOKENIZER_SIZE, **settings)[0]
    return tokenizer.decode(tokens, skip_special_tokens=True)


def test_warm_up_answers_503_then_every_program_is_compiled(server):
    """/health said 503 while the server compiled, and the compile cache holds every engine
    program: prefill chunks of 16 and 64, scoring, decode batches of 1, 2 and 4, the row
    move (test_sigterm_drains_running_requests restarts from them)."""
    assert 503 in server.statuses and server.statuses[-1] == 200
    names = sorted(n.rsplit("-", 1)[0] for n in os.listdir(server.compile_cache))
    assert names == sorted(["prefill-16", "prefill-64", "score-64", "decode-1", "decode-2",
                            "decode-4", "move-1"])
    assert server.metric("qwen2_jax:compiled_programs") == 7
    assert server.metric("qwen2_jax:loaded_programs") == 0


def test_chat_streamed_and_not_equals_generate(model, client):
    _, _, _, tokenizer = model
    messages = [{"role": "user", "content": "Write a haiku about the sea."}]
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    expected = solo_greedy(model, ids, 20)
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens == len(ids)
    assert reply.choices[0].finish_reason in ("stop", "length")
    if reply.choices[0].finish_reason == "length":
        assert reply.usage.completion_tokens == 20

    chunks = list(client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"  # the role first
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    content = [c for c in chunks if c.choices]
    assert content[-1].choices[0].finish_reason == reply.choices[0].finish_reason  # last
    assert all(c.choices[0].finish_reason is None for c in content[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == reply.usage  # the usage chunk


def test_completions_stream_wire_format(model, server):
    """The bytes on the wire: `data: {json}\\n\\n` events ending with `data: [DONE]`."""
    body = {"model": "tiny", "prompt": "Hello world", "max_tokens": 5, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e[len("data: "):]) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["prompt_tokens"] == 2
    text = "".join(p["choices"][0]["text"] for p in payloads[:-1])
    _, _, _, tokenizer = model
    assert text == solo_greedy(model, tokenizer.encode("Hello world"), 5)


def test_twelve_concurrent_requests_each_equal_their_solo_run(model, server, client):
    """Mixed prompt lengths and settings, 12 at once on 4 slots: greedy ones equal solo
    `generate`; seeded sampled ones equal the same request sent alone. No compile after
    warm-up."""
    rng = np.random.default_rng(0)
    requests = []
    for i in range(12):
        prompt = rng.integers(0, 151000, int(rng.integers(3, 150))).tolist()
        settings = {}
        if i % 3 == 1:
            settings = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 100 + i,
                        "presence_penalty": 0.5, "frequency_penalty": 0.3}
        elif i % 3 == 2:
            # top_k too: the random model's logits are near-uniform over 152k tokens, so
            # without it two candidates' sampling scores can tie within float rounding, which
            # can differ between a row decoded in a batch of 4 and alone (seed 208 diverged
            # after 20 tokens on one CPU); among 20 candidates such ties are far rarer.
            settings = {"temperature": 1.2, "min_p": 0.05, "top_k": 20, "seed": 200 + i,
                        "repetition_penalty": 1.2}
        elif i % 2:
            settings = {"repetition_penalty": 1.3}
        requests.append((prompt, int(rng.integers(4, 40)), settings))
    compilations = server.metric("qwen2_jax:xla_compilations_total")

    def send(request):
        prompt, max_tokens, settings = request
        vllm_only = {k: v for k, v in settings.items()
                     if k in ("top_k", "min_p", "repetition_penalty")}
        openai_fields = {k: v for k, v in settings.items() if k not in vllm_only}
        out = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens,
                                        extra_body=vllm_only, **openai_fields)
        return out.choices[0].text

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        together = list(pool.map(send, requests))
    for (prompt, max_tokens, settings), text in zip(requests, together, strict=True):
        if "temperature" in settings:
            assert text == send((prompt, max_tokens, settings)), settings
        else:
            assert text == solo_greedy(model, prompt, max_tokens, **settings), settings
    assert server.metric("qwen2_jax:xla_compilations_total") == compilations


def test_stop_strings_are_found_across_tokens_and_never_sent(client):
    prompt = "The quick brown fox"
    full = client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                     logprobs=0).choices[0]
    pieces = full.logprobs.tokens
    assert len(pieces) >= 6
    # a stop string that starts inside token 3 and ends inside token 4
    start = len("".join(pieces[:3])) - 1
    stop = full.text[start:start + 3]
    assert len(stop) == 3
    expected = full.text[:full.text.find(stop)]
    for stream in (False, True):
        reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=30,
                                          stop=["@@never@@", stop], stream=stream)
        if stream:
            chunks = list(reply)
            text = "".join(c.choices[0].text for c in chunks)
            reason = chunks[-1].choices[0].finish_reason
        else:
            text, reason = reply.choices[0].text, reply.choices[0].finish_reason
        assert (text, reason) == (expected, "stop")


def test_n_choices_are_seeded_and_distinct(client):
    def ask():
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], n=3, max_tokens=12,
            temperature=1.0, seed=7)
        return [c.message.content for c in sorted(reply.choices, key=lambda c: c.index)]

    first = ask()
    assert len(first) == 3 and len(set(first)) == 3
    assert ask() == first


def test_logprobs_equal_forward_log_softmax(model, client):
    """echo + logprobs: the prompt's and the generated tokens' log-probabilities, and the
    top alternatives, equal `forward`'s log-softmax over the whole text."""
    import qwen2_jax

    _, config, params, tokenizer = model
    prompt = tokenizer.encode("One two three four five six seven")
    reply = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, echo=True,
                                      logprobs=3).choices[0]
    n = len(reply.logprobs.token_logprobs)
    generated = n - len(prompt)
    assert generated == 4
    ids = prompt + qwen2_jax.generate(config, params, [prompt], 4, vocab_size=TOKENIZER_SIZE)[0]
    assert reply.text == tokenizer.decode(ids)  # greedy: the server chose these tokens
    logits = np.array(qwen2_jax.forward(config, params, np.array([ids])))[0]
    reference = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    assert reply.logprobs.token_logprobs[0] is None and reply.logprobs.top_logprobs[0] is None
    for i in range(1, n):
        np.testing.assert_allclose(reply.logprobs.token_logprobs[i],
                                   reference[i - 1, ids[i]], rtol=1e-4, atol=1e-4)
        best = np.sort(reference[i - 1])[::-1][:3]
        shown = sorted(reply.logprobs.top_logprobs[i].values(), reverse=True)[:3]
        np.testing.assert_allclose(shown, best, rtol=1e-4, atol=1e-4)

    only_prompt = client.completions.create(model="tiny", prompt=prompt, max_tokens=0,
                                            echo=True, logprobs=1).choices[0]
    assert only_prompt.logprobs.token_logprobs == reply.logprobs.token_logprobs[:len(prompt)]
    assert only_prompt.text == tokenizer.decode(prompt)


def test_chat_logprobs(model, client):
    reply = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=5,
        logprobs=True, top_logprobs=2).choices[0]
    entries = reply.logprobs.content
    assert "".join(e.token for e in entries) == reply.message.content
    for e in entries:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.logprob - 1e-6


@pytest.mark.parametrize("body, field", [
    ({"prompt": "x", "max_tokens": 300}, "max_tokens"),  # past --max-model-len 256
    ({"prompt": "x", "temperature": "hot"}, "temperature"),
    ({"prompt": "x", "top_p": 1.5}, "top_p"),
    ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "frobnicate": True}, "frobnicate"),
    ({"prompt": [151936]}, "prompt"),  # a token id past the vocabulary
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
])
def test_bad_requests_get_400_naming_the_field(server, body, field):
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", **body}, timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "BadRequestError" and error["code"] == 400
    assert error["param"] == field and field in error["message"], error


def test_bad_chat_requests_and_other_statuses(server, client):
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="tiny", messages=[{"role": "robot",
                                                                 "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.chat.completions.create(model="tiny", messages=[
            {"role": "user", "content": "word " * 300}])
    r = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
                   headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.NotFoundError, match="other"):
        client.completions.create(model="other", prompt="x", max_tokens=2)
    for key in ("wrong", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x"},
                       headers=headers, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["type"] == "AuthenticationError"
    assert get(f"{server.url}/v1/models")[0] == 401
    status, text = get(f"{server.url}/v1/models", {"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(text)["data"][0]["id"] == "tiny"


def test_a_client_that_disconnects_frees_its_slot(server):
    cancelled = server.metric('qwen2_jax:request_success_total{finished_reason="cancelled"}')
    body = {"model": "tiny", "prompt": "Tell me a long story", "max_tokens": 240,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
    deadline = time.monotonic() + 30
    while server.metric('qwen2_jax:request_success_total{finished_reason="cancelled"}') \
            == cancelled:
        assert time.monotonic() < deadline, "the disconnected request was never cancelled"
        time.sleep(0.1)
    assert server.metric("qwen2_jax:num_requests_running") == 0


def test_restart_reads_its_programs_and_sigterm_drains(model, tmp_path, server):
    """A second server with the same flags and compile cache reads every program instead of
    compiling one, and answers as `generate`. SIGTERM: the running stream still ends with
    all its tokens, then the server exits 0 and takes no new connections."""
    with running_server(model[0], *FLAGS, "--compile-cache", str(server.compile_cache),
                        log=tmp_path / "server.log") as second:
        assert second.metric("qwen2_jax:loaded_programs") == 7
        assert second.metric("qwen2_jax:compiled_programs") == 0
        _, _, _, tokenizer = model
        reply = httpx.post(f"{second.url}/v1/completions", timeout=60,
                           headers={"Authorization": f"Bearer {KEY}"},
                           json={"model": "tiny", "prompt": "Hello world", "max_tokens": 8})
        assert reply.json()["choices"][0]["text"] == solo_greedy(
            model, tokenizer.encode("Hello world"), 8)
        body = {"model": "tiny", "prompt": "Count to a hundred", "max_tokens": 200,
                "stream": True, "ignore_eos": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", f"{second.url}/v1/completions", json=body, timeout=120,
                          headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            next(line for line in lines if line.startswith("data: "))
            os.kill(second.process.pid, signal.SIGTERM)
            rest = [json.loads(line[6:]) for line in lines
                    if line.startswith("data: {")]
        assert rest[-1]["usage"]["completion_tokens"] == 200
        assert second.process.wait(60) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{second.url}/health", timeout=5)


def test_queue_full_gets_429_and_warming_up_503(model):
    """In-process: an engine whose scheduler has not started holds its queue, so the queue
    fills deterministically."""
    from starlette.testclient import TestClient

    from qwen2_jax.serve.app import Server, build_app
    from qwen2_jax.serve.engine import Engine, Sequence, Settings

    _, config, params, tokenizer = model
    engine = Engine(config, params, max_batch=1, max_model_len=64, max_queue=2)
    app = build_app(Server(engine, tokenizer, "tiny"))
    http = TestClient(app)  # no lifespan: the engine never starts
    body = {"model": "tiny", "prompt": "x", "max_tokens": 2}
    assert http.get("/health").status_code == 503
    warming = http.post("/v1/completions", json=body)
    assert warming.status_code == 503 and "warming up" in warming.json()["error"]["message"]
    engine.ready = True
    engine.submit([Sequence([1], Settings(2), lambda t: None, lambda r, p: None)
                   for _ in range(2)])
    full = http.post("/v1/completions", json=body)
    assert full.status_code == 429, full.text
    assert full.json()["error"]["type"] == "RateLimitError" and "max-queue" in full.text


def run_engine(engine, prompts: list[list[int]], max_tokens: int, **settings) -> list[list[int]]:
    """Every prompt through a started engine at once; the tokens of each."""
    import threading

    from qwen2_jax.serve.engine import Sequence, Settings

    results, done = {}, threading.Event()

    def sequence(i):
        tokens = []

        def on_finish(reason, _):
            results[i] = tokens
            if len(results) == len(prompts):
                done.set()

        return Sequence(prompts[i], Settings(max_tokens, stop_token_ids=frozenset(STOPS),
                                             **settings),
                        lambda info: tokens.append(info.token), on_finish)

    engine.submit([sequence(i) for i in range(len(prompts))])
    assert done.wait(300)
    return [results[i] for i in range(len(prompts))]


def test_engine_on_a_tensor_parallel_mesh_equals_one_device(model):
    """A mesh over the 8 test devices (tensor parallel over 4, the slots split over 2): the
    same greedy tokens as solo `generate` on one device, and the same seeded samples as the
    engine on one device. Every program hands the next its inputs placed as that one was
    compiled for (a mismatch would fail the call)."""
    import qwen2_jax
    from qwen2_jax.serve.engine import Engine
    from qwen2_jax.sharding import make_mesh

    folder, config, params, _ = model
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 151000, n).tolist() for n in (5, 70, 20)]
    expected = [qwen2_jax.generate(config, params, [p], 8, stop_token_ids=STOPS,
                                   vocab_size=TOKENIZER_SIZE)[0] for p in prompts]
    single = Engine(config, params, max_batch=2, max_model_len=128, prefill_chunk=64,
                    vocab_size=TOKENIZER_SIZE)
    single.start()
    sampled = run_engine(single, prompts, 8, temperature=1.0, seed=5)
    single.stop()
    mesh = make_mesh("data=2,tensor=4")
    _, sharded = qwen2_jax.load(folder, mesh=mesh)
    engine = Engine(config, sharded, max_batch=4, max_model_len=128, prefill_chunk=64,
                    vocab_size=TOKENIZER_SIZE, mesh=mesh)
    engine.start()
    try:
        assert run_engine(engine, prompts, 8) == expected
        assert run_engine(engine, prompts, 8, temperature=1.0, seed=5) == sampled
    finally:
        engine.stop()


def row_settings(batch: int, **values):
    from qwen2_jax.serve.step import RowSettings

    neutral = dict(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
                   presence_penalty=0.0, frequency_penalty=0.0, seed=0, sample_index=0,
                   token_index=0)
    dtypes = dict(top_k=np.int32, seed=np.uint32, sample_index=np.int32, token_index=np.int32)
    return RowSettings(**{k: np.broadcast_to(np.asarray(values.get(k, v), dtypes.get(
        k, np.float32)), (batch,)).copy() for k, v in neutral.items()})


def test_per_row_filters_keep_what_generate_keeps(rng):
    """The engine's per-row temperature, top-k, top-p and min-p keep exactly the tokens
    `sampling.process` (generate's, checked against transformers) keeps, each row with its
    own settings in one batch."""
    import jax.numpy as jnp

    from qwen2_jax.sampling import Sampling, process
    from qwen2_jax.serve.step import _filter

    cases = [dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8),
             dict(temperature=1.0, min_p=0.1), dict(temperature=0.9, top_k=40, top_p=0.5,
                                                    min_p=0.02), dict(temperature=1.0)]
    logits = rng.normal(size=(len(cases), 300)).astype(np.float32) * 3
    columns = {k: [c.get(k, {"top_k": 0, "top_p": 1.0, "min_p": 0.0}.get(k)) for c in cases]
               for k in ("temperature", "top_k", "top_p", "min_p")}
    ours = np.asarray(_filter(jnp.asarray(logits), row_settings(len(cases), **columns)))
    for row, case in enumerate(cases):
        expected = np.asarray(process(jnp.asarray(logits[row:row + 1]), jnp.zeros((1, 300), bool),
                                      Sampling(300, **case)))[0]
        np.testing.assert_array_equal(np.isfinite(ours[row]), np.isfinite(expected), str(case))
        kept = np.isfinite(expected)
        np.testing.assert_allclose(ours[row][kept], expected[kept], rtol=1e-6)


def test_sampling_draws_from_the_filtered_distribution():
    """20,000 draws (one per token index) of one row follow softmax(logits / T): the
    inverse-CDF draw picks each token at its probability, and never a removed one."""
    import jax
    import jax.numpy as jnp

    from qwen2_jax.serve.step import choose

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05, 0.0]]))  # the last can never come
    n = 20000
    settings = row_settings(1, temperature=1.0, seed=11)

    def draw(i):
        return choose(logits, jnp.zeros((1, 5), bool), jnp.zeros((1, 5), jnp.int32),
                      settings._replace(token_index=i[None]), 5).token[0]

    draws = jax.jit(jax.vmap(draw))(jnp.arange(n, dtype=jnp.int32))
    counts = np.bincount(np.asarray(draws), minlength=5) / n
    np.testing.assert_allclose(counts, [0.5, 0.3, 0.15, 0.05, 0.0], atol=0.015)


@pytest.mark.parametrize("flags, message", [
    (["--max-batch", "0"], "--max-batch must be >= 1"),
    (["--prefill-chunk", "8"], "--prefill-chunk must be >= 16"),
    (["--port", "70000"], "--port must be in 1..65535"),
    (["--max-model-len", "100000"], "past the model's position limit"),
])
def test_serve_refuses_bad_flags_before_loading(model, flags, message):
    port = [] if "--port" in flags else ["--port", str(free_port())]
    out = serve_command(model, *flags, *port)
    assert out.returncode == 2 and message in out.stderr, out.stderr


def test_serve_refuses_a_taken_port_and_an_unwritable_compile_cache(model, tmp_path):
    """Both found before the model loads, with the flag named (exit 2, no traceback)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        out = serve_command(model, "--port", port)
    assert out.returncode == 2 and f"--port {port}: cannot listen there" in out.stderr, \
        out.stderr
    assert "Traceback" not in out.stderr
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = serve_command(model, "--port", str(free_port()), "--compile-cache",
                        str(blocker / "cache"))
    assert out.returncode == 2 and "--compile-cache" in out.stderr and \
        "not a writable folder" in out.stderr, out.stderr
    assert blocker.read_text() == "" and list(tmp_path.iterdir()) == [blocker]


def serve_command(model, *flags: str):
    import subprocess

    from serving import SCRIPT

    return subprocess.run([str(SCRIPT), "serve", "--model", model[0], *flags],
                          capture_output=True, text=True, timeout=120)


def test_an_unreadable_program_file_is_compiled_again_and_replaced(tmp_path, caplog):
    """A truncated file in --compile-cache (a killed write, another jaxlib) is not an error:
    the store warns, compiles, and writes a good file in its place."""
    import jax

    from qwen2_jax.serve.programs import ProgramStore

    double = jax.jit(lambda x: x * 2)
    args = (np.arange(4, dtype=np.float32),)
    ProgramStore(str(tmp_path), [jax.devices()[0]]).get("double", double, (), args)
    (path,) = tmp_path.glob("double-*.xla")
    path.write_bytes(path.read_bytes()[:100])
    store = ProgramStore(str(tmp_path), [jax.devices()[0]])
    program = store.get("double", double, (), args)
    assert (store.compiled, store.loaded) == (1, 0)
    assert "unreadable" in caplog.text and "compiling it again" in caplog.text
    np.testing.assert_array_equal(program(*args), [0, 2, 4, 6])
    again = ProgramStore(str(tmp_path), [jax.devices()[0]])
    again.get("double", double, (), args)
    assert (again.compiled, again.loaded) == (0, 1)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind
