"""Routing plan properties (sorted order, offsets, gates), the router against the oracle's gating, and the
balancing losses against direct computations of their formulas and the oracle's load_balancing_loss_func."""

from __future__ import annotations

import pytest
import torch
from balancing_formulas import reference_aux_loss, switch_aux_loss
from oracle_pair import oracle_modeling

from jetmoe.modeling.routing import TopKRouter, make_plan, reference_balancing_loss, switch_balancing_loss


def _logits(tokens, experts, seed=0):
    return torch.randn(tokens, experts, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("tokens,experts,top_k", [(13, 4, 2), (20, 6, 3), (1, 4, 2), (9, 8, 1), (7, 4, 4)])
def test_plan_properties(tokens, experts, top_k):
    logits = _logits(tokens, experts)
    plan = make_plan(logits, top_k, torch.float32)
    top_values, top_ids = logits.topk(top_k, dim=1)

    assert (plan.num_tokens, plan.top_k, plan.num_experts) == (tokens, top_k, experts)
    assert plan.router_logits is logits
    assert torch.equal(plan.expert_ids, top_ids)  # best first
    assert torch.allclose(plan.gates, torch.softmax(top_values, dim=1))  # softmax over the chosen k only
    assert torch.allclose(plan.gates.sum(1), torch.ones(tokens))

    # Slots n*k + j grouped by expert; stable, so slot order is kept within an expert.
    flat_experts = top_ids.flatten()
    assert sorted(plan.sorted_slots.tolist()) == list(range(tokens * top_k))  # a permutation
    grouped = flat_experts[plan.sorted_slots]
    assert torch.all(grouped[1:] >= grouped[:-1])
    for e in range(experts):
        slots = plan.sorted_slots[grouped == e]
        assert torch.all(slots[1:] > slots[:-1])
    assert torch.equal(plan.sorted_tokens, plan.sorted_slots // top_k)
    assert torch.equal(plan.sorted_gates, plan.gates.flatten()[plan.sorted_slots])

    # Offsets: end row of each expert's group = cumulative counts, int32, ending at N*k.
    counts = torch.bincount(flat_experts, minlength=experts)
    assert plan.expert_ends.dtype == torch.int32 and plan.expert_ends.shape == (experts,)
    assert torch.equal(plan.expert_ends.long(), counts.cumsum(0))
    assert int(plan.expert_ends[-1]) == tokens * top_k


def test_plan_with_idle_experts_has_empty_groups():
    logits = torch.full((5, 6), -10.0)
    logits[:, 4] = 3.0
    logits[:, 1] = 2.0
    plan = make_plan(logits, 2, torch.float32)
    assert plan.expert_ends.tolist() == [0, 5, 5, 5, 10, 10]
    assert plan.sorted_tokens.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]


def test_gates_take_the_activation_dtype_logits_stay_fp32():
    router = TopKRouter(16, 4, 2).to(torch.bfloat16)
    x = torch.randn(10, 16, dtype=torch.bfloat16)
    plan = router(x)
    assert plan.router_logits.dtype == torch.float32
    assert plan.gates.dtype == plan.sorted_gates.dtype == torch.bfloat16
    # The scores are computed in the activation dtype, then upcast (as the reference does).
    assert torch.equal(plan.router_logits, router.layer(x).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_matches_oracle_gating(dtype):
    torch.manual_seed(0)
    ours = TopKRouter(32, 6, 3).to(dtype)
    oracle = oracle_modeling.JetMoeTopKGating(32, 6, 3).to(dtype)
    oracle.load_state_dict(ours.state_dict())
    x = torch.randn(17, 32, dtype=dtype)
    plan = ours(x)
    index_sorted, batch_index, batch_gates, expert_size, logits = oracle(x)

    assert torch.equal(plan.router_logits, logits)
    assert torch.diff(plan.expert_ends.long(), prepend=torch.zeros(1, dtype=torch.long)).tolist() == expert_size
    # The oracle's sort is not stable: compare each expert's group as a set of (token, gate) pairs.
    start = 0
    for size, end in zip(expert_size, plan.expert_ends.tolist()):
        want = sorted(zip(batch_index[start:end].tolist(), batch_gates[start:end].float().tolist()))
        got = sorted(zip(plan.sorted_tokens[start:end].tolist(), plan.sorted_gates[start:end].float().tolist()))
        assert got == want
        start = end


# ---------------------------------------------------------------------------------------------------------
# Balancing losses


def _router_logits(routers=4, tokens=12, experts=4, seed=0):
    return tuple(_logits(tokens, experts, seed + i).requires_grad_() for i in range(routers))


@pytest.mark.parametrize("experts,top_k", [(4, 2), (6, 3), (8, 1)])
def test_reference_loss_matches_formula_and_oracle(experts, top_k):
    logits = _router_logits(experts=experts)
    got = reference_balancing_loss(logits, experts, top_k)
    assert got.shape == () and got.dtype == torch.float32
    assert abs(got.item() - reference_aux_loss(logits, experts, top_k).item()) < 2e-5
    assert abs(got.item() - oracle_modeling.load_balancing_loss_func(logits, experts, top_k).item()) < 2e-5


def test_reference_loss_gradient_flows_through_probabilities_only():
    logits = _router_logits()
    (got_grads) = torch.autograd.grad(reference_balancing_loss(logits, 4, 2), logits)
    want_grads = torch.autograd.grad(reference_aux_loss(logits, 4, 2), logits)
    for g, w in zip(got_grads, want_grads):
        assert (g.double() - w).abs().max() < 1e-6


def test_reference_loss_with_mask_ignores_padded_rows():
    batch, length, experts = 3, 5, 4
    logits = _router_logits(tokens=batch * length)
    mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1], [1, 1, 0, 0, 0]])
    got = reference_balancing_loss(logits, experts, 2, mask)
    keep = mask.reshape(-1).bool()
    dropped = reference_balancing_loss(tuple(l[keep] for l in logits), experts, 2)
    assert abs(got.item() - dropped.item()) < 1e-6
    assert abs(got.item() - reference_aux_loss(logits, experts, 2, mask.reshape(-1)).item()) < 2e-5
    assert abs(got.item() - oracle_modeling.load_balancing_loss_func(logits, experts, 2, mask).item()) < 2e-5
    # The mask really matters here (else this test could not tell).
    assert abs(got.item() - reference_balancing_loss(logits, experts, 2).item()) > 1e-3


