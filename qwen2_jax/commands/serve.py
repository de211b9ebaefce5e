"""`qwen2-jax serve`: the OpenAI-compatible HTTP server over the continuous-batching engine."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import tempfile

from qwen2_jax.commands.common import (
    MESH_HELP,
    MODEL_HELP,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    check_at_least,
    mesh_from_args,
    model_path,
    quantization_text,
    quantize_from_args,
    run_guarded,
    stage,
)
from qwen2_jax.commands.generate import YARN_HELP, generation_defaults
from qwen2_jax.embedded import cache_dir

NAME = "serve"
EMBEDDED_REPO = "Qwen/Qwen2.5-Coder-0.5B-Instruct"  # the embedded model's name on its card
DEFAULT_MAX_MODEL_LEN = 4096
LOWER = "--max-batch or --max-model-len, or spread the model over more devices with --mesh"
logger = logging.getLogger("qwen2_jax")

DESCRIPTION = """\
Serves the model over HTTP with OpenAI's API: POST /v1/chat/completions and /v1/completions
(streamed with "stream": true), GET /v1/models, /health (503 while warming up, then 200) and
/metrics (Prometheus).

The engine keeps --max-batch decode slots, each with its own KV cache rows of
--max-model-len tokens. Waiting requests are prefilled in chunks of at most --prefill-chunk
tokens into free slots between decode steps; one compiled decode step serves every mix of
requests, each with its own sampling settings. A request's tokens do not depend on what else
runs: greedy output equals `qwen2_jax.generate`, and a seeded request gives the same tokens
alone or in any batch. Sampling settings the request leaves out come from the model's
generation_config.json (greedy without one, or unless it says do_sample).

Warm-up compiles every program before /health turns 200. --compile-cache keeps the compiled
programs on disk: a restart with the same model, flags, devices and qwen2-jax version reads
them back instead of tracing and compiling. SIGTERM or Ctrl-C drains: no new connections, running requests
finish, then the server exits.

--lora NAME=DIR (repeatable) serves PEFT LoRA adapters beside the base, as vLLM's
--lora-modules: a request whose "model" is NAME runs with that adapter, one naming the base
runs without, and /v1/models lists both. Requests for different adapters and for the base
share each decode step: every row applies its own adapter (unmerged, rank padded to the
largest), at the cost of every adapter's x @ A for every row."""


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="an OpenAI-compatible HTTP server (continuous batching)",
        description=DESCRIPTION, epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s; 0.0.0.0 for all)")
    parser.add_argument("--port", type=int, default=8000, help="port (default %(default)s)")
    parser.add_argument("--served-model-name", nargs="+", default=None, metavar="NAME",
                        help="the model name(s) clients may send; /v1/models lists and replies "
                        "carry the first (default: the model folder's name; for the embedded "
                        f"model also {EMBEDDED_REPO!r}, as in its model card)")
    parser.add_argument("--lora", action="append", default=None, metavar="NAME=DIR",
                        help="serve the PEFT LoRA adapter in DIR as model NAME beside the "
                        "base (repeat for several; requests pick one by their 'model' field)")
    parser.add_argument("--api-key", action="append", default=None, metavar="KEY",
                        help="require 'Authorization: Bearer KEY' on /v1/* (repeat for "
                        "several keys; default: $QWEN2_JAX_API_KEY, else no key)")
    engine = parser.add_argument_group("engine")
    engine.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="decode slots: requests generating at once (default %(default)s)")
    engine.add_argument("--max-model-len", type=int, default=None, metavar="N",
                        help="tokens per slot, prompt plus output; longer requests get a 400 "
                        f"(default: the model's position limit, at most {DEFAULT_MAX_MODEL_LEN})")
    engine.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting for a slot before new ones get 429 "
                        "(default %(default)s)")
    engine.add_argument("--prefill-chunk", type=int, default=512, metavar="N",
                        help="prompt tokens per prefill step; running requests wait at most "
                        "one chunk for a new one (default %(default)s)")
    engine.add_argument("--yarn", choices=("dynamic", "static"), default="dynamic",
                        help=YARN_HELP)
    engine.add_argument("--compile-cache", default=None, metavar="DIR",
                        help="keeps the compiled programs here, so that a restart with the "
                        "same model, flags and devices reads them instead of tracing and "
                        "compiling (default: compiled-programs in the qwen2-jax cache "
                        "folder, $QWEN2_JAX_CACHE or ~/.cache/qwen2-jax)")
    engine.add_argument("--no-compile-cache", action="store_true",
                        help="compile from scratch at every start")
    add_quantize_args(parser)
    add_mesh_args(parser, processes=False,
                  mesh_help="device mesh over this host's devices (tensor parallel: "
                  "'tensor=-1')")


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _serve(args), LOWER)


