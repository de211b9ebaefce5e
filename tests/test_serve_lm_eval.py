"""lm-evaluation-harness through `qwen2-jax serve`: `lm_eval --model local-completions` scores a
multiple-choice task exactly as `lm_eval --model hf` does on the same weights.

The model is a tiny random Qwen2 with the real Qwen2 tokenizer (151,646 tokens) and the real
embedding size (151,936 rows); the task (16 questions, 4 choices each, some choices non-ASCII
and of different lengths so that acc and acc_norm differ) and its JSONL data are written into
tmp_path and loaded with --include_path. A random model's accuracy means nothing in itself, so
the test compares every one of the 64 per-choice loglikelihoods (--log_samples) to transformers'
within rtol 1e-4, then the acc and acc_norm figures exactly; it first checks that in the
reference every question's best choice beats the runner-up by more than that tolerance, so that
agreeing loglikelihoods imply the same picks.

Everything is offline (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE, HF_HOME in tmp_path): the dataset
is local JSON, the model and tokenizer are local folders.

What lm-eval 0.4.13 sends (models/openai_completions.py LocalCompletionsAPI._create_payload
and api_models.py TemplateAPI.model_call, with num_concurrent=1, so plain `requests.post`):

    POST http://127.0.0.1:PORT/v1/completions   (base_url is the whole URL)
    Content-Type: application/json
    Authorization: Bearer                       (empty: $OPENAI_API_KEY is unset)
    {"model": NAME, "prompt": [[ids...], ...], "temperature": 0, "max_tokens": 1,
     "logprobs": 1, "seed": 1234, "echo": true}

one request per batch of --batch_size 4 loglikelihood requests (sorted longest first), so
`prompt` is a list of 1 to 4 token-id lists of different lengths; each list is a question's
context followed by one choice's continuation, e.g. for "Question: What is the boiling point
of water at sea level?\\nAnswer: 100 °C" the ids [14582, 25, 3555, ..., 16141, 25, 220, 16, 15,
15, 36286, 34].

tokenizer=FOLDER with tokenizer_backend=huggingface: lm-eval tokenizes with the model's own
tokenizer.json, loaded from disk (the default "auto" would first probe the server's /tokenize
and /tokenizer_info). tokenized_requests=True (the default, stated): lm-eval finds the context
length (ctxlen) with its tokenizer and slices the server's echoed log-probabilities by that
count, so the server must score exactly lm-eval's ids; with False it would send
tokenizer.decode(ids) as a string and rely on the server re-tokenizing it to the same ids.

What the server must answer (LocalCompletionsAPI.parse_logprobs): HTTP 2xx and JSON
{"choices": [...]} with one choice per prompt, each with
  - "index": the prompt's position in the list (lm-eval sorts the choices by it);
  - "logprobs": {"token_logprobs": [...], "top_logprobs": [...]}: because echo is true, both
    cover the prompt's tokens and then the one generated token (max_tokens 1), so they have
    len(prompt) + 1 entries; entry i is log p(token i | tokens before it) under the model, and
    None for the first prompt token. lm-eval takes sum(token_logprobs[ctxlen:-1]), the
    continuation's loglikelihood: the final -1 drops the generated token, so an answer without
    it would silently lose the continuation's last token. top_logprobs[i] is a
    {token_string: logprob} dict of the top `logprobs` (1) tokens; lm-eval's is_greedy checks
    token_logprobs[i] == max(top_logprobs[i].values()) exactly.
"tokens", "text_offset" and "text" are not read. Each log p is normalized over all the
model's config.vocab_size logits (151,936 here), as `lm_eval --model hf` (log_softmax of
transformers' logits) does: normalizing over the tokenizer's 151,646 ids only, leaving out the
embedding's padding rows, raises every token's log p by -log(1 - p(padding rows)), here about
0.002 a token, 2e-4 relative: more than RTOL.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_hf_model
from serving import start_server

NAME = "tiny-qwen2"  # --served-model-name, and lm-eval's model=
TASK = "qwen2jax_tiny_mc"
RTOL = 1e-4  # per-choice loglikelihoods, ours against transformers'
LM_EVAL_TIMEOUT = 300  # seconds for one lm_eval run

# (question, choices, index of the right one): plain and non-ASCII choices of 1 to 12
# characters, so that acc (raw loglikelihood) and acc_norm (per character) pick differently.
QUESTIONS = [
    ("What colour is a clear daytime sky?", ["blue", "green", "red", "yellow"], 0),
    ("How many legs does a spider have?", ["six", "eight", "four", "ten"], 1),
    ("Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("What is 7 times 6?", ["42", "36", "48", "56"], 0),
    ("Which gas do plants absorb?", ["oxygen", "nitrogen", "helium", "carbon dioxide"], 3),
    ("What is the capital of Japan?", ["Kyoto", "Tokyo", "Osaka", "東京"], 1),
    ("Which word means 'coffee' in French?", ["café", "thé", "lait", "eau"], 0),
    ("What does H2O denote?", ["salt", "sugar", "water", "sand"], 2),
    ("Which animal is known as the king of the jungle?",
     ["the lion", "a mouse", "an eagle", "the elephant"], 0),
    ("How many days are in a leap year?", ["365", "366", "364", "360"], 1),
    ("Which keyword defines a function in Python?", ["func", "function", "def", "lambda x: x"], 2),
    ("What is the boiling point of water at sea level?", ["100 °C", "90 °C", "80 °C", "120 °C"], 0),
    ("Which is a prime number?", ["9", "15", "21", "13"], 3),
    ("Which ocean is the largest?", ["Atlantic", "Indian", "Pacific", "Arctic"], 2),
    ("What is the opposite of 'hot'?", ["warm", "cold", "tepid", "scalding hot"], 1),
    ("Which symbol is used for addition?", ["+", "-", "×", "÷"], 0),
]

TASK_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, qwen2_tokenizer_dir) -> Path:
    """A tiny random Qwen2 with the real vocabulary and tokenizer, as transformers saves it."""
    folder = tmp_path_factory.mktemp("tiny_qwen2")
    make_hf_model(folder, vocab_size=151936, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((qwen2_tokenizer_dir / name).read_bytes())
    return folder


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_task")
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a},
                                       ensure_ascii=False) + "\n" for q, c, a in QUESTIONS),
                    encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data))
    return folder


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    """Started here, not waited for: its warm-up overlaps the transformers reference run."""
    server = start_server(str(model_dir), "--served-model-name", NAME, "--no-compile-cache",
                          log=tmp_path_factory.mktemp("serve") / "server.log")
    try:
        yield server
    finally:
        server.stop()


def lm_eval(model: str, model_args: str, task_dir: Path, out: Path,
            *flags: str) -> tuple[dict, list[dict]]:
    """One offline `lm_eval run`: its results JSON and its samples, in doc order."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(out / "hf_home"), "TOKENIZERS_PARALLELISM": "false"}
    env.pop("OPENAI_API_KEY", None)
    command = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args",
               model_args, "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "4",
               "--output_path", str(out / "results"), "--log_samples", *flags]
    done = subprocess.run(command, env=env, capture_output=True, text=True,
                          timeout=LM_EVAL_TIMEOUT)
    assert done.returncode == 0, (f"lm_eval --model {model} failed ({done.returncode}):\n"
                                  f"{done.stdout[-3000:]}\n{done.stderr[-6000:]}")
    (results,) = (out / "results").glob("*/results_*.json")
    (samples,) = (out / "results").glob(f"*/samples_{TASK}_*.jsonl")
    lines = [json.loads(line) for line in samples.read_text(encoding="utf-8").splitlines()]
    return json.loads(results.read_text()), sorted(lines, key=lambda s: s["doc_id"])


