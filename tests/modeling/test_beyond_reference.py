"""What the reference lacks: gradient checkpointing, torch.compile(fullgraph=True), router logits during padded
generation, padding-free balancing loss, the original switch + z-loss objective, attentions under sdpa."""

from __future__ import annotations

import pytest
import torch
from balancing_formulas import reference_aux_loss, switch_aux_loss
from oracle_pair import GRAD_ATOL, TINY, assert_close, build_pair, max_diff, padding_mask, random_ids

import jetmoe

PAD = 0


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_gradients():
    ours, oracle = build_pair()
    ids = random_ids(2, 6)
    mask = padding_mask([6, 4], 6, "left")
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), output_router_logits=True)

    ours.train()
    plain_loss = ours(**kwargs).loss
    plain_loss.backward()
    plain = _grads(ours)
    ours.zero_grad(set_to_none=True)

    ours.gradient_checkpointing_enable()
    assert ours.model.gradient_checkpointing or ours.model.layers[0].gradient_checkpointing
    layer_calls = []
    # A pre-hook: torch's checkpoint may stop a recompute early, once every saved tensor is back.
    hook = ours.model.layers[0].self_attention.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    try:
        out = ours(**kwargs)
        assert out.cache is None  # no cache while checkpointing in training
        calls_in_forward = len(layer_calls)
        out.loss.backward()
    finally:
        hook.remove()
    assert calls_in_forward == 1 and len(layer_calls) == 2, "the layer was not recomputed in backward"
    assert_close(out.loss, plain_loss, atol=0, what="loss with checkpointing")
    worst = max(max_diff(p.grad, plain[name]) for name, p in ours.named_parameters())
    print(f"PARITY gradient checkpointing vs plain: max abs grad diff {worst:.3e}")
    assert worst <= 1e-6

    # And still the oracle's gradients (which cannot checkpoint: it refuses).
    oracle.train()
    oracle(**kwargs).loss.backward()
    theirs = dict(oracle.named_parameters())
    assert max(max_diff(p.grad, theirs[name].grad) for name, p in ours.named_parameters()) <= GRAD_ATOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_compile_fullgraph_forward_and_backward(dtype):
    """fullgraph=True fails on any graph break, so this proves routing never syncs the host.

    The aot_eager backend runs dynamo (graph capture) and AOTAutograd (the backward graph) exactly as inductor
    would, minus inductor's C++ code generation, which takes minutes on 2 cores and tests torch, not us.
    """
    torch._dynamo.reset()
    ours, _ = build_pair(num_hidden_layers=1)
    ours.to(dtype).train()
    ids = random_ids(2, 8)
    kwargs = dict(input_ids=ids, labels=ids, output_router_logits=True, use_cache=False)

    eager_out = ours(**kwargs)
    eager_out.loss.backward()
    eager_grads = _grads(ours)
    ours.zero_grad(set_to_none=True)

    compiled = torch.compile(ours, fullgraph=True, backend="aot_eager")
    out = compiled(**kwargs)
    out.loss.backward()
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert_close(out.logits.float(), eager_out.logits.float(), atol=tol * 10, what=f"compiled logits {dtype}")
    assert_close(out.loss.float(), eager_out.loss.float(), atol=tol, what=f"compiled loss {dtype}")
    for name, p in ours.named_parameters():
        assert p.grad is not None, name
        scale = eager_grads[name].abs().max().item() + 1e-3
        assert max_diff(p.grad, eager_grads[name]) <= tol * 10 * scale, name
    torch._dynamo.reset()


@pytest.mark.parametrize("via", ["config", "kwarg"])
def test_generate_padded_batch_with_router_logits(via, attn_implementation):
    """The reference crashes here (the 2-D mask is longer than the router rows once the cache is used)."""
    overrides = dict(pad_token_id=PAD, output_router_logits=(via == "config"))
    ours, oracle = build_pair(attn_implementation=attn_implementation, **overrides)
    mask = padding_mask([5, 2], 5, "left")
    ids = random_ids(2, 5).masked_fill(mask == 0, PAD)
    extra = {"output_router_logits": True} if via == "kwarg" else {}
    with torch.no_grad():
        got = ours.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, do_sample=False, **extra)
        oracle.config.output_router_logits = False  # the oracle only works without
        want = oracle.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, do_sample=False)
    assert torch.equal(got, want)


