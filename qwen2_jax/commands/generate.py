"""`qwen2-jax generate`: text in, text streamed out, with the model folder's tokenizer,
chat template and generation_config.json defaults."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from qwen2_jax.commands.common import (
    MESH_HELP,
    MODEL_HELP,
    UsageError,
    add_mesh_args,
    add_quantize_args,
    mesh_from_args,
    model_path,
    quantize_from_args,
    require_path,
    run_guarded,
    stage,
)
from qwen2_jax.config import ConfigError, is_int, is_number

NAME = "generate"
DEFAULT_MAX_NEW_TOKENS = 128
LOWER = "--max-new-tokens, the prompt length or the number of prompts, or spread the model " \
        "over more devices with --mesh"
logger = logging.getLogger("qwen2_jax")


def add_parser(sub) -> None:
    parser = sub.add_parser(
        NAME, help="generate text from a prompt, streamed to stdout",
        description="Generates from a prompt with the model folder's tokenizer (tokenizer.json) "
        "and, with --chat, its chat template. Sampling defaults come from the folder's "
        "generation_config.json (greedy without one, or when it does not say do_sample); the "
        "flags override them. Stops at the generation config's and tokenizer's eos tokens. One "
        "prompt streams its text as tokens arrive; --prompts-file runs one batch and prints a "
        "JSON line per prompt. A prompt plus --max-new-tokens longer than the model's "
        "max_position_embeddings is refused unless --allow-long.", epilog=MESH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, metavar="PATH", help=MODEL_HELP)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt")
    source.add_argument("--prompt-file", metavar="FILE",
                        help="the prompt: a whole UTF-8 file (a long document)")
    source.add_argument("--prompts-file", metavar="FILE",
                        help="one prompt per non-empty line (UTF-8), generated as one batch")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the chat template")
    parser.add_argument("--system", metavar="TEXT", help="system message (with --chat)")
    parser.add_argument("--max-new-tokens", type=int, default=None, metavar="N",
                        help="tokens to generate at most (default: generation_config or "
                        f"{DEFAULT_MAX_NEW_TOKENS})")
    add_sampling_args(parser)
    add_long_context_args(parser)
    parser.add_argument("--allow-long", action="store_true",
                        help="generate past the model's max_position_embeddings (with a "
                        "warning) instead of refusing")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    add_quantize_args(parser)
    add_mesh_args(parser)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    """The sampling flags, shared with chat (their defaults: generation_config.json)."""
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 = greedy; > 0 samples (default: generation_config)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="keep the k most likely tokens (0 = off)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="keep the nucleus of mass p, in (0, 1]")
    parser.add_argument("--min-p", type=float, default=None,
                        help="drop tokens below min_p x the top probability, in [0, 1]")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="divide (multiply, if negative) the logits of seen tokens; > 0")


YARN_HELP = ("for a model with YaRN rope_scaling (Qwen2.5's recipe for 131,072 tokens): "
             "'dynamic' (default) gives each request the factor its own length needs, "
             "clip((prompt + new tokens) / original context, 1, factor), so requests that fit "
             "the original context get plain RoPE and its full quality; 'static' applies the "
             "config's factor to every request, as transformers and vLLM do. No effect "
             "without YaRN")


def add_long_context_args(parser: argparse.ArgumentParser, prefill: bool = True) -> None:
    """--yarn, and --prefill-chunk when `prefill`; shared with chat and eval."""
    from qwen2_jax.decoding import PREFILL_CHUNK, YARN_MODES

    parser.add_argument("--yarn", choices=YARN_MODES, default="dynamic", help=YARN_HELP)
    if prefill:
        parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK, metavar="N",
                            help="prompt tokens per prefill step: memory for activations "
                            "grows with N, not with the prompt (default %(default)s)")


# name -> (test, what it must be), for the sampling flags and generation_config.json fields.
SETTINGS = {
    "max_new_tokens": (lambda v: is_int(v) and v >= 1, "an integer >= 1"),
    "temperature": (lambda v: is_number(v) and v >= 0, "a number >= 0"),
    "top_k": (lambda v: is_int(v) and v >= 0, "an integer >= 0"),
    "top_p": (lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: is_number(v) and v > 0, "a number > 0"),
}


def generation_defaults(folder: str) -> dict:
    """Sampling settings from generation_config.json, in `generate`'s terms (greedy unless the
    file says do_sample). Missing file: greedy, DEFAULT_MAX_NEW_TOKENS. A malformed file is a
    ConfigError naming it and the field."""
    path = os.path.join(folder, "generation_config.json")
    config = {}
    if os.path.exists(path):
        try:
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: "
                              f"{e.msg}") from e
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        if not isinstance(config, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(config).__name__}")
    for name, (ok, expected) in SETTINGS.items():
        if config.get(name) is not None and not ok(config[name]):
            raise ConfigError(f"{path}: {name} must be {expected}, got {config[name]!r}")
    eos = config.get("eos_token_id")
    if not (eos is None or is_int(eos) or (isinstance(eos, list) and all(map(is_int, eos)))):
        raise ConfigError(f"{path}: eos_token_id must be an integer or a list of integers, got "
                          f"{eos!r}")
    sampling = bool(config.get("do_sample"))
    return {
        "max_new_tokens": config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
        "temperature": float(config.get("temperature") or 1.0) if sampling else 0.0,
        "top_k": config.get("top_k") if sampling else None,
        "top_p": config.get("top_p") if sampling else None,
        "min_p": config.get("min_p") if sampling else None,
        "repetition_penalty": config.get("repetition_penalty"),
        "stop_token_ids": [] if eos is None else ([eos] if is_int(eos) else list(eos)),
    }


def check_flags(args: argparse.Namespace) -> None:
    """--system needs --chat; then check_sampling_flags."""
    if args.system and not args.chat:
        raise UsageError("--system needs --chat")
    check_sampling_flags(args)


def check_sampling_flags(args: argparse.Namespace) -> None:
    """The sampling and --prefill-chunk flags' values, checked before anything loads; errors
    name the flag."""
    for name, (ok, expected) in SETTINGS.items():
        value = getattr(args, name)
        if value is not None and not ok(value):
            raise UsageError(f"--{name.replace('_', '-')} must be {expected}, got {value}")
    if args.prefill_chunk < 1:
        raise UsageError(f"--prefill-chunk must be an integer >= 1, got {args.prefill_chunk}")


def prompt_texts(args) -> list[str]:
    """The prompts of --prompt / --prompt-file (the whole file) / --prompts-file (one per
    non-empty line)."""
    if args.prompt_file:
        require_path("--prompt-file", args.prompt_file, "text file")
        with open(args.prompt_file, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise UsageError(f"{args.prompt_file}:{line}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start} of the file)") from None
        if not text.strip():
            raise UsageError(f"{args.prompt_file}: empty; the prompt needs some text")
        return [text]
    if not args.prompts_file:
        return [args.prompt]
    require_path("--prompts-file", args.prompts_file, "text file")
    texts = []
    with open(args.prompts_file, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UsageError(f"{args.prompts_file}:{number}: not UTF-8 text ({e.reason} at "
                                 f"byte {e.start} of the line)") from None
            if line.strip():
                texts.append(line.rstrip("\r\n"))
    if not texts:
        raise UsageError(f"{args.prompts_file}: no prompts (one per non-empty line)")
    return texts


def check_length(config, prompts: list[list[int]], max_new_tokens: int, allow_long: bool) -> None:
    """Refuses (or with allow_long warns about) the longest prompt plus max_new_tokens past
    the positions the model was made for (decoding.position_limit), before it loads."""
    from qwen2_jax.decoding import position_limit

    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    total = len(prompts[longest]) + max_new_tokens
    limit = position_limit(config)
    if total <= limit:
        return
    which = f"prompt {longest + 1} of {len(prompts)}" if len(prompts) > 1 else "the prompt"
    yarn = f" ({limit} with YaRN)" if limit != config.max_position_embeddings else ""
    message = (f"{which} has {len(prompts[longest])} tokens; with --max-new-tokens "
               f"{max_new_tokens} that is {total}, past the model's max_position_embeddings "
               f"{config.max_position_embeddings}{yarn}")
    if not allow_long:
        raise UsageError(f"{message}; shorten them, or pass --allow-long to generate anyway")
    logger.warning("%s: generating anyway (--allow-long)", message)


def kv_cache_gb(config, batch: int, length: int, kv_cache_dtype: str = "auto") -> float:
    """The KV cache of `batch` rows of `length` tokens, in GB: float32 (the CPU compute
    dtype; an upper bound elsewhere), or int8 with a float32 scale per token and head."""
    per_head = config.head_size + 4 if kv_cache_dtype == "int8" else config.head_size * 4
    return 2 * config.num_hidden_layers * batch * length * config.num_key_value_heads * \
        per_head / 1e9


def run(args: argparse.Namespace) -> int:
    return run_guarded(NAME, lambda: _generate(args), LOWER)


def _generate(args: argparse.Namespace) -> int:
    import qwen2_jax
    from qwen2_jax.tokenizer import StreamDecoder, Tokenizer

    check_flags(args)
    quantize = quantize_from_args(args)
    args.model = model_path(args.model)
    config = qwen2_jax.Qwen2Config.from_file(args.model)
    settings = generation_defaults(args.model)
    tokenizer = Tokenizer(args.model)
    for name in SETTINGS:
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    stops = set(settings.pop("stop_token_ids"))
    stops.update(i for i in (tokenizer.special_id("eos_token"),) if i is not None)
    settings.update(yarn=args.yarn, prefill_chunk=args.prefill_chunk)

    def as_ids(text: str) -> list[int]:
        if not args.chat:
            return tokenizer.encode(text)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    texts = prompt_texts(args)
    prompts = [as_ids(t) for t in texts]
    for i, ids in enumerate(prompts):
        problem = tokenizer.out_of_vocabulary(ids, config.vocab_size)
        if problem:
            raise UsageError(f"prompt {i + 1}: {problem}")
    check_length(config, prompts, settings["max_new_tokens"], args.allow_long)
    mesh, rules = mesh_from_args(args)
    with stage("loading the model"):
        config, params = qwen2_jax.load(args.model, mesh=mesh, rules=rules, **quantize)
    stream = StreamDecoder(tokenizer) if len(prompts) == 1 else None

    def on_tokens(tokens, live):
        if live[0]:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    length = max(map(len, prompts)) + settings["max_new_tokens"]
    cache_gb = kv_cache_gb(config, len(prompts), length, args.kv_cache_dtype)
    with stage(f"generating {len(prompts)} sequence(s) of up to {length} tokens (their KV cache "
               f"alone takes {cache_gb:.2f} GB)"):
        outputs = qwen2_jax.generate(config, params, prompts, stop_token_ids=sorted(stops),
                                     seed=args.seed, vocab_size=len(tokenizer), mesh=mesh,
                                     rules=rules, on_tokens=on_tokens if stream else None,
                                     allow_long=True, kv_cache_dtype=args.kv_cache_dtype,
                                     **settings)
    if stream is not None:
        sys.stdout.write(stream.flush() + "\n")
    else:
        for text, ids in zip(texts, outputs, strict=True):
            print(json.dumps({"prompt": text, "completion": tokenizer.decode(ids, True),
                              "tokens": len(ids)}, ensure_ascii=False))
    return 0
