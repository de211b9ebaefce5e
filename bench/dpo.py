"""DPO step speed of a ~100M-parameter Qwen2-shaped model: qwen2-jax vs transformers + torch.

One step = the frozen reference's forward and the policy's forward and backward over B chosen
and B rejected sequences in one batch, the sigmoid DPO loss, AdamW with clipping (what
`qwen2-jax dpo` and TRL's DPOTrainer do per step). Sequences: a prompt of length/2 and a
completion of length/2. Both sides use the same config (bench/train.py's), batch and dtype
(--dtype; default float32 on CPU, else bfloat16: torch under bfloat16 autocast). Prints one
JSON line with pairs/s of each and the ratio.

    .venv/bin/python bench/dpo.py [--pairs 4 --length 256 --steps 5]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F
from forward import median_seconds
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

import qwen2_jax
from qwen2_jax.train.dpo import DPOObjective, sequence_logps
from qwen2_jax.train.step import TrainConfig, optimizer, train_step
from train import CONFIG, torch_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=4, help="preference pairs per step")
    parser.add_argument("--length", type=int, default=256, help="tokens per sequence")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    args = parser.parse_args()
    dtype = args.dtype or ("float32" if jax.default_backend() == "cpu" else "bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    c, b, t = CONFIG, args.pairs, args.length
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (2 * b, t))  # chosen rows first
    completion = np.zeros((2 * b, t), np.float32)
    completion[:, t // 2:] = 1.0  # the mask of scored tokens

    params = qwen2_jax.init(c, jax.random.key(0))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    ref = qwen2_jax.init(c, jax.random.key(0), dtype=dtype)
    train = TrainConfig(learning_rate=1e-4, total_steps=1000)  # as torch_step
    objective = DPOObjective(c, jnp.dtype(dtype))
    state = {"params": params, "opt": optimizer(train).init(params), "ref": ref}
    batch = {"tokens": jnp.asarray(ids, jnp.int32)[None],
             "segment_ids": jnp.ones((1, 2 * b, t), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(t), (1, 2 * b, t)),
             "weights": jnp.asarray(np.roll(completion, -1, axis=1))[None].at[..., -1].set(0.0),
             "completion_lengths": jnp.full((1, 2 * b), t - t // 2, jnp.float32),
             "pair_weights": jnp.ones((1, b), jnp.float32)}

    def ours_step():
        step_batch = {**batch, "ref_logps": sequence_logps(c, jnp.dtype(dtype), None, (),
                                                           state["ref"], batch)}
        state["params"], state["opt"], m = train_step(objective, train, state["params"],
                                                      state["opt"], step_batch, 0)
        m["loss"].block_until_ready()

    ours = median_seconds(ours_step, args.steps, warmup=2)
    state.clear()  # frees our params, optimizer state and reference before torch's models
    del ref

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(c.to_hf())).to(device).train()
    ref_model = Qwen2ForCausalLM(HFQwen2Config.from_dict(c.to_hf())).to(device).eval()
    tokens = torch.as_tensor(ids, device=device)
    mask = torch.as_tensor(completion, device=device)[:, 1:]

    def logps(m):
        logp = torch.log_softmax(m(tokens).logits[:, :-1].float(), -1)
        return (logp.gather(2, tokens[:, 1:, None])[..., 0] * mask).sum(1)

    def dpo_loss():
        with torch.no_grad():
            reference = logps(ref_model)
        chosen, rejected = (logps(model) - reference).chunk(2)
        return -F.logsigmoid(0.1 * (chosen - rejected)).mean()

    theirs = median_seconds(torch_step(model, dpo_loss, device, dtype == "bfloat16"), args.steps,
                            warmup=2)
    print(json.dumps({"bench": "dpo", "params_m": round(n_params / 1e6, 1), "pairs": b,
                      "length": t, "dtype": dtype, "device": jax.devices()[0].device_kind,
                      "transformers_device": device,
                      "qwen2_jax_pairs_per_s": round(b / ours, 2),
                      "transformers_pairs_per_s": round(b / theirs, 2),
                      "ratio": round(theirs / ours, 3)}))


if __name__ == "__main__":
    main()
