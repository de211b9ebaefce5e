"""OpenAI request bodies, checked field by field, into the engine's terms.

Fields and ranges are vLLM's for `/v1/completions` and `/v1/chat/completions`. A bad request
is an `ApiError` (400 with OpenAI's error body) naming the field, what it must be and what
came; unknown fields are named too, never silently dropped.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from qwen2_jax.config import is_int, is_number
from qwen2_jax.serve.engine import Settings

MAX_STOP_STRINGS = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16


class ApiError(Exception):
    """An error answered with OpenAI's body: {"error": {message, type, param, code}}."""

    TYPES: ClassVar[dict[int, str]] = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
             429: "RateLimitError", 503: "ServiceUnavailableError",
             500: "InternalServerError"}

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "Error"),
                          "param": self.param, "code": self.status}}


def _bad(field: str, expected: str, value) -> ApiError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return ApiError(400, f"'{field}' must be {expected}, got {shown}", field)


# field: (check, what it must be)
COMMON = {
    "model": (lambda v: isinstance(v, str), "a string"),
    "max_tokens": (lambda v: v is None or (is_int(v) and v >= 0), "an integer >= 0"),
    "temperature": (lambda v: v is None or (is_number(v) and 0 <= v <= 2), "a number in [0, 2]"),
    "top_p": (lambda v: v is None or (is_number(v) and 0 < v <= 1), "a number in (0, 1]"),
    "top_k": (lambda v: v is None or (is_int(v) and v >= -1), "an integer >= -1 (-1, 0: off)"),
    "min_p": (lambda v: v is None or (is_number(v) and 0 <= v <= 1), "a number in [0, 1]"),
    "repetition_penalty": (lambda v: v is None or (is_number(v) and v > 0), "a number > 0"),
    "presence_penalty": (lambda v: v is None or (is_number(v) and -2 <= v <= 2),
                         "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: v is None or (is_number(v) and -2 <= v <= 2),
                          "a number in [-2, 2]"),
    "seed": (lambda v: v is None or (is_int(v) and -2**63 <= v < 2**64), "an integer"),
    "n": (lambda v: v is None or (is_int(v) and 1 <= v <= MAX_N), f"an integer in [1, {MAX_N}]"),
    "stream": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "stream_options": (lambda v: v is None or (isinstance(v, dict) and set(v) <= {
        "include_usage", "continuous_usage_stats"} and all(
            isinstance(x, bool) for x in v.values())),
        'an object {"include_usage": bool}'),
    "stop": (lambda v: v is None or isinstance(v, str) or (
        isinstance(v, list) and len(v) <= MAX_STOP_STRINGS and all(
            isinstance(s, str) and s for s in v)),
        f"a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"),
    "stop_token_ids": (lambda v: v is None or (isinstance(v, list) and all(
        is_int(i) and i >= 0 for i in v)), "a list of token ids"),
    "ignore_eos": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "skip_special_tokens": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "user": (lambda v: v is None or isinstance(v, str), "a string"),
}
COMPLETION = {
    **COMMON,
    "prompt": (lambda v: _is_prompt(v), "a string, a list of strings, a list of token ids or "
               "a list of token-id lists (none empty)"),
    "echo": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "logprobs": (lambda v: v is None or (is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS),
                 f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
    "best_of": (lambda v: v is None or (is_int(v) and v >= 1), "an integer >= 1"),
}
CHAT = {
    **COMMON,
    "messages": (lambda v: isinstance(v, list) and len(v) > 0, "a non-empty list of messages"),
    "max_completion_tokens": COMMON["max_tokens"],
    "logprobs": (lambda v: v is None or isinstance(v, bool), "a boolean"),
    "top_logprobs": (lambda v: v is None or (is_int(v) and 0 <= v <= MAX_TOP_LOGPROBS),
                     f"an integer in [0, {MAX_TOP_LOGPROBS}]"),
    "add_generation_prompt": (lambda v: v is None or isinstance(v, bool), "a boolean"),
}
UNSUPPORTED = {
    "logit_bias": "logit_bias is not supported",
    "suffix": "suffix (fill-in-the-middle) is not supported",
    "tools": "tool calling is not supported by this server",
    "tool_choice": "tool calling is not supported by this server",
    "response_format": "response_format (structured output) is not supported",
    "functions": "function calling is not supported by this server",
}
ROLES = ("system", "user", "assistant", "tool", "developer")


def _is_prompt(v) -> bool:
    if isinstance(v, str):
        return True
    if not isinstance(v, list) or not v:
        return False
    if all(isinstance(x, str) for x in v):
        return True
    if all(is_int(x) and x >= 0 for x in v):
        return True
    return all(isinstance(x, list) and x and all(is_int(i) and i >= 0 for i in x) for x in v)


@dataclasses.dataclass
class Parsed:
    """A checked request: prompts (text or ids, one per prompt), generation settings."""

    body: dict
    prompts: list  # str or list[int], one per prompt
    max_tokens: int | None
    settings: dict  # Settings fields other than max_tokens and the stop ids
    stop: list[str]
    stop_token_ids: list[int]
    ignore_eos: bool
    n: int
    stream: bool
    include_usage: bool
    echo: bool = False
    skip_special_tokens: bool = True


def _check_fields(body, fields: dict) -> None:
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    for name, message in UNSUPPORTED.items():
        if body.get(name) not in (None, [], {}):
            raise ApiError(400, message, name)
    unknown = sorted(set(body) - set(fields) - set(UNSUPPORTED))
    if unknown:
        raise ApiError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; this server "
                       f"takes {', '.join(sorted(fields))}", unknown[0])
    for name, (ok, expected) in fields.items():
        if name in body and not ok(body[name]):
            raise _bad(name, expected, body[name])


