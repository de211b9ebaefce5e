"""The OpenAI-compatible HTTP API (Starlette), in front of one `Engine`.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health,
GET /metrics. Each request becomes one engine `Sequence` per prompt and choice; the engine's
thread hands tokens to the request's asyncio queue. Errors are OpenAI's body with a 4xx
status (400 bad request, 401 bad key, 404 unknown model, 429 queue full, 503 warming up or
shutting down); a client that disconnects cancels its sequences, freeing their slots.

LoRA adapters (`serve --lora NAME=DIR`) are picked by the request's `model`, as vLLM's
`--lora-modules`: the base's names run the base, an adapter's NAME its engine slot; replies
carry the name asked for, and /v1/models lists every adapter with its base as "parent".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.routing import Route

from qwen2_jax.serve import protocol
from qwen2_jax.serve.engine import Engine, EngineStopped, QueueFull, Sequence
from qwen2_jax.serve.output import ChoiceText, chat_logprobs, completion_logprobs
from qwen2_jax.serve.protocol import ApiError
from qwen2_jax.tokenizer import Tokenizer

logger = logging.getLogger("qwen2_jax.serve")

DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


class Server:
    """What the routes need: the engine, the tokenizer, the name and the defaults."""

    def __init__(self, engine: Engine, tokenizer: Tokenizer, model_names: str | list[str], *,
                 api_keys: list[str] | None = None, defaults: dict | None = None,
                 eos_token_ids: set[int] | None = None, root: str = "",
                 adapters: dict[str, str] | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        names = [model_names] if isinstance(model_names, str) else list(model_names)
        self.model_name = names[0]  # what replies and /v1/models carry
        self.model_names = set(names)  # what requests may name
        self.api_keys = [k.encode() for k in api_keys or []]
        self.defaults = defaults or {}
        self.eos_token_ids = set(eos_token_ids or ())
        self.root = root
        # adapter NAME -> its folder, in engine slot order (slot 1 first)
        self.adapters = dict(adapters or {})
        self.slots = {name: slot for slot, name in enumerate(self.adapters, start=1)}
        self.created = int(time.time())

    # -- checks -----------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if not self.api_keys:
            return
        given = request.headers.get("authorization", "")
        token = given[7:].encode() if given.startswith("Bearer ") else b""
        if not any(hmac.compare_digest(token, key) for key in self.api_keys):
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)")

    def check_ready(self) -> None:
        if self.engine.error is not None:
            raise ApiError(503, f"the engine failed: {self.engine.error!r}")
        if not self.engine.ready:
            raise ApiError(503, "the server is warming up (compiling); retry shortly, or "
                           "wait for GET /health to answer 200")

    def check_model(self, body: dict) -> tuple[str, int]:
        """(the name replies carry, the engine's adapter slot) of the request's model."""
        name = body.get("model")
        if name is None:
            return self.model_name, 0
        if name in self.slots:
            return name, self.slots[name]
        if name not in self.model_names:
            served = sorted(self.model_names) + list(self.adapters)
            raise ApiError(404, f"the model {name!r} does not exist; this server serves "
                           f"{' or '.join(map(repr, served))}", "model")
        return name, 0

    def prompt_ids(self, prompt, field: str = "prompt") -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise ApiError(400, f"'{field}' is empty after tokenization", field)
        vocab = self.engine.config.vocab_size
        bad = [i for i in ids if i >= vocab]
        if bad:
            raise ApiError(400, f"'{field}' holds token id {bad[0]}, past the model's "
                           f"vocabulary of {vocab}", field)
        return ids

    def max_tokens(self, parsed, prompt_len: int) -> int:
        limit = self.engine.max_model_len
        max_tokens = parsed.max_tokens
        if max_tokens is None:  # chat: what is left of the context
            max_tokens = limit - prompt_len
        if prompt_len + max_tokens > limit:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens; the "
                           f"request asks for {prompt_len + max_tokens} ({prompt_len} in the "
                           f"prompt, {max_tokens} to generate): shorten the prompt or lower "
                           "max_tokens", "max_tokens")
        if max_tokens < 1 and not parsed.echo:
            raise ApiError(400, f"this model's maximum context length is {limit} tokens and "
                           f"the prompt has {prompt_len}: nothing is left to generate",
                           "messages")
        return max_tokens


class Job:
    """One HTTP request in flight: its sequences and the queue their events arrive on."""

    def __init__(self, server: Server, parsed, prompts: list[list[int]], max_tokens: list[int],
                 adapter: int = 0):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.parsed = parsed
        self.prompts = prompts
        stops = set(parsed.stop_token_ids)
        if not parsed.ignore_eos:
            stops |= server.eos_token_ids
        self.texts: list[ChoiceText] = []
        self.sequences: list[Sequence] = []
        for p, prompt in enumerate(prompts):
            settings = protocol.engine_settings(parsed, max_tokens[p], stops)
            for j in range(parsed.n):
                index = len(self.sequences)
                self.texts.append(ChoiceText(server.tokenizer, parsed.stop,
                                             parsed.skip_special_tokens))
                self.sequences.append(Sequence(
                    prompt, settings, on_token=self._on_token(index),
                    on_finish=self._on_finish(index), sample_index=j, adapter=adapter))

    def _send(self, event) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is listening
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    def _on_token(self, index: int):
        def on_token(info):  # the engine's thread
            text = self.texts[index]
            piece = text.push(info)
            self._send(("token", index, piece, info))
            return "stop" if text.stopped else None
        return on_token

    def _on_finish(self, index: int):
        def on_finish(reason, prompt_logprobs):  # the engine's thread
            rest = self.texts[index].finish() if reason in ("stop", "length") else ""
            self._send(("finish", index, reason, rest, prompt_logprobs))
        return on_finish

    def cancel(self, engine: Engine) -> None:
        for sequence in self.sequences:
            sequence.cancel()
        engine.wake()


def _usage(job: Job) -> dict:
    prompt = sum(len(p) for p in job.prompts)
    completion = sum(s.generated for s in job.sequences)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def build_app(server: Server, on_shutdown=None) -> Starlette:
    """The Starlette app. `on_shutdown`: called when the server stops (after draining)."""
    engine = server.engine

    async def read_body(request: Request):
        server.check_key(request)
        server.check_ready()
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from e
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    async def start(job: Job) -> None:
        try:
            engine.submit(job.sequences)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy: {e}; retry later") from e
        except EngineStopped as e:
            raise ApiError(503, str(e)) from e
        except ValueError as e:
            raise ApiError(400, str(e)) from e

    async def events(request: Request, job: Job, streaming: bool):
        """The job's events until every sequence finished; cancels them if the client goes."""
        left = len(job.sequences)
        try:
            while left:
                try:
                    event = await asyncio.wait_for(job.queue.get(), DISCONNECT_POLL)
                except TimeoutError:
                    if not streaming and await request.is_disconnected():
                        logger.info("client gone: cancelling %d sequence(s)", left)
                        return
                    continue
                if event[0] == "finish":
                    left -= 1
                yield event
        finally:
            if left:
                job.cancel(engine)

    async def finish_events(request: Request, job: Job) -> dict | None:
        """Waits for every sequence's finish event ({index: event}); None if the client
        left first."""
        finished = {}
        async for event in events(request, job, False):
            if event[0] == "finish":
                finished[event[1]] = event
        return finished if len(finished) == len(job.sequences) else None

    def stream_end(head: dict, job: Job) -> str:
        """The usage chunk (when asked for), then [DONE]."""
        usage = _sse({**head, "choices": [], "usage": _usage(job)}) \
            if job.parsed.include_usage else ""
        return usage + "data: [DONE]\n\n"

    def sse_stream(request, job, head, parsed, token_choice, final_choice, opening=()):
        """A streamed job's SSE response: a chunk for each `opening` choice, then one for
        each token (token_choice(i, piece, info): a choice, or None to send nothing) and for
        each finished choice (final_choice(i, reason, rest)), then the usage chunk and
        [DONE]. An engine failure ends the stream with an error event."""
        usage = {"usage": None} if parsed.include_usage else {}

        async def stream():
            for choice in opening:
                yield _sse({**head, "choices": [choice], **usage})
            async for event in events(request, job, True):
                if event[0] == "token":
                    choice = token_choice(*event[1:])
                else:
                    _, i, reason, rest, _ = event
                    if reason == "error":
                        yield _sse(ApiError(500, "the engine failed").body())
                        return
                    choice = final_choice(i, reason, rest)
                if choice is not None:
                    yield _sse({**head, "choices": [choice], **usage})
            yield stream_end(head, job)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def completions(request: Request):
        try:
            body = await read_body(request)
            parsed = protocol.parse_completion(body, server.defaults)
            model, adapter = server.check_model(body)
            prompts = [server.prompt_ids(p) for p in parsed.prompts]
            max_tokens = [server.max_tokens(parsed, len(p)) for p in prompts]
            job = Job(server, parsed, prompts, max_tokens, adapter)
            await start(job)
        except ApiError as e:
            return _error_response(e)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model}
        want_logprobs = parsed.settings["logprobs"] is not None
        if parsed.stream:
            offsets = [0] * len(job.sequences)

            def token_choice(i, piece, info):
                if not piece and not want_logprobs:
                    return None
                logprobs = completion_logprobs(server.tokenizer, [info], offsets[i]) \
                    if want_logprobs else None
                offsets[i] += len(piece)
                return {"index": i, "text": piece, "logprobs": logprobs, "finish_reason": None}

            return sse_stream(request, job, head, parsed, token_choice, lambda i, reason, rest: {
                "index": i, "text": rest, "logprobs": None, "finish_reason": reason})

        finished = await finish_events(request, job)
        if finished is None:
            return JSONResponse({}, status_code=499)  # the client left
        choices = []
        for i, text in enumerate(job.texts):
            _, _, reason, _, prompt_logprobs = finished[i]
            if reason == "error":
                return _error_response(ApiError(500, "the engine failed while generating"))
            prompt = job.prompts[i // parsed.n]
            out, logprobs = text.text, None
            if parsed.echo:
                source = parsed.prompts[i // parsed.n]
                prompt_text = source if isinstance(source, str) else \
                    server.tokenizer.decode(prompt)
                out = prompt_text + out
            if want_logprobs:
                infos = ([None, *prompt_logprobs] if parsed.echo else []) + text.tokens
                logprobs = completion_logprobs(server.tokenizer, infos,
                                               first_prompt_token=prompt[0])
            choices.append({"index": i, "text": out, "logprobs": logprobs,
                            "finish_reason": reason})
        return JSONResponse({**head, "choices": choices, "usage": _usage(job)})

    async def chat(request: Request):
        try:
            body = await read_body(request)
            parsed = protocol.parse_chat(body, server.defaults)
            model, adapter = server.check_model(body)
            try:
                text = server.tokenizer.apply_chat_template(
                    parsed.prompts[0], add_generation_prompt=body.get("add_generation_prompt",
                                                                      True))
            except Exception as e:  # the template's own raise_exception, a jinja error
                raise ApiError(400, f"the chat template refused the messages: {e}",
                               "messages") from e
            prompt = server.prompt_ids(text, "messages")
            job = Job(server, parsed, [prompt], [server.max_tokens(parsed, len(prompt))],
                      adapter)
            await start(job)
        except ApiError as e:
            return _error_response(e)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        want_logprobs = parsed.settings["logprobs"] is not None
        if parsed.stream:
            head = {"id": rid, "object": "chat.completion.chunk", "created": created,
                    "model": model}

            def delta(i, content, reason=None, logprobs=None):
                return {"index": i, "delta": content, "logprobs": logprobs,
                        "finish_reason": reason}

            def token_choice(i, piece, info):
                if not piece and not want_logprobs:
                    return None
                return delta(i, {"content": piece}, None, chat_logprobs(
                    server.tokenizer, [info]) if want_logprobs else None)

            return sse_stream(
                request, job, head, parsed, token_choice,
                lambda i, reason, rest: delta(i, {"content": rest} if rest else {}, reason),
                opening=[delta(i, {"role": "assistant", "content": ""})
                         for i in range(len(job.sequences))])

        finished = await finish_events(request, job)
        if finished is None:
            return JSONResponse({}, status_code=499)  # the client left
        choices = []
        for i, text in enumerate(job.texts):
            reason = finished[i][2]
            if reason == "error":
                return _error_response(ApiError(500, "the engine failed while generating"))
            choices.append({"index": i, "message": {"role": "assistant", "content": text.text},
                            "logprobs": chat_logprobs(server.tokenizer, text.tokens)
                            if want_logprobs else None, "finish_reason": reason})
        return JSONResponse({"id": rid, "object": "chat.completion", "created": created,
                             "model": model, "choices": choices,
                             "usage": _usage(job)})

    async def models(request: Request):
        try:
            server.check_key(request)
        except ApiError as e:
            return _error_response(e)
        def card(name: str, root: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": server.created,
                    "owned_by": "qwen2-jax", "root": root, "parent": parent,
                    "max_model_len": engine.max_model_len}

        return JSONResponse({"object": "list", "data": [
            card(server.model_name, server.root, None),
            *(card(name, root, server.model_name) for name, root in server.adapters.items())]})

    async def health(request: Request):
        if engine.error is not None:
            return PlainTextResponse(f"engine failed: {engine.error!r}\n", status_code=503)
        if not engine.ready:
            return PlainTextResponse("warming up\n", status_code=503)
        return PlainTextResponse("ok\n")

    async def metrics(request: Request):
        return PlainTextResponse(engine.metrics.render(engine.max_batch),
                                 media_type="text/plain; version=0.0.4")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        warm = threading.Thread(target=_start_engine, args=(engine,), daemon=True,
                                name="qwen2-jax-warm-up")
        warm.start()
        yield
        logger.info("shutting down: draining the engine")
        engine.drain()
        engine.stop()
        if on_shutdown is not None:
            on_shutdown()

    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def _start_engine(engine: Engine) -> None:
    try:
        engine.start()
        logger.info("ready")
    except BaseException as e:
        logger.exception("warm-up failed")
        engine.error = e
