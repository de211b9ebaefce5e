"""One choice's text as tokens arrive: detokenization, stop strings, log-probs.

Stop strings are matched in the decoded text, so one that spans several tokens is found;
text that could still be the start of a stop string is held back, so a stop string is never
emitted. Log-probs are formatted as OpenAI's completions (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`) or chat (`content: [{token, logprob, bytes, top_logprobs}]`).
"""

from __future__ import annotations

from qwen2_jax.serve.engine import TokenInfo
from qwen2_jax.tokenizer import StreamDecoder, Tokenizer


class ChoiceText:
    """The text of one choice. `push` returns the text that became safe to send."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.decoder = StreamDecoder(tokenizer, skip_special_tokens)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` handed out
        self.stopped = False
        self.tokens: list[TokenInfo] = []

    def push(self, info: TokenInfo) -> str:
        """Adds a token; returns the newly sendable text. Sets `stopped` at a stop string."""
        self.tokens.append(info)
        self.text += self.decoder.push(info.token)
        if self.stop:
            begin = max(0, self.sent - self.hold)
            found = [i for i in (self.text.find(s, begin) for s in self.stop) if i >= 0]
            if found:
                self.stopped = True
                self.text = self.text[:min(found)]
                return self._take(len(self.text))
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """The rest of the text at the end (unless a stop string cut it)."""
        if not self.stopped:
            self.text += self.decoder.flush()
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        if upto <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:upto], upto
        return piece


def token_text(tokenizer: Tokenizer, token: int) -> str:
    return tokenizer.decode([token])


def completion_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo | None], offset: int = 0,
                        first_prompt_token: int | None = None) -> dict:
    """OpenAI completions `logprobs` for these tokens (None entries: the first prompt token,
    which has no log-probability). `offset`: text_offset of the first token."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for info in infos:
        token = first_prompt_token if info is None else info.token
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        if info is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            continue
        out["token_logprobs"].append(info.logprob)
        top = {token_text(tokenizer, t): lp for t, lp in info.top}
        top.setdefault(text, info.logprob)  # the chosen token is always listed, as vLLM
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(tokenizer: Tokenizer, infos: list[TokenInfo]) -> dict:
    """OpenAI chat `logprobs`: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in i.top]} for i in infos]}
