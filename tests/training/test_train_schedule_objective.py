"""Learning-rate schedules, AdamW parameter groups, and the objective's terms and batch-split invariance."""

from __future__ import annotations

import math

import pytest
import torch

import jetmoe
from jetmoe.training.config import build_config
from jetmoe.training.objective import compute_terms, micro_batch_loss, router_z_loss
from jetmoe.training.optim import build_optimizer, parameter_groups
from jetmoe.training.schedule import build_scheduler, lr_factor
from train_helpers import MICRO_MODEL

TOTAL, WARMUP = 100, 10


def curve(**kwargs):
    return [lr_factor(s, total_steps=TOTAL, warmup_steps=WARMUP, min_lr_ratio=0.1, **kwargs) for s in range(TOTAL)]


def test_wsd_exponential_shape():
    values = curve(schedule="wsd", decay_fraction=0.2, decay_type="exponential")
    assert values[:WARMUP] == pytest.approx([(s + 1) / WARMUP for s in range(WARMUP)])  # linear warmup
    assert values[WARMUP:80] == [1.0] * 70  # stable
    decay = values[80:]
    assert all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] == pytest.approx(0.1)
    ratios = [b / a for a, b in zip(decay, decay[1:])]
    assert max(ratios) - min(ratios) < 1e-9  # exponential: a constant ratio per step
    assert ratios[0] == pytest.approx(0.1 ** (1 / 20))


def test_wsd_linear_decay_shape():
    decay = curve(schedule="wsd", decay_fraction=0.2, decay_type="linear")[80:]
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert max(steps) - min(steps) < 1e-9 and decay[-1] == pytest.approx(0.1)


def test_cosine_and_constant():
    cosine = curve(schedule="cosine")
    assert cosine[WARMUP] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(cosine[WARMUP:], cosine[WARMUP + 1 :]))
    middle = WARMUP + (TOTAL - WARMUP) // 2
    assert cosine[middle] == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-9)
    assert curve(schedule="constant")[WARMUP:] == [1.0] * (TOTAL - WARMUP)


def test_scheduler_drives_the_optimizer_lr():
    config = build_config("tiny", None, {"lr": 0.5, "max_steps": TOTAL, "warmup_steps": WARMUP})
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**MICRO_MODEL))
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config)
    seen = []
    for _ in range(TOTAL):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    expected = [0.5 * lr_factor(s, total_steps=TOTAL, warmup_steps=WARMUP, schedule=config.schedule,
                                decay_fraction=config.decay_fraction, decay_type=config.decay_type,
                                min_lr_ratio=config.min_lr_ratio) for s in range(TOTAL)]
    assert seen[WARMUP - 1] == pytest.approx(0.5) and seen[-1] < 0.5 * 0.2  # warmed up, then decayed
    assert seen == pytest.approx(expected)


def test_no_decay_groups():
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**MICRO_MODEL))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "model.embed_tokens.weight" in kept and "model.norm.weight" in kept
    assert "model.layers.0.mlp.bias" in kept and "model.layers.0.self_attention.experts.bias" in kept
    assert "model.layers.0.mlp.input_linear.weight" in decayed and "model.layers.0.self_attention.kv_proj.weight" in decayed
    assert "model.layers.0.mlp.router.layer.weight" in decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))  # tied head counted once


@pytest.mark.parametrize("aux_type", ["reference", "switch"])
def test_objective_terms_match_the_model_loss(aux_type):
    torch.manual_seed(0)
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**MICRO_MODEL, router_aux_loss_type=aux_type))
    ids = torch.randint(4, 300, (2, 12))
    with torch.no_grad():
        with_labels = model(ids, labels=ids, output_router_logits=True)
        output = model(ids, output_router_logits=True)
    terms = compute_terms(output, ids)
    assert terms.targets == 2 * 11
    ce = terms.ce_sum / terms.targets
    assert float(ce + model.config.aux_loss_coef * terms.aux) == pytest.approx(float(with_labels.loss), rel=1e-6)
    expected_z = torch.stack([torch.logsumexp(l, -1).square().mean() for l in output.router_logits]).mean()
    assert float(terms.z_loss) == pytest.approx(float(expected_z)) == pytest.approx(float(router_z_loss(output.router_logits)))


def test_split_batches_give_the_global_gradient():
    """Two micro-batches with uneven target counts (masking) accumulate to the one-batch cross-entropy gradient."""
    torch.manual_seed(0)
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**MICRO_MODEL))
    ids = torch.randint(4, 300, (4, 10))
    labels = ids.clone()
    labels[0, :7] = -100  # the first micro-batch has fewer targets
    whole = compute_terms(model(ids, output_router_logits=True), labels)
    (whole.ce_sum / whole.targets).backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    parts = [(ids[:2], labels[:2]), (ids[2:], labels[2:])]
    global_targets = whole.targets
    for part_ids, part_labels in parts:
        terms = compute_terms(model(part_ids, output_router_logits=True), part_labels)
        micro_batch_loss(terms, global_targets, aux_coef=0.0, micro_batches=2, world=1).backward()
    for want, param in zip(expected, model.parameters()):
        torch.testing.assert_close(param.grad, want, rtol=1e-5, atol=1e-7)
    assert math.isfinite(float(whole.aux.detach()))