def test_cached_decode_step_with_padded_mask_reports_router_logits_and_aux_loss():
    ours, _ = build_pair(pad_token_id=PAD)
    mask = padding_mask([5, 3], 5, "left")
    ids = random_ids(2, 6).masked_fill(torch.nn.functional.pad(mask, (0, 1), value=1) == 0, PAD)
    with torch.no_grad():
        prefix = ours(ids[:, :5], attention_mask=mask, output_router_logits=True)
        step = ours(
            ids[:, 5:],
            attention_mask=torch.nn.functional.pad(mask, (0, 1), value=1),
            cache=prefix.cache,
            output_router_logits=True,
        )
    assert len(step.router_logits) == 2 * TINY["num_hidden_layers"]
    assert all(r.shape == (2, TINY["num_local_experts"]) for r in step.router_logits)
    want = reference_aux_loss(step.router_logits, TINY["num_local_experts"], TINY["num_experts_per_tok"])
    assert abs(step.aux_loss.item() - want.item()) < 2e-5


def test_padded_tokens_do_not_count_in_the_balancing_loss():
    ours, _ = build_pair(pad_token_id=PAD)
    real = random_ids(2, 4, seed=5)

    def aux(pad_left, pad_token):
        ids = torch.cat([torch.full((2, pad_left), pad_token), real], dim=1)
        mask = torch.cat([torch.zeros(2, pad_left, dtype=torch.long), torch.ones_like(real)], dim=1)
        with torch.no_grad():
            return ours(ids, attention_mask=mask, output_router_logits=True).aux_loss.item()

    unpadded = aux(0, PAD)
    for pad_left, pad_token in [(1, PAD), (3, PAD), (3, 77), (5, 9)]:
        assert abs(aux(pad_left, pad_token) - unpadded) < 2e-5, (pad_left, pad_token)
    # Not vacuous: counting the padded rows (mask None) gives another value.
    ids = torch.cat([torch.full((2, 3), 77), real], dim=1)
    with torch.no_grad():
        counted = ours(ids, output_router_logits=True).aux_loss.item()
    assert abs(counted - unpadded) > 1e-3


def test_switch_objective_is_off_by_default():
    config = jetmoe.JetMoeConfig()
    assert config.router_aux_loss_type == "reference"
    assert config.output_router_logits is False


@pytest.mark.parametrize("padding", ["none", "left"])
def test_switch_objective_matches_the_original_formula(padding):
    ours, _ = build_pair(router_aux_loss_type="switch", router_z_loss_coef=0.1)
    ids = random_ids(2, 6)
    mask = None if padding == "none" else padding_mask([6, 3], 6, "left")
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    ours.train()
    out = ours(ids, attention_mask=mask, labels=labels, output_router_logits=True)
    experts, top_k = TINY["num_local_experts"], TINY["num_experts_per_tok"]
    want = switch_aux_loss(out.router_logits, experts, top_k, 0.1, None if mask is None else mask.reshape(-1))
    assert_close(out.aux_loss.double(), want, atol=2e-5 * max(1.0, want.item()), what=f"switch aux [{padding}]")
    # Summed over routers, so it is not the reference (averaged) value.
    assert abs(out.aux_loss.item() - reference_aux_loss(out.router_logits, experts, top_k).item()) > 1e-2
    ce = ours(ids, attention_mask=mask, labels=labels).loss
    assert_close(out.loss, ce + ours.config.aux_loss_coef * out.aux_loss, atol=1e-5, what="CE + coef * switch aux")
    out.loss.backward()
    assert ours.model.layers[0].mlp.router.layer.weight.grad.abs().max() > 0


def test_switch_objective_z_loss_coefficient_is_read():
    ids = random_ids(1, 5)
    losses = []
    for coef in (0.0, 1.0):
        ours, _ = build_pair(router_aux_loss_type="switch", router_z_loss_coef=coef)
        with torch.no_grad():
            losses.append(ours(ids, output_router_logits=True))
    experts, top_k = TINY["num_local_experts"], TINY["num_experts_per_tok"]
    z = switch_aux_loss(losses[0].router_logits, experts, top_k, 1.0) - switch_aux_loss(
        losses[0].router_logits, experts, top_k, 0.0
    )
    assert abs((losses[1].aux_loss - losses[0].aux_loss).item() - z.item()) < 1e-4 * max(1.0, z.item())


@pytest.mark.parametrize("padding", ["none", "left"])
def test_output_attentions_under_sdpa_equal_the_oracle_eager_attentions(padding):
    ours, _ = build_pair(attn_implementation="sdpa")
    _, oracle = build_pair(attn_implementation="eager")
    ids = random_ids(2, 6)
    mask = None if padding == "none" else padding_mask([6, 4], 6, "left")
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_attentions=True)
        want = oracle(ids, attention_mask=mask, output_attentions=True)
        plain = ours(ids, attention_mask=mask)
    real = torch.ones(2, 6, dtype=torch.bool) if mask is None else mask.bool()
    assert len(got.attentions) == TINY["num_hidden_layers"]
    for g, w in zip(got.attentions, want.attentions):
        assert_close(g.transpose(1, 2)[real], w.transpose(1, 2)[real], what=f"sdpa attentions vs oracle eager [{padding}]")
    assert_close(got.logits[real], plain.logits[real], what="logits with vs without output_attentions")
