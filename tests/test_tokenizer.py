"""The real Qwen2 vocabulary: ids equal transformers' tokenizer, chat template, streaming."""

from __future__ import annotations

import unicodedata

import jinja2
import pytest
from transformers import AutoTokenizer

from qwen2_jax.tokenizer import QWEN2_CHAT_TEMPLATE, StreamDecoder, Tokenizer, TokenizerError

TEXTS = {
    "english": "Hello, world! The quick brown fox jumps over 13 lazy dogs.",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "code": "def square(x: int) -> int:\n    return x ** 2  # 平方\n\tprint(f'{x=}')\n",
    "emoji": "Robots 🤖🦾 and parties 🎉🥳, flags 🇯🇵, family 👨‍👩‍👧‍👦.",
    "special": "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "accents": "naïve café, Ångström, ﬁ ligature, e\u0301 composed",
}


@pytest.fixture(scope="module")
def tokenizers(qwen2_tokenizer_dir):
    return Tokenizer(str(qwen2_tokenizer_dir)), AutoTokenizer.from_pretrained(qwen2_tokenizer_dir)


def test_known_ids(tokenizers):
    ours, _ = tokenizers
    assert ours.encode("Hello world") == [9707, 1879]
    assert ours.encode("Hello, world!") == [9707, 11, 1879, 0]
    assert ours.encode("你好") == [108386]
    assert [ours.token_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
        151643, 151644, 151645]
    assert len(ours) == 151646 and ours.special_id("eos_token") == 151645


@pytest.mark.parametrize("kind", sorted(TEXTS))
def test_ids_equal_transformers(tokenizers, kind):
    ours, theirs = tokenizers
    ids = ours.encode(TEXTS[kind])
    assert ids == theirs.encode(TEXTS[kind], add_special_tokens=False)
    assert ours.decode(ids) == theirs.decode(ids)


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is 2+2? 你好"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Bye 👋"}],
])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_equals_apply_chat_template(tokenizers, messages, add_generation_prompt):
    ours, theirs = tokenizers
    assert ours.chat_template == QWEN2_CHAT_TEMPLATE
    text = ours.apply_chat_template(messages, add_generation_prompt)
    assert text == theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


@pytest.mark.parametrize("kind", ["chinese", "emoji", "code", "accents"])
def test_streaming_never_emits_half_a_character(tokenizers, kind):
    ours, _ = tokenizers
    ids = ours.encode(TEXTS[kind])
    stream = StreamDecoder(ours)
    pieces = [stream.push(i) for i in ids]
    assert not any("\ufffd" in p for p in pieces)
    # The normalizer is NFC, so "e" + combining acute comes back as one character.
    assert "".join(pieces) + stream.flush() == ours.decode(ids) == unicodedata.normalize(
        "NFC", TEXTS[kind])
    if kind == "emoji":  # multi-byte characters span tokens, so some steps emit nothing
        assert "" in pieces


def test_template_runs_sandboxed(tmp_path, qwen2_tokenizer_dir):
    (tmp_path / "tokenizer.json").write_bytes((qwen2_tokenizer_dir / "tokenizer.json").read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        Tokenizer(str(tmp_path)).apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"no tokenizer\.json"):
        Tokenizer(str(tmp_path))