def scores(samples: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    """[docs, choices] loglikelihoods and is_greedy flags, as lm-eval logged them."""
    resps = [s["filtered_resps"] for s in samples]
    return (np.array([[float(ll) for ll, _ in r] for r in resps]),
            np.array([[greedy == "True" for _, greedy in r] for r in resps]))


@pytest.fixture(scope="module")
def hf_reference(model_dir, task_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_eval_hf")
    results, samples = lm_eval("hf", f"pretrained={model_dir},dtype=float32", task_dir, out,
                               "--device", "cpu")
    # The reference must make the comparison meaningful: loglikelihoods that agree within RTOL
    # pick the same choices (acc: raw, acc_norm: per character, lm-eval's len(choice)).
    lls, _ = scores(samples)
    lengths = np.array([[len(c) for c in choices] for _, choices, _ in QUESTIONS], float)
    for picked in (lls, lls / lengths):
        top = np.sort(picked, axis=1)
        margin = (top[:, -1] - top[:, -2]) / (np.abs(top[:, -1]) + np.abs(top[:, -2]))
        assert margin.min() > 2 * RTOL, f"a near tie in the reference: margins {margin}"
    return results, samples


def test_lm_eval_local_completions_matches_hf(server, hf_reference, model_dir, task_dir,
                                              tmp_path):
    hf_results, hf_samples = hf_reference
    server.wait_ready()
    model_args = ",".join([f"model={NAME}", f"base_url={server.url}/v1/completions",
                           "num_concurrent=1", "max_retries=1", f"tokenizer={model_dir}",
                           "tokenizer_backend=huggingface", "tokenized_requests=True"])
    results, samples = lm_eval("local-completions", model_args, task_dir, tmp_path)

    assert [s["doc"] for s in samples] == [s["doc"] for s in hf_samples]
    ours, ours_greedy = scores(samples)
    theirs, theirs_greedy = scores(hf_samples)
    assert ours.shape == (len(QUESTIONS), 4)
    np.testing.assert_allclose(
        ours, theirs, rtol=RTOL,
        err_msg="per-choice loglikelihoods [question, choice]: local-completions through "
                f"qwen2-jax serve against lm_eval --model hf\nserver log:\n{server.tail()}")
    np.testing.assert_array_equal(ours_greedy, theirs_greedy)

    for metric in ("acc,none", "acc_norm,none"):
        assert results["results"][TASK][metric] == hf_results["results"][TASK][metric], metric
    assert [s["acc"] for s in samples] == [s["acc"] for s in hf_samples]
    assert [s["acc_norm"] for s in samples] == [s["acc_norm"] for s in hf_samples]
    # Not a degenerate figure that any constant answer would reproduce.
    assert results["results"][TASK]["acc,none"] != results["results"][TASK]["acc_norm,none"]
