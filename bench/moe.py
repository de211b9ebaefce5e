"""MoE forward speed at a small Qwen2-MoE config: qwen2-jax vs transformers, one run.

Both in float32 on the same random-weight config and batch. Reports tokens/s of a full
forward (logits for every position), and how many token-expert products the sorted dispatch
computes against computing every expert for every token (the FLOP ratio of the routed
experts' matmuls). Prints one JSON line.

    .venv/bin/python bench/moe.py [--batch 4 --length 256]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np
import torch
from forward import median_seconds
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

import qwen2_jax
from qwen2_jax.config import Qwen2Config
from qwen2_jax.moe import BLOCK, dispatch_slots, route

CONFIG = dict(model_type="qwen2_moe", vocab_size=4096, hidden_size=512, intermediate_size=1024,
              moe_intermediate_size=256, shared_expert_intermediate_size=512,
              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2, num_experts=32,
              num_experts_per_tok=4, max_position_embeddings=4096, rope_theta=1e6,
              decoder_sparse_step=1, mlp_only_layers=(), norm_topk_prob=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    config = Qwen2Config(**CONFIG)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    tokens = ids.size

    params = qwen2_jax.init(config, jax.random.key(0))
    ours = median_seconds(lambda: qwen2_jax.forward(config, params, ids).block_until_ready(),
                          args.repeats, warmup=1)

    # Rows the sorted dispatch computes for this batch's routing in the first layer.
    x = np.asarray(jax.random.normal(jax.random.key(1), (tokens, config.hidden_size)))
    router = np.asarray(params["layers"]["mlp"]["gate"]["kernel"][0])
    _, experts = route(x @ router, config.num_experts_per_tok, False, np.float32)
    _, _, rows = dispatch_slots(experts, config.num_experts, BLOCK)

    torch.manual_seed(0)
    hf = Qwen2MoeForCausalLM(Qwen2MoeConfig.from_dict(config.to_hf())).eval()
    batch = torch.as_tensor(ids)

    def theirs_once():
        with torch.no_grad():
            hf(batch)

    theirs = median_seconds(theirs_once, args.repeats, warmup=1)
    print(json.dumps({
        "bench": "moe_forward", "config": {k: v for k, v in CONFIG.items() if k != "model_type"},
        "batch": args.batch, "length": args.length, "dtype": "float32",
        "qwen2_jax_tokens_per_s": round(tokens / ours, 1),
        "transformers_tokens_per_s": round(tokens / theirs, 1),
        "ratio": round(theirs / ours, 3),
        "expert_rows_computed": int(rows), "expert_rows_dense": tokens * config.num_experts,
        "expert_flops_ratio_vs_dense": round(int(rows) / (tokens * config.num_experts), 4),
        "ideal_ratio": round(config.num_experts_per_tok / config.num_experts, 4),
    }))


if __name__ == "__main__":
    main()