def _settings(body: dict, defaults: dict) -> dict:
    """Sampling settings: the request's, else the model's generation config (`defaults`),
    else OpenAI's."""
    def pick(name, neutral):
        value = body.get(name)
        return defaults.get(name, neutral) if value is None else value

    top_k = pick("top_k", 0)
    return dict(temperature=float(pick("temperature", 1.0)), top_k=max(int(top_k), 0),
                top_p=float(pick("top_p", 1.0)), min_p=float(pick("min_p", 0.0)),
                repetition_penalty=float(pick("repetition_penalty", 1.0)),
                presence_penalty=float(body.get("presence_penalty") or 0.0),
                frequency_penalty=float(body.get("frequency_penalty") or 0.0),
                seed=None if body.get("seed") is None else int(body["seed"]) % 2**64)


def _common(body: dict, prompts: list, max_tokens, defaults: dict, **extra) -> Parsed:
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else list(stop)
    if isinstance(body.get("stop"), str) and not stop[0]:
        raise _bad("stop", "a non-empty string", "")
    options = body.get("stream_options") or {}
    if options and not body.get("stream"):
        raise ApiError(400, "'stream_options' is only allowed with 'stream': true",
                       "stream_options")
    return Parsed(body, prompts, max_tokens, _settings(body, defaults), stop,
                  list(body.get("stop_token_ids") or []), bool(body.get("ignore_eos")),
                  body.get("n") or 1, bool(body.get("stream")),
                  bool(options.get("include_usage")),
                  skip_special_tokens=body.get("skip_special_tokens", True) is not False,
                  **extra)


def parse_completion(body, defaults: dict) -> Parsed:
    """POST /v1/completions. max_tokens defaults to 16, as OpenAI's."""
    _check_fields(body, COMPLETION)
    if "prompt" not in body:
        raise ApiError(400, "'prompt' is required", "prompt")
    prompt = body["prompt"]
    single = isinstance(prompt, str) or is_int(prompt[0])
    prompts = [prompt] if single else list(prompt)
    n = body.get("n") or 1
    if body.get("best_of") not in (None, n):
        raise ApiError(400, "best_of other than n is not supported", "best_of")
    max_tokens = 16 if body.get("max_tokens") is None else body["max_tokens"]
    parsed = _common(body, prompts, max_tokens, defaults, echo=bool(body.get("echo")))
    parsed.settings["logprobs"] = body.get("logprobs")
    if max_tokens == 0 and not parsed.echo:
        raise ApiError(400, "'max_tokens' is 0: only allowed with 'echo': true (prompt "
                       "log-probabilities)", "max_tokens")
    if parsed.echo and parsed.stream:
        raise ApiError(400, "'echo' with 'stream' is not supported", "echo")
    return parsed


def parse_chat(body, defaults: dict) -> Parsed:
    """POST /v1/chat/completions. max_tokens (or max_completion_tokens) defaults to what is
    left of the context after the prompt, as vLLM."""
    _check_fields(body, CHAT)
    if "messages" not in body:
        raise ApiError(400, "'messages' is required", "messages")
    messages = [_message(i, m) for i, m in enumerate(body["messages"])]
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    if max_tokens == 0:
        raise _bad("max_tokens", "an integer >= 1", 0)
    if body.get("top_logprobs") and not body.get("logprobs"):
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
    parsed = _common(body, [messages], max_tokens, defaults)
    parsed.settings["logprobs"] = (body.get("top_logprobs") or 0) if body.get("logprobs") \
        else None
    return parsed


def _message(index: int, message) -> dict:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise _bad(where, "an object with 'role' and 'content'", message)
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"{where}.role", f"one of {', '.join(ROLES)}", role)
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"{where}.content[{j}]", 'a text part {"type": "text", "text": ...} '
                           "(this model reads text only)", part)
            texts.append(part["text"])
        content = "".join(texts)
    if content is None and role == "assistant":
        content = ""
    if not isinstance(content, str):
        raise _bad(f"{where}.content", "a string or a list of text parts", content)
    return {**message, "content": content}


def engine_settings(parsed: Parsed, max_tokens: int, stop_token_ids: set[int]) -> Settings:
    """The engine's Settings for one choice of a checked request."""
    return Settings(max_tokens=max_tokens, stop_token_ids=frozenset(stop_token_ids),
                    prompt_logprobs=parsed.echo, **parsed.settings)
