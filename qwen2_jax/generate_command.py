"""`qwen2-jax generate`: text in, text streamed out, with the model folder's tokenizer,
chat template and generation_config.json defaults."""

from __future__ import annotations

import json
import os
import sys

from qwen2_jax.tokenizer import StreamDecoder, Tokenizer

DEFAULT_MAX_NEW_TOKENS = 128


def generation_defaults(folder: str) -> dict:
    """Sampling settings from generation_config.json, in `generate`'s terms (greedy unless the
    file says do_sample). Missing file: greedy, DEFAULT_MAX_NEW_TOKENS."""
    path = os.path.join(folder, "generation_config.json")
    config = {}
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    sampling = bool(config.get("do_sample"))
    eos = config.get("eos_token_id")
    return {
        "max_new_tokens": config.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS,
        "temperature": float(config.get("temperature") or 1.0) if sampling else 0.0,
        "top_k": config.get("top_k") if sampling else None,
        "top_p": config.get("top_p") if sampling else None,
        "min_p": config.get("min_p") if sampling else None,
        "repetition_penalty": config.get("repetition_penalty"),
        "stop_token_ids": [] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
    }


def prompt_texts(args) -> list[str]:
    """The prompts of --prompt / --prompts-file (one per non-empty line)."""
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            texts = [line.rstrip("\n") for line in f if line.strip()]
        if not texts:
            raise ValueError(f"{args.prompts_file}: no prompts (one per non-empty line)")
        return texts
    return [args.prompt]


def run(args, mesh, rules) -> int:
    import qwen2_jax

    tokenizer = Tokenizer(args.model)
    settings = generation_defaults(args.model)
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "min_p",
                 "repetition_penalty"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    stops = set(settings.pop("stop_token_ids"))
    stops.update(i for i in (tokenizer.special_id("eos_token"),) if i is not None)

    def as_ids(text: str) -> list[int]:
        if not args.chat:
            return tokenizer.encode(text)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": text}]
        return tokenizer.encode(tokenizer.apply_chat_template(messages))

    texts = prompt_texts(args)
    prompts = [as_ids(t) for t in texts]
    config, params = qwen2_jax.load(args.model, mesh=mesh, rules=rules)
    stream = StreamDecoder(tokenizer) if len(prompts) == 1 else None

    def on_tokens(tokens, live):
        if live[0]:
            sys.stdout.write(stream.push(int(tokens[0])))
            sys.stdout.flush()

    outputs = qwen2_jax.generate(config, params, prompts, stop_token_ids=sorted(stops),
                                 seed=args.seed, vocab_size=len(tokenizer), mesh=mesh,
                                 rules=rules, on_tokens=on_tokens if stream else None, **settings)
    if stream is not None:
        sys.stdout.write(stream.flush() + "\n")
    else:
        for text, ids in zip(texts, outputs, strict=True):
            print(json.dumps({"prompt": text, "completion": tokenizer.decode(ids, True),
                              "tokens": len(ids)}, ensure_ascii=False))
    return 0
