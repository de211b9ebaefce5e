"""`qwen2-jax serve` on the embedded Qwen2.5-Coder-0.5B-Instruct (the real-model tier): the
model card's curl, and the `openai` client with concurrent requests, against the model's own
greedy `generate` and the same request sent alone."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess

import pytest

from conftest import real_model_folder
from serving import running_server

pytestmark = pytest.mark.real_model

STOPS = [151645, 151643]


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


def test_concurrent_chats_equal_their_solo_runs(server, ours):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0,
                           timeout=600)
    questions = ["Write a Python function that reverses a string.",
                 "What does HTTP status 404 mean?",
                 "Explain recursion in one sentence. " * 6,
                 "List three sorting algorithms."]
    chats = [[{"role": "user", "content": q}] for q in questions]
    # the card's recommended sampling, seeded
    sampled = dict(temperature=0.7, top_p=0.8, seed=42,
                   extra_body={"top_k": 20, "repetition_penalty": 1.05})

    def ask(messages, settings):
        reply = client.chat.completions.create(model="Qwen2.5-Coder-0.5B-Instruct",
                                               messages=messages, max_tokens=24, **settings)
        return reply.choices[0].message.content

    jobs = [(m, {}) for m in chats] + [(chats[0], sampled)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: ask(*job), jobs))
    for messages, text in zip(chats, together, strict=False):
        assert text == greedy_answer(ours, messages, 24)[0]
    assert together[-1] == ask(chats[0], sampled)  # alone
