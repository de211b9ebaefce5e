"""End-to-end check on a tiny model built on the spot: transformers vs qwen2-jax logits.

Needs the `test` extra (torch and transformers): they build the reference model.
"""

from __future__ import annotations

import json
import tempfile
import time

import numpy as np

# A tiny Qwen2 with the 0.5B's quirks: 14 query heads on 2 kv heads, tied embeddings, q/k/v
# bias; sliding window on the top layer so the window code runs too.
DEMO_CONFIG = dict(vocab_size=151, hidden_size=56, intermediate_size=148, num_hidden_layers=4,
                   num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=1024,
                   rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                   use_sliding_window=True, sliding_window=8, max_window_layers=3)


def run(seed: int = 0, out: str | None = None, tolerance: float = 1e-4, mesh=None,
        rules=None) -> dict:
    """Builds, saves, loads (sharded over `mesh` when given) and compares; returns the report.

    Every process of a multi-process job builds the same model from the seed and compares
    the gathered logits.
    """
    try:
        import torch
        from transformers import Qwen2Config, Qwen2ForCausalLM
    except ImportError as e:
        raise SystemExit(f"the demo needs torch and transformers (pip install -e '.[test]'): {e}") from e
    import qwen2_jax
    from qwen2_jax.sharding import to_host

    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**DEMO_CONFIG)).eval()
    with torch.no_grad():  # random biases and norms too, so every weight matters
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape) * 0.2 + (1.0 if "norm" in name else 0.0))
    rng = np.random.default_rng(seed)
    lengths = [24, 17, 9]  # a ragged, left-padded batch
    ids = rng.integers(0, DEMO_CONFIG["vocab_size"], (len(lengths), max(lengths)))
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

    diffs = []
    for row, n in enumerate(lengths):
        with torch.no_grad():
            ref = model(torch.as_tensor(ids[row:row + 1, -n:])).logits[0].numpy()
        diffs.append(float(np.abs(ours[row, -n:] - ref).max()))
    return {"model": "tiny random Qwen2 (14 heads / 2 kv, tied, sliding window)",
            "batch_lengths": lengths, "max_abs_logit_diff": max(diffs),
            "max_abs_logit": float(np.abs(ours).max()), "tolerance": tolerance,
            "ok": max(diffs) <= tolerance, "load_s": round(load_s, 3),
            "first_forward_s": round(forward_s, 3), "checkpoint": out,
            "mesh": None if mesh is None else dict(mesh.shape)}


def main(args) -> int:
    from qwen2_jax.cli import mesh_from_args

    mesh, rules = mesh_from_args(args)
    report = run(args.seed, args.out, mesh=mesh, rules=rules)
    print(json.dumps(report))
    return 0 if report["ok"] else 1
