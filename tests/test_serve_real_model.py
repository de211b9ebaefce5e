"""`qwen2-jax serve` on the embedded Qwen2.5-Coder-0.5B-Instruct (the real-model tier): the
model card's curl, and the `openai` client with concurrent requests, against the model's own
greedy `generate` and the same request sent alone."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess

import numpy as np
import pytest

from conftest import real_model_folder
from serving import running_server

pytestmark = pytest.mark.real_model

STOPS = [151645, 151643]
MODEL = "Qwen2.5-Coder-0.5B-Instruct"  # the default model's folder name, one of its names


@pytest.fixture(scope="module")
def folder() -> str:
    return real_model_folder()


@pytest.fixture(scope="module")
def server(folder, tmp_path_factory):
    """The default model (no --model), as a user starts it."""
    tmp = tmp_path_factory.mktemp("serve_real")
    with running_server(None, "--max-batch", "4", "--max-model-len", "1024",
                        "--prefill-chunk", "64", "--compile-cache", str(tmp / "cache"),
                        log=tmp / "server.log") as s:
        yield s


@pytest.fixture(scope="module")
def ours(folder):
    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer

    config, params = qwen2_jax.load(folder)
    return config, params, Tokenizer(folder)


def greedy_answer(ours, messages, max_tokens) -> tuple[str, bool]:
    """generate's greedy answer to a chat, and whether it ended at a stop token."""
    import qwen2_jax

    config, params, tokenizer = ours
    ids = tokenizer.encode(tokenizer.apply_chat_template(messages))
    tokens = qwen2_jax.generate(config, params, [ids], max_new_tokens=max_tokens + 1,
                                stop_token_ids=STOPS, vocab_size=len(tokenizer))[0]
    return tokenizer.decode(tokens[:max_tokens], skip_special_tokens=True), \
        len(tokens) <= max_tokens


def test_the_model_card_curl(server, ours):
    """The model card's deployment example, as written there (endpoint, header, body with
    the card's model name), with a question whose answer is short."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed")
    messages = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is the capital of France? One word."}]
    body = json.dumps({"model": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "messages": messages})
    out = subprocess.run([curl, "-s", f"{server.url}/v1/chat/completions", "-H",
                          "Content-Type: application/json", "-d", body],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    reply = json.loads(out)
    text, stopped = greedy_answer(ours, messages, 64)
    assert stopped and reply["choices"][0]["finish_reason"] == "stop"
    assert reply["choices"][0]["message"]["content"] == text
    assert "Paris" in text


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                         timeout=600)


def test_concurrent_chats_equal_their_solo_runs(client, ours):
    questions = ["Write a Python function that reverses a string.",
                 "What does HTTP status 404 mean?",
                 "Explain recursion in one sentence. " * 6,
                 "List three sorting algorithms."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    # the card's recommended sampling, seeded
    sampled = dict(temperature=0.7, top_p=0.8, seed=42,
                   extra_body={"top_k": 20, "repetition_penalty": 1.05})

    def ask(messages, settings):
        reply = client.chat.completions.create(model=MODEL,
                                               messages=messages, max_tokens=24, **settings)
        return reply.choices[0].message.content

    jobs = [(m, {}) for m in chats] + [(chats[0], sampled)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(*job), jobs))
    for messages, text in zip(chats, together, strict=False):
        assert text == greedy_answer(ours, messages, 24)[0]
    assert together[-1] == ask(chats[0], sampled)  # alone


def log_softmax(logits):
    """In float64: a float32 np.logaddexp.reduce over 151,936 logits drifts by ~1e-2."""
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=-1, keepdims=True)
    return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


def test_completions_logprobs_stream_and_stop_strings(client, ours):
    """A raw completion, greedy, with echo: its tokens are `generate`'s, and its log-probs
    and top alternatives are `forward`'s log-softmax. Streamed, the same text. A stop string
    that spans two tokens ends it just before, unsent."""
    import qwen2_jax

    config, params, tokenizer = ours
    prompt = tokenizer.encode("def fibonacci(n):\n")
    reply = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, echo=True,
                                      logprobs=3).choices[0]
    generated = qwen2_jax.generate(config, params, [prompt], 12, stop_token_ids=STOPS,
                                   vocab_size=len(tokenizer))[0]
    ids = prompt + generated
    assert reply.text == tokenizer.decode(ids) and len(generated) == 12
    logits = np.array(qwen2_jax.forward(config, params, np.array([ids])))[0]
    reference = log_softmax(logits)
    shown = reply.logprobs
    assert len(shown.token_logprobs) == len(ids) and shown.token_logprobs[0] is None
    for i in range(1, len(ids)):
        np.testing.assert_allclose(shown.token_logprobs[i], reference[i - 1, ids[i]],
                                   rtol=1e-4, atol=3e-4)
        best = np.sort(reference[i - 1])[::-1][:3]
        np.testing.assert_allclose(sorted(shown.top_logprobs[i].values(), reverse=True)[:3],
                                   best, rtol=1e-4, atol=3e-4)

    text = tokenizer.decode(generated)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == text

    pieces = shown.tokens[len(prompt):]
    start = len("".join(pieces[:4])) - 1  # from the last character of token 4 into token 5
    stop = text[start:start + 3]
    assert len(stop) == 3, pieces
    cut = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12,
                                    stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (text[:text.find(stop)], "stop")


def test_n_sampled_choices_and_streamed_chat(client, ours):
    """n=2, sampled with a seed: two different answers, the same two again on a repeat. A
    streamed chat: the role first, generate's greedy answer, the finish reason last."""
    def sample():
        reply = client.completions.create(model=MODEL, prompt="A random animal name:", n=2,
                                          max_tokens=8, temperature=1.5, seed=11)
        return [c.text for c in sorted(reply.choices, key=lambda c: c.index)]

    first = sample()
    assert len(first) == 2 and first[0] != first[1]
    assert sample() == first

    messages = [{"role": "user", "content": "Name a Python keyword."}]
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages,
                                                 max_tokens=16, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    expected, stopped = greedy_answer(ours, messages, 16)
    assert text == expected
    assert chunks[-1].choices[0].finish_reason == ("stop" if stopped else "length")


def test_bad_requests_on_the_real_model(server):
    """400 for a request past --max-model-len (1024) and for an unknown field, each named;
    404 for a model the server does not serve."""
    import httpx

    def post(body):
        return httpx.post(f"{server.url}/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "def f():", **body})

    for body, field in (({"max_tokens": 2000}, "max_tokens"),
                        ({"max_tokens": 4, "best_guess": 1}, "best_guess")):
        r = post(body)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = post({"model": "Qwen/Qwen2.5-72B-Instruct"})
    assert r.status_code == 404 and "Qwen2.5-72B" in r.json()["error"]["message"], r.text