def test_loss_mask_longer_than_router_rows_uses_its_last_columns():
    """Cached decoding: the mask covers past + new tokens, the routers saw only the new ones."""
    logits = _router_logits(tokens=2 * 3)
    mask = torch.tensor([[0, 0, 1, 1, 0, 1], [1, 1, 1, 1, 1, 1]])  # [B=2, past 3 + new 3]
    got = reference_balancing_loss(logits, 4, 2, mask)
    assert abs(got.item() - reference_balancing_loss(logits, 4, 2, mask[:, 3:]).item()) < 1e-7


def test_loss_rejects_a_mask_that_does_not_fit():
    logits = _router_logits(tokens=7)
    with pytest.raises(ValueError, match="multiple"):
        reference_balancing_loss(logits, 4, 2, torch.ones(2, 7))
    with pytest.raises(ValueError, match="2-D"):
        reference_balancing_loss(logits, 4, 2, torch.ones(7, 1, 1))


@pytest.mark.parametrize("z_coef", [0.1, 0.0, 0.5])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_loss_matches_the_original_formula(z_coef, masked):
    batch, length, experts, top_k = 2, 6, 6, 2
    logits = _router_logits(routers=4, tokens=batch * length, experts=experts)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]]) if masked else None
    got = switch_balancing_loss(logits, experts, top_k, mask, z_loss_coef=z_coef)
    want = switch_aux_loss(logits, experts, top_k, z_coef, None if mask is None else mask.reshape(-1))
    assert got.shape == ()
    assert abs(got.item() - want.item()) < 2e-5 * max(1.0, abs(want.item()))
    got_grads = torch.autograd.grad(got, logits)
    want_grads = torch.autograd.grad(want, logits)
    for g, w in zip(got_grads, want_grads):
        assert (g.double() - w).abs().max() < 1e-6


def test_switch_loss_is_a_sum_over_routers():
    logits = _router_logits(routers=3)
    total = switch_balancing_loss(logits, 4, 2)
    parts = sum(switch_balancing_loss((l,), 4, 2) for l in logits)
    assert abs(total.item() - parts.item()) < 1e-5
    # Perfectly uniform routers: balance E * sum_e (1/E) * (1/E) = 1 each, z = log(E)^2.
    uniform = (torch.zeros(8, 4),)
    expected = 1.0 + 0.1 * torch.log(torch.tensor(4.0)).item() ** 2
    assert abs(switch_balancing_loss(uniform, 4, 2).item() - expected) < 1e-6
