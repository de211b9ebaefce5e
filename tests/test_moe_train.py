"""Qwen2-MoE SFT: the loss with the load-balancing term and its gradients against PyTorch
autograd of transformers' training loss; packed rows; micro-batches."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import qwen2_jax
from conftest import make_hf_moe_model
from qwen2_jax.checkpoint.mapping import tensor_rules
from qwen2_jax.train.data import Example, pack
from qwen2_jax.train.step import SFTObjective, batch_gradients

AUX = dict(output_router_logits=True, router_aux_loss_coef=0.02)
gradients = jax.jit(batch_gradients, static_argnums=0)


def examples(rng, lengths=(7, 12, 5, 9)) -> list[Example]:
    out = []
    for n in lengths:
        targets = (rng.random(n) < 0.6).tolist()
        targets[-1] = True
        out.append(Example(rng.integers(0, 97, n).tolist(), targets))
    return out


def unpacked(data: list[Example], row_length: int) -> dict:
    """One example per row, right-padded (segment 0) to row_length."""
    rows = [pack([example], row_length, seed=0) for example in data]
    return {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}


def torch_labels(batch: dict) -> torch.Tensor:
    """transformers' labels for our batch: token t + 1 where weights[t] is set, else -100
    (its loss shifts labels left by one, as our weights are shifted)."""
    labels = np.full(batch["tokens"].shape, -100)
    labels[:, 1:] = np.where(batch["weights"][:, :-1] > 0, batch["tokens"][:, 1:], -100)
    return torch.as_tensor(labels)


def torch_grads(model) -> dict[str, np.ndarray]:
    """Each parameter's .grad by its name on disk: transformers 5 fuses the routed experts
    (gate_up_proj [E, 2F, D], down_proj [E, D, F]) in memory but saves them per expert."""
    out = {}
    for name, p in model.named_parameters():
        g = p.grad.numpy()
        if name.endswith("experts.gate_up_proj"):
            f = g.shape[1] // 2
            for j in range(g.shape[0]):
                out[name.replace("gate_up_proj", f"{j}.gate_proj.weight")] = g[j, :f]
                out[name.replace("gate_up_proj", f"{j}.up_proj.weight")] = g[j, f:]
        elif name.endswith("experts.down_proj"):
            for j in range(g.shape[0]):
                out[name.replace("down_proj", f"{j}.down_proj.weight")] = g[j]
        else:
            out[name] = g
    return out


def assert_grads_equal(config, grads, theirs: dict, atol: float) -> None:
    """Every tensor of the checkpoint; atol relative to each tensor's largest gradient."""
    for rule in tensor_rules(config):
        ours = grads
        for key in rule.path:
            ours = ours[key]
        ours = rule.to_hf(np.asarray(ours[rule.stack]))
        scale = max(1e-4, float(np.abs(theirs[rule.hf_name]).max()))
        np.testing.assert_allclose(ours, theirs[rule.hf_name], rtol=0, atol=atol * scale,
                                   err_msg=rule.hf_name)


@pytest.mark.parametrize("micro_batches,layout", [(1, {}), (2, {"mlp_only_layers": [1]})],
                         ids=["one_batch_scanned", "two_micro_batches_unrolled"])
def test_loss_aux_and_grads_equal_transformers(tmp_path, rng, micro_batches, layout):
    """Rows right-padded: padding's router logits stay out of the aux loss, as transformers'
    attention_mask keeps them out. Two micro-batches: the cross-entropy over both, plus the
    coefficient times the mean of each half's aux loss (step.py's documented combination)."""
    model = make_hf_moe_model(tmp_path, **AUX, **layout)
    config, params = qwen2_jax.load(tmp_path)
    assert config.output_router_logits and config.router_aux_loss_coef == 0.02
    batch = unpacked(examples(rng), 12)
    assert (batch["segment_ids"] == 0).any()  # some padding
    micro = {k: jnp.asarray(v).reshape(micro_batches, -1, 12) for k, v in batch.items()}
    metrics, grads = gradients(SFTObjective(config), params, micro)

    # transformers on each micro-batch: its cross-entropy summed, its aux loss
    nll, count, aux, outs = 0.0, 0, 0.0, []
    for part in np.split(np.arange(len(batch["tokens"])), micro_batches):
        rows = {k: v[part] for k, v in batch.items()}
        labels = torch_labels(rows)
        out = model(torch.as_tensor(rows["tokens"], dtype=torch.long),
                    attention_mask=torch.as_tensor(rows["segment_ids"] > 0, dtype=torch.long),
                    labels=labels, output_router_logits=True)
        nll = nll + torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="sum")
        count += int((labels != -100).sum())
        aux = aux + out.aux_loss / micro_batches
        outs.append(out)
    total = nll / count + config.router_aux_loss_coef * aux
    if micro_batches == 1:  # transformers' own training loss
        torch.testing.assert_close(total, outs[0].loss, rtol=1e-6, atol=0)
    total.backward()

    np.testing.assert_allclose(float(metrics["aux_loss"]), aux.item(), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["loss"]), total.item(), rtol=1e-5)
    # the aux term is far above the tolerance: a loss without it fails the line above
    assert config.router_aux_loss_coef * aux.item() > 1e-3 * total.item()
    assert_grads_equal(config, grads, torch_grads(model), atol=1e-5)


def test_packed_rows_equal_unpacked(tmp_path, rng):
    """Packing changes neither the aux loss nor the gradients: padding (segment 0) is out of
    both, and a packed example's router logits are its logits alone."""
    make_hf_moe_model(tmp_path, **AUX)
    config, params = qwen2_jax.load(tmp_path)
    data = examples(rng, (7, 12, 5, 9, 3))
    packed = pack(data, 24, seed=1)
    alone = unpacked(data, 12)
    assert packed["tokens"].shape[0] < alone["tokens"].shape[0]
    objective = SFTObjective(config)
    m_p, g_p = gradients(objective, params, {k: jnp.asarray(v)[None] for k, v in packed.items()})
    m_a, g_a = gradients(objective, params, {k: jnp.asarray(v)[None] for k, v in alone.items()})
    np.testing.assert_allclose(float(m_p["aux_loss"]), float(m_a["aux_loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m_p["loss"]), float(m_a["loss"]), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), g_p, g_a)


def test_no_aux_term_unless_output_router_logits(tmp_path, rng):
    """transformers' default (output_router_logits false) trains on the cross-entropy alone,
    and the model then collects no router logits."""
    make_hf_moe_model(tmp_path)
    config, params = qwen2_jax.load(tmp_path)
    assert not config.output_router_logits
    batch = {k: jnp.asarray(v)[None] for k, v in unpacked(examples(rng), 12).items()}
    objective = SFTObjective(config)
    metrics = jax.eval_shape(lambda: objective(params, jax.tree.map(lambda x: x[0], batch),
                                               objective.totals(batch))[1])
    assert set(metrics) == {"loss"}
