"""LoRA training: adapter gradients against PEFT + torch autograd, an int8 base (QLoRA), only
adapters in the optimizer and checkpoints, exact resume after kill -9, and a task learned."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from test_dpo import models  # noqa: F401 (a fixture)
from test_sft import SCRIPT, chat_model, losses, sft_command  # noqa: F401 (a fixture)
from test_train import examples

import qwen2_jax
from conftest import make_hf_model, make_word_chat_model
from qwen2_jax import lora
from qwen2_jax.quantize import dequantize_params
from qwen2_jax.train import step
from qwen2_jax.train.data import pack
from qwen2_jax.train.step import SFTObjective, batch_gradients

peft = pytest.importorskip("peft")


def random_adapters(config, settings, seed=1):
    """Adapters with B non-zero too, so every gradient is non-trivial."""
    adapters = lora.init(config, settings, jax.random.key(seed))
    return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(jax.random.key(seed + 1), x.shape),
                        adapters)


def our_gradients(config, base, adapters, settings, batch):
    objective = SFTObjective(config, adapters=settings)
    metrics, grads = jax.jit(lambda a: batch_gradients(
        objective, a, jax.tree.map(lambda x: x[None], batch), base))(adapters)
    return float(metrics["loss"]), grads


@pytest.mark.parametrize("loss_chunk", [None, 5], ids=["one_chunk", "tied_chunks_of_5"])
def test_adapter_gradients_equal_peft_autograd(tmp_path, rng, monkeypatch, loss_chunk):
    """Also with the loss (and its gradient, made in the forward pass for a frozen head) in
    chunks of 5 positions of the 16-token rows, the lm_head tied to the embeddings."""
    if loss_chunk:
        monkeypatch.setattr(step, "LOSS_CHUNK", loss_chunk)
    model = make_hf_model(tmp_path, tie_word_embeddings=loss_chunk is not None)
    config, base = qwen2_jax.load(tmp_path)
    settings = lora.LoRAConfig(rank=4, alpha=6.0, targets=("q_proj", "v_proj", "o_proj",
                                                           "down_proj"), rslora=True)
    adapters = random_adapters(config, settings)
    batch = {k: jnp.asarray(v) for k, v in pack(examples(rng), 16, seed=0).items()}
    loss, grads = our_gradients(config, base, adapters, settings, batch)

    lora.save_adapter(str(tmp_path / "adapter"), config, settings, adapters, str(tmp_path))
    wrapped = peft.PeftModel.from_pretrained(model, str(tmp_path / "adapter"),
                                             is_trainable=True)
    tokens, segments = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    weights = np.asarray(batch["weights"])
    total, count = 0.0, 0.0
    for r in range(tokens.shape[0]):
        for s in set(segments[r]) - {0}:
            at = segments[r] == s
            ids = torch.as_tensor(tokens[r, at][None], dtype=torch.long)
            logp = torch.log_softmax(wrapped(input_ids=ids).logits.float(), -1)[0, :-1]
            nll = -logp.gather(1, ids[0, 1:, None])[:, 0]
            w = torch.as_tensor(weights[r, at][:-1])
            total = total + (nll * w).sum()
            count += float(w.sum())
    (total / count).backward()
    np.testing.assert_allclose(loss, float(total.detach() / count), rtol=1e-5)
    theirs = {name.replace(".default", ""): p.grad.numpy()
              for name, p in wrapped.named_parameters() if p.grad is not None}
    ours = lora.to_peft_tensors(config, settings, grads)
    assert set(ours) == set(theirs)
    for name, g in theirs.items():
        np.testing.assert_allclose(ours[name], g, rtol=0, atol=1e-4 * np.abs(g).max(),
                                   err_msg=name)
    wrapped.unload()


def test_int8_base_gives_the_gradients_of_its_dequantized_float_base(tmp_path, rng):
    make_hf_model(tmp_path)
    config, quantized = qwen2_jax.load(tmp_path, quantize="int8")
    settings = lora.LoRAConfig(rank=4, alpha=8.0)
    adapters = random_adapters(config, settings)
    batch = {k: jnp.asarray(v) for k, v in pack(examples(rng), 16, seed=0).items()}
    loss_q, grads_q = our_gradients(config, quantized, adapters, settings, batch)
    loss_f, grads_f = our_gradients(config, dequantize_params(quantized), adapters, settings,
                                    batch)
    np.testing.assert_allclose(loss_q, loss_f, rtol=1e-5)
    for gq, gf in zip(jax.tree.leaves(grads_q), jax.tree.leaves(grads_f), strict=True):
        np.testing.assert_allclose(gq, gf, rtol=0, atol=1e-4 * float(np.abs(gf).max()))


def test_lora_sft_resumes_exactly_and_writes_a_peft_adapter(tmp_path, chat_model):  # noqa: F811
    flags = ("--lora-rank", "4", "--lora-alpha", "8", "--lora-dropout", "0.1",
             "--quantize", "int8")
    whole = subprocess.run(sft_command(chat_model, tmp_path / "a", *flags), capture_output=True,
                           text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    assert "LoRA r=4" in whole.stderr
    expected = losses(tmp_path / "a")
    assert sorted(expected) == list(range(1, 9)) and expected[8] < expected[1]

    # checkpoints hold the adapters and their optimizer state, nothing of the base
    step = tmp_path / "a" / "checkpoints" / "8"
    size = sum(f.stat().st_size for f in step.rglob("*") if f.is_file())
    config = qwen2_jax.Qwen2Config.from_file(chat_model)
    adapter_bytes = 4 * sum(x.size for x in jax.tree.leaves(
        lora.init(config, lora.LoRAConfig(4, 8.0), jax.random.key(0))))
    assert size < 3 * adapter_bytes + 2_000_000, size  # adapters + 2 Adam moments + metadata
    final = tmp_path / "a" / "final"
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json",
                                                       "adapter_model.safetensors"]
    raw = json.loads((final / "adapter_config.json").read_text())
    assert raw["r"] == 4 and raw["lora_dropout"] == 0.1 and raw["bias"] == "none"

    killed = subprocess.Popen(sft_command(chat_model, tmp_path / "b", *flags),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.exists() and
                                          len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert len(metrics.read_text().splitlines()) < 8, "the run finished before the kill"
    resumed = subprocess.run(sft_command(chat_model, tmp_path / "b", *flags, "--resume"),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    got = losses(tmp_path / "b")
    np.testing.assert_allclose([got[s] for s in range(1, 9)],
                               [expected[s] for s in range(1, 9)], rtol=1e-6)
    # another rank is another run: refused, naming the flag
    other = subprocess.run(sft_command(chat_model, tmp_path / "b", "--lora-rank", "8",
                                       "--resume"), capture_output=True, text=True, timeout=300)
    assert other.returncode == 2 and "--lora-rank" in other.stderr


def test_bad_lora_flags_exit_2_naming_the_flag(tmp_path, chat_model):  # noqa: F811
    for flags, message in ((("--lora-rank", "0"), "--lora-rank"),
                           (("--lora-rank", "4", "--lora-dropout", "1.5"), "--lora-dropout"),
                           (("--lora-rank", "4", "--lora-targets", "q_proj,lm_head"),
                            "--lora-targets"),
                           (("--quantize", "int8"), "needs LoRA")):
        out = subprocess.run(sft_command(chat_model, tmp_path / "o", *flags),
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 2, (flags, out.stderr)
        assert message in out.stderr, (flags, out.stderr)
        assert not (tmp_path / "o").exists()


def test_lora_learns_the_digit_swap_and_serves_it_unmerged(tmp_path):
    """test_sft's task (swap two digits; 80 pairs trained, 20 held out) learned by LoRA r=16 on
    every projection, to the same accuracy (every held-out answer), applied unmerged.

    As LoRA is used, the base is a trained model: a random one fully fine-tuned to echo the
    digits unswapped (all 100 pairs). From a random base with frozen embeddings, LoRA learns
    the answer's format but not the swap.
    """
    from qwen2_jax.tokenizer import Tokenizer
    from qwen2_jax.train.sft import SFTArgs, run

    make_word_chat_model(tmp_path, ["system", "user", "assistant", "echo", *map(str, range(10))])
    pairs = [(a, b) for a in range(10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    train, held_out = pairs[:80], pairs[80:]
    for name, answers in (("copy", [(a, b, f"{a} {b}") for a, b in pairs]),
                          ("swap", [(a, b, f"{b} {a}") for a, b in train])):
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"prompt": f"echo {a} {b}", "completion": answer}) + "\n"
            for a, b, answer in answers))
    common = dict(max_len=64, batch_size=8, warmup=10, steps=150, save_every=1000,
                  progress=False)
    run(SFTArgs(model=str(tmp_path), data=str(tmp_path / "copy.jsonl"),
                out=str(tmp_path / "base"), lr=3e-3, **common))
    base = tmp_path / "base" / "final"
    run(SFTArgs(model=str(base), data=str(tmp_path / "swap.jsonl"), out=str(tmp_path / "out"),
                lr=1e-2, lora_rank=16, lora_alpha=16.0, **common))
    records = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text()
               .splitlines()]
    assert records[-1]["loss"] < 0.05 * records[0]["loss"]

    chat = Tokenizer(str(tmp_path))
    prompts = [chat.encode(chat.apply_chat_template([{"role": "user",
                                                      "content": f"echo {a} {b}"}]))
               for a, b in held_out]
    for adapter, expected in ((None, [f"{a} {b}" for a, b in held_out]),
                              (tmp_path / "out" / "final", [f"{b} {a}" for a, b in held_out])):
        config, params = qwen2_jax.load(base, adapter=adapter)
        answers = qwen2_jax.generate(config, params, prompts, max_new_tokens=4,
                                     stop_token_ids=[chat.token_id("<|im_end|>")])
        assert [chat.decode(x) for x in answers] == expected


def test_lora_dpo_reference_is_the_base_without_a_copy(tmp_path, models):  # noqa: F811
    """DPO with LoRA and no --ref-model uses the base without adapters as its reference (TRL
    with PEFT): the same losses and metrics as a separately loaded frozen copy, precomputed or
    not, and ln 2 at the first step (B starts at zero: policy == reference)."""
    from test_dpo import CONVERSATIONAL, METRICS, STANDARD, records, write_jsonl

    from qwen2_jax.train.dpo import DPOArgs, run

    data = write_jsonl(tmp_path / "d.jsonl", STANDARD + CONVERSATIONAL)
    common = dict(model=str(models["policy_dir"]), data=data, steps=3, batch_size=2,
                  grad_accum=2, max_len=32, lr=1e-2, progress=False, lora_rank=4,
                  lora_alpha=8.0)
    base = run(DPOArgs(out=str(tmp_path / "base"), **common))
    assert base["reference"] == "the base model without adapters"
    run(DPOArgs(out=str(tmp_path / "copy"), ref_model=str(models["policy_dir"]), **common))
    run(DPOArgs(out=str(tmp_path / "pre"), precompute_ref=True, **common))
    a, b, c = (records(tmp_path / name) for name in ("copy", "base", "pre"))
    assert a[0]["loss"] == pytest.approx(np.log(2), rel=1e-5)
    assert a[2]["loss"] < a[0]["loss"]
    for name in ("loss", *METRICS):
        for other in (b, c):
            np.testing.assert_allclose([r[name] for r in other], [r[name] for r in a],
                                       rtol=1e-5, atol=1e-6, err_msg=name)
    # an int8 base is its own reference too: ln 2 at the first step, then it learns
    run(DPOArgs(out=str(tmp_path / "int8"), quantize="int8", **common))
    q = records(tmp_path / "int8")
    assert q[0]["loss"] == pytest.approx(np.log(2), rel=1e-5) and q[2]["loss"] < q[0]["loss"]


def test_lora_step_on_a_mesh_equals_one_device(tmp_path, rng):
    """Adapters placed by their kernels' logical axes (fsdp=4 x tensor=2) on an int8 base:
    the same loss and update as one device, and they stay sharded as placed."""
    from qwen2_jax.api import place_adapters
    from qwen2_jax.sharding import DEFAULT_RULES, make_mesh
    from qwen2_jax.train.step import TrainConfig, optimizer, train_step

    make_hf_model(tmp_path, num_attention_heads=4, num_key_value_heads=2)
    config, base = qwen2_jax.load(tmp_path, quantize="int8")
    settings = lora.LoRAConfig(rank=4, alpha=8.0)
    adapters = random_adapters(config, settings)
    batch = {k: jnp.asarray(v).reshape(2, 2, 12)
             for k, v in pack(examples(rng, (7, 12, 9, 11)), 12, seed=2).items()}
    train = TrainConfig(learning_rate=1e-3, total_steps=10, grad_accum=2)
    objective = SFTObjective(config, adapters=settings)
    expected, _, m1 = train_step(objective, train, adapters, optimizer(train).init(adapters),
                                 batch, 0, base)
    mesh = make_mesh("fsdp=4,tensor=2")
    _, sharded_base = qwen2_jax.load(tmp_path, mesh=mesh, quantize="int8")
    sharded = place_adapters(config, settings, random_adapters(config, settings), mesh)
    q_b = sharded["layers"]["self_attn"]["q_proj"]["lora_b"]  # [L, R, N, H]: N over tensor
    assert q_b.sharding.shard_shape(q_b.shape) == (3, 4, 2, 14)
    shardings = jax.tree.map(lambda x: x.sharding, sharded)
    objective = SFTObjective(config, mesh=mesh, rules=DEFAULT_RULES, adapters=settings)
    got, _, m2 = train_step(objective, train, sharded, optimizer(train).init(sharded), batch,
                            0, sharded_base)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    for x, y, s in zip(jax.tree.leaves(got), jax.tree.leaves(expected),
                       jax.tree.leaves(shardings), strict=True):
        assert x.sharding.is_equivalent_to(s, x.ndim)
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-4)
