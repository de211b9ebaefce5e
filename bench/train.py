"""Training speed of a ~100M-parameter Qwen2-shaped model: qwen2-jax vs transformers + torch.

Same config, batch shape and optimizer (AdamW, float32 master weights) in one run: our jitted
train step (loss over every token, global-norm clipping, matmuls in --dtype) against
transformers' forward with labels, backward and torch.optim.AdamW with clipping, on CUDA when
torch sees one, under bfloat16 autocast when --dtype is bfloat16. Reports training tokens/s of each and the model
FLOPs behind the MFU figure used on accelerators:

    MFU = tokens/s * (6 * N + 12 * L * T * D) / peak FLOP/s

(N parameters without the embedding lookup, L layers, T sequence length, D hidden size; 6N
for the matmuls forward and backward, 12LTD for attention scores and values.) Prints one JSON
line; pass --peak-tflops for the device's peak to get MFU.

Both models live side by side and are timed in turns, --rounds times (a median of --steps
steps each), keeping each one's fastest round: a shared machine's speed drifts by tens of
percent over minutes, and timing one contender after the other would put the drift into the
ratio.

    .venv/bin/python bench/train.py [--batch 4 --length 256 --steps 5 --rounds 3]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
from forward import median_seconds
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import qwen2_jax
from qwen2_jax.config import Qwen2Config
from qwen2_jax.train.step import SFTObjective, TrainConfig, optimizer, train_step

CONFIG = Qwen2Config(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                     num_hidden_layers=10, num_attention_heads=12, num_key_value_heads=4,
                     tie_word_embeddings=True, max_position_embeddings=4096)


def torch_step(model, loss_fn, device: str, bf16: bool):
    """One AdamW step (lr 1e-4, global-norm clipping at 1.0) on loss_fn(), under bfloat16
    autocast if bf16; waits for the device."""
    adam = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0)

    def step():
        with torch.autocast(device, torch.bfloat16, enabled=bf16):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        adam.step()
        adam.zero_grad(set_to_none=True)
        loss.item()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="compute dtype (default: float32 on CPU, else bfloat16)")
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c = CONFIG
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (args.batch, args.length))
    tokens = ids.size

    params = qwen2_jax.init(c, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    train = TrainConfig(learning_rate=1e-4, total_steps=1000)
    objective = SFTObjective(c, jnp.dtype(dtype))
    state = {"params": params, "opt": optimizer(train).init(params)}
    batch = {"tokens": jnp.asarray(ids, jnp.int32)[None],
             "segment_ids": jnp.ones((1, *ids.shape), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.length), (1, *ids.shape)),
             "weights": jnp.ones((1, *ids.shape), jnp.float32).at[..., -1].set(0.0)}

    def ours_step():
        state["params"], state["opt"], m = train_step(objective, train, state["params"],
                                                      state["opt"], batch, 0)
        m["loss"].block_until_ready()

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(c.to_hf())).to(device).train()
    labels = torch.as_tensor(ids, device=device)
    theirs_step = torch_step(model, lambda: model(labels, labels=labels).loss, device,
                             dtype == "bfloat16")
    rounds = {"qwen2_jax": [], "transformers": []}
    for r in range(args.rounds):
        rounds["qwen2_jax"].append(median_seconds(ours_step, args.steps, warmup=2 if r == 0
                                                  else 0))
        rounds["transformers"].append(median_seconds(theirs_step, args.steps,
                                                     warmup=2 if r == 0 else 0))
    ours, theirs = min(rounds["qwen2_jax"]), min(rounds["transformers"])
    flops_per_token = 6 * n_params + 12 * c.num_hidden_layers * \
        args.length * c.hidden_size  # tied: the table counts once, as the lm_head matmul
    report = {"bench": "train", "params_m": round(n_params / 1e6, 1), "batch": args.batch,
              "length": args.length, "dtype": dtype, "device": jax.devices()[0].device_kind,
              "transformers_device": device,
              "qwen2_jax_tokens_per_s": round(tokens / ours, 1),
              "transformers_tokens_per_s": round(tokens / theirs, 1),
              "ratio": round(theirs / ours, 3),
              "rounds": args.rounds,
              "tokens_per_s_each_round": {k: [round(tokens / t, 1) for t in v]
                                          for k, v in rounds.items()},
              "model_flops_per_token": flops_per_token,
              "qwen2_jax_model_tflops": round(tokens / ours * flops_per_token / 1e12, 3),
              "transformers_model_tflops": round(tokens / theirs * flops_per_token / 1e12, 3),
              "mfu_formula": "tokens_per_s * (6 * N + 12 * L * T * D) / peak_flops"}
    if args.peak_tflops:
        for who in ("qwen2_jax", "transformers"):
            report[f"{who}_mfu"] = round(report[f"{who}_model_tflops"] / args.peak_tflops, 4)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
