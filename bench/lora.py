"""LoRA training at the Qwen2-0.5B shape: our full fine-tune, our LoRA, and TRL + PEFT's LoRA.

One run, float32, random weights of the Qwen2-0.5B shape (the real model's, 494M
parameters), one batch of --batch x --length tokens a step, AdamW (lr 1e-4, clipping at
1.0). LoRA: r=16, alpha 32, every projection (q, k, v, o, gate, up, down), no dropout. TRL is
its SFTTrainer with a peft LoraConfig (what TRL users run), timed per optimizer step by a
callback. TRL's SFTConfig turns gradient checkpointing on by default; each side runs with and
without it (ours: --remat full, every layer recomputed in the backward pass, or none), and
each pair is compared like with like. Each contender runs in a process of its own, so its
peak resident memory (VmHWM, everything the process touched: weights, gradients, optimizer
state, activations) is its own; every contender runs --rounds times, in turn, and keeps its
fastest round (tokens/s of each round are printed too). Prints one JSON line with tokens/s
and peak memory of each and the targets, at both settings:

    LoRA peak memory <= 0.5x our full fine-tune; our LoRA >= 1.2x TRL + PEFT tokens/s

    .venv/bin/python bench/lora.py [--batch 1 --length 512 --steps 3 --rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

RANK, ALPHA = 16, 32.0
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        line = next(x for x in f if x.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def ours(args, use_lora: bool, remat: str) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from forward import median_seconds

    import qwen2_jax
    from qwen2_jax import lora
    from qwen2_jax.train.step import SFTObjective, TrainConfig, optimizer, train_step

    config = qwen2_jax.PRESETS["Qwen2-0.5B"]
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    params = qwen2_jax.init(config, jax.random.key(0))
    settings, frozen = None, None
    if use_lora:
        settings = lora.LoRAConfig(RANK, ALPHA, targets=TARGETS)
        frozen, params = params, lora.init(config, settings, jax.random.key(1))
    trainable = sum(x.size for x in jax.tree.leaves(params))
    train = TrainConfig(learning_rate=1e-4, total_steps=1000, remat=remat)
    objective = SFTObjective(config, jnp.float32, remat=remat, adapters=settings)
    state = {"params": params, "opt": optimizer(train).init(params)}
    del params
    batch = {"tokens": jnp.asarray(ids, jnp.int32)[None],
             "segment_ids": jnp.ones((1, *ids.shape), jnp.int32),
             "positions": jnp.broadcast_to(jnp.arange(args.length), (1, *ids.shape)),
             "weights": jnp.ones((1, *ids.shape), jnp.float32).at[..., -1].set(0.0)}

    def step():
        state["params"], state["opt"], m = train_step(objective, train, state["params"],
                                                      state["opt"], batch, 0, frozen)
        m["loss"].block_until_ready()

    seconds = median_seconds(step, args.steps, warmup=1)
    return {"tokens_per_s": round(ids.size / seconds, 1), "step_s": round(seconds, 3),
            "trainable_params": int(trainable), "peak_rss_mb": round(peak_rss_mb())}


def trl(args, checkpointing: bool) -> dict:
    import datasets
    import numpy as np
    import peft
    import torch
    import transformers
    from transformers import Qwen2Config as HFQwen2Config
    from transformers import Qwen2ForCausalLM
    from trl import SFTConfig, SFTTrainer

    import qwen2_jax

    torch.manual_seed(0)
    config = qwen2_jax.PRESETS["Qwen2-0.5B"]
    model = Qwen2ForCausalLM(HFQwen2Config.from_dict(config.to_hf()))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (args.batch, args.length))
    steps = args.steps + 1
    data = datasets.Dataset.from_dict({"input_ids": [row.tolist() for row in ids] * steps})
    tokenizer = transformers.AutoTokenizer.from_pretrained(
        qwen2_jax.default_model(progress=False))
    times: list[float] = []

    class StepTimer(transformers.TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = SFTTrainer(
        model=model, processing_class=tokenizer, train_dataset=data,
        peft_config=peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                    target_modules=list(TARGETS), task_type="CAUSAL_LM"),
        args=SFTConfig(output_dir=args.trl_out, max_steps=steps, learning_rate=1e-4,
                       per_device_train_batch_size=args.batch, max_length=args.length,
                       packing=False, max_grad_norm=1.0, weight_decay=0.0,
                       lr_scheduler_type="constant",
                       logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True,
                       bf16=False, fp16=False, dataloader_num_workers=0, seed=0,
                       gradient_checkpointing=checkpointing),
        callbacks=[StepTimer()])
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    seconds = float(np.median(times[1:]))  # the first step warms up
    return {"tokens_per_s": round(ids.size / seconds, 1), "step_s": round(seconds, 3),
            "trainable_params": int(trainable), "peak_rss_mb": round(peak_rss_mb()),
            "torch_threads": torch.get_num_threads()}


CONTENDERS = {"full": lambda a: ours(a, False, "none"), "lora": lambda a: ours(a, True, "none"),
              "trl": lambda a: trl(a, False), "full_remat": lambda a: ours(a, False, "full"),
              "lora_remat": lambda a: ours(a, True, "full"), "trl_remat": lambda a: trl(a, True)}
NAMES = {"full": "qwen2_jax_full", "lora": "qwen2_jax_lora", "trl": "trl_peft_lora",
         "full_remat": "qwen2_jax_full_remat_full", "lora_remat": "qwen2_jax_lora_remat_full",
         "trl_remat": "trl_peft_lora_gradient_checkpointing"}


def run_one(name: str, args) -> dict:
    """The contender in a fresh process (its own peak memory); its JSON line."""
    command = [sys.executable, __file__, "--one", name, "--batch", str(args.batch),
               "--length", str(args.length), "--steps", str(args.steps)]
    done = subprocess.run(command, capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.abspath(__file__)))
    if done.returncode != 0:
        raise SystemExit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after 1 warm-up)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="runs of every contender, in turn; each keeps its fastest (this "
                             "machine's speed drifts by up to 30%% over minutes)")
    parser.add_argument("--one", choices=sorted(CONTENDERS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import tempfile

        with tempfile.TemporaryDirectory() as out:
            args.trl_out = out
            print(json.dumps(CONTENDERS[args.one](args)))
        return
    rounds = [{name: run_one(name, args) for name in CONTENDERS} for _ in range(args.rounds)]
    results = {name: max((r[name] for r in rounds), key=lambda x: x["tokens_per_s"])
               for name in CONTENDERS}
    for name, result in results.items():
        result["tokens_per_s_each_round"] = [r[name]["tokens_per_s"] for r in rounds]
    targets = {}
    for setting, suffix in (("no_checkpointing", ""), ("checkpointing", "_remat")):
        memory = (results[f"lora{suffix}"]["peak_rss_mb"]
                  / results[f"full{suffix}"]["peak_rss_mb"])
        speed = results[f"lora{suffix}"]["tokens_per_s"] / results[f"trl{suffix}"]["tokens_per_s"]
        targets[setting] = {
            "lora_memory_vs_full": {"value": round(memory, 3), "target_at_most": 0.5,
                                    "met": memory <= 0.5},
            "lora_vs_trl_peft_tokens_per_s": {"value": round(speed, 3), "target": 1.2,
                                              "met": speed >= 1.2}}
    print(json.dumps({
        "bench": "lora", "shape": "Qwen2-0.5B", "dtype": "float32", "batch": args.batch,
        "length": args.length, "rounds": args.rounds, "rank": RANK, "alpha": ALPHA,
        "targets": list(TARGETS),
        **{NAMES[name]: result for name, result in results.items()}, "targets_met": targets}))


if __name__ == "__main__":
    main()