def _serve(args: argparse.Namespace) -> int:
    check_at_least(args, 1, "max_batch", "max_queue", "max_model_len")
    check_at_least(args, 16, "prefill_chunk")
    quantize = quantize_from_args(args)
    lora_flags = parse_lora_flags(args.lora or [])
    if not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    listener = bind(args.host, args.port)  # before the model loads: a taken port fails now
    program_dir = None if args.no_compile_cache else writable_folder(
        args.compile_cache or os.path.join(cache_dir(), "compiled-programs"))
    import uvicorn

    import qwen2_jax
    from qwen2_jax.decoding import position_limit
    from qwen2_jax.serve.app import Server, build_app
    from qwen2_jax.serve.engine import Engine
    from qwen2_jax.tokenizer import Tokenizer

    model = model_path(args.model)
    config = qwen2_jax.Qwen2Config.from_file(model)
    limit = position_limit(config)
    max_model_len = args.max_model_len or min(limit, DEFAULT_MAX_MODEL_LEN)
    if max_model_len > limit:
        raise UsageError(f"--max-model-len {max_model_len} is past the model's position "
                         f"limit {limit}")
    names = args.served_model_name or [os.path.basename(os.path.normpath(model))]
    if args.served_model_name is None and args.model is None:
        names = [EMBEDDED_REPO, *names]
    adapters = load_adapters(config, lora_flags, names)
    settings = generation_defaults(model)
    tokenizer = Tokenizer(model)
    eos = set(settings.pop("stop_token_ids"))
    eos.update(i for i in (tokenizer.special_id("eos_token"),) if i is not None)
    defaults = {k: v for k, v in settings.items() if k != "max_new_tokens" and v is not None}
    mesh, rules = mesh_from_args(args)
    with stage("loading the model"):
        config, params = qwen2_jax.load(model, mesh=mesh, rules=rules, **quantize)
    storage = quantization_text(params, args.kv_cache_dtype)
    engine = Engine(config, params, max_batch=args.max_batch, max_model_len=max_model_len,
                    prefill_chunk=args.prefill_chunk, max_queue=args.max_queue,
                    vocab_size=min(len(tokenizer), config.vocab_size), mesh=mesh,
                    rules=rules, yarn=args.yarn, program_dir=program_dir,
                    kv_cache_dtype=args.kv_cache_dtype, adapters=adapters)
    del params  # the engine keeps its own per-layer copy
    keys = args.api_key or ([os.environ["QWEN2_JAX_API_KEY"]]
                            if os.environ.get("QWEN2_JAX_API_KEY") else [])
    server = Server(engine, tokenizer, names, api_keys=keys, defaults=defaults,
                    eos_token_ids=eos, root=model, adapters=lora_flags)
    logger.info("serving %s as %s on http://%s:%d (%d slots of %d tokens; %s)", model,
                " or ".join(map(repr, names)), args.host, args.port, args.max_batch,
                max_model_len, storage)
    for name, folder in lora_flags.items():
        logger.info("LoRA adapter %r from %s", name, folder)
    # uvicorn drains on SIGTERM, then raises the signal again for the handler it found: a
    # drained shutdown is a clean exit (0), not death by signal.
    signal.signal(signal.SIGTERM, lambda *_: None)
    http = uvicorn.Server(uvicorn.Config(build_app(server), log_level="warning",
                                         timeout_graceful_shutdown=None))
    http.run(sockets=[listener])
    if not http.started:
        raise RuntimeError("the HTTP server did not start (see the log above)")
    logger.info("stopped")
    return 0


def parse_lora_flags(values: list[str]) -> dict[str, str]:
    """{NAME: DIR} of the --lora values, in order; a UsageError for a malformed or repeated
    NAME, or a DIR that does not exist."""
    out: dict[str, str] = {}
    for value in values:
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise UsageError(f"--lora {value}: expected NAME=DIR (the adapter's model name, "
                             "then its PEFT folder)")
        if name in out:
            raise UsageError(f"--lora {value}: the name {name!r} is given twice")
        if not os.path.isdir(folder):
            raise UsageError(f"--lora {value}: no such folder (expected a PEFT LoRA adapter "
                             "folder)")
        out[name] = folder
    return out


def load_adapters(config, lora_flags: dict[str, str], names: list[str]) -> dict | None:
    """The --lora adapters as one `lora.stack_adapters` tree (None without any), checked
    against the model; a UsageError names the flag."""
    from qwen2_jax import lora

    if not lora_flags:
        return None
    loaded = []
    for name, folder in lora_flags.items():
        if name in names:
            raise UsageError(f"--lora {name}={folder}: {name!r} is the base model's name; "
                             "give the adapter another")
        try:
            loaded.append(lora.load_adapter(folder, config))
        except ValueError as e:
            raise UsageError(f"--lora {name}={folder}: {e}") from None
    return lora.stack_adapters(config, loaded)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port for uvicorn (SO_REUSEADDR, as uvicorn binds)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
    except OSError as e:
        raise UsageError(f"--host {host} --port {port}: cannot listen there "
                         f"({e.strerror or e}); pick a free --port") from None
    return listener


def writable_folder(folder: str) -> str:
    """`folder`, created if needed, after checking that files can be written there."""
    try:
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UsageError(f"--compile-cache {folder}: not a writable folder "
                         f"({e.strerror or e}); pass another, or --no-compile-cache") from None
    return folder
