"""Few-token routing plans (CPU inference, decoding): rows stay in slot order, no sort. They must give exactly
what the sorted plan gives, for float and int8 experts."""

from __future__ import annotations

import pytest
import torch
from oracle_pair import TINY, WIDE, build_pair, random_ids

from jetmoe.generation.quantize import quantize_model
from jetmoe.modeling import routing
from jetmoe.modeling.backends import kernels as backend_kernels
from jetmoe.ops import native
from jetmoe.modeling.routing import make_plan, use_few_token_plan


def test_few_token_plan_keeps_slot_order_and_the_same_choices():
    logits = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    sorted_plan, few = make_plan(logits, 3, torch.bfloat16), make_plan(logits, 3, torch.bfloat16, few_tokens=True)
    assert few.in_slot_order and not sorted_plan.in_slot_order
    assert few.slot_experts == tuple(sorted_plan.expert_ids.flatten().tolist())
    assert torch.equal(few.expert_ids, sorted_plan.expert_ids) and torch.equal(few.gates, sorted_plan.gates)
    assert few.sorted_slots is None and few.expert_ends is None


def test_few_token_plan_only_for_cpu_inference_on_few_slots():
    one_token = torch.randn(1, 8)
    with torch.no_grad():
        assert use_few_token_plan(one_token, top_k=2)
        assert use_few_token_plan(torch.randn(routing.FEW_SLOTS // 2, 8), top_k=2)
        assert not use_few_token_plan(torch.randn(routing.FEW_SLOTS // 2 + 1, 8), top_k=2)
    assert not use_few_token_plan(one_token, top_k=2)  # autograd on: the sorted plan (it has the backward)


def _decode_logits(model, ids):
    """Prefill ids[:, :-1] (sorted plan: many tokens), then one cached decode step of ids[:, -1:]."""
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], use_cache=True)
        return model(input_ids=ids[:, -1:], past_key_values=out.past_key_values, use_cache=True).logits


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["tiny", "wide"])
@pytest.mark.parametrize("int8", [False, True], ids=["float", "int8"])
def test_decode_step_is_identical_with_either_plan(monkeypatch, dtype, geometry, int8):
    model, _ = build_pair(geometry)
    model = model.to(dtype)
    if int8:
        quantize_model(model)
    batch = routing.FEW_SLOTS // geometry["num_experts_per_tok"]  # as many tokens as a few-token plan takes
    ids = random_ids(batch, 7)
    plans = []

    def recording_make_plan(*args, **kwargs):
        plans.append(make_plan(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(routing, "make_plan", recording_make_plan)
    few = _decode_logits(model, ids)
    assert plans[-1].in_slot_order  # the decode step did use the few-token plan
    monkeypatch.setattr(routing, "FEW_SLOTS", 0)
    grouped = _decode_logits(model, ids)
    assert not plans[-1].in_slot_order
    assert torch.equal(few, grouped), (few.float() - grouped.float()).abs().max()


@pytest.mark.skipif(not native.available(), reason="jetmoe's C kernels do not build here")
def test_decode_step_runs_each_expert_product_with_its_next_step_in_one_call(monkeypatch):
    """bf16 decoding with a few-token plan: the MoE GLU product with its activation, and the MoE and MoA output
    products with their gated sums, each in one kernel call; the logits are those of the steps run apart."""
    model, _ = build_pair(TINY)
    model = model.to(torch.bfloat16)
    ids = random_ids(1, 7)
    calls = {"gemv_silu_mul": 0, "gemv_combine": 0}
    for name in calls:
        original = getattr(native, name)

        def counted(*args, _name=name, _original=original):
            calls[_name] += 1
            return _original(*args)

        monkeypatch.setattr(native, name, counted)
    fused = _decode_logits(model, ids)
    layers = TINY["num_hidden_layers"]
    assert calls == {"gemv_silu_mul": layers, "gemv_combine": 2 * layers}  # the decode step only
    monkeypatch.setattr(backend_kernels, "_fused_decode", lambda *args: False)
    assert torch.equal(fused, _decode_logits(model, ids))


def _compiled_decode(model, ids, capture_scalar_outputs: bool):
    """One cached decode step through torch.compile(fullgraph=True): a graph break fails. Returns the names of
    the traced graph's operations and the logits."""
    graphs = []

    def recording_backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        past = model(input_ids=ids[:, :-1], use_cache=True).past_key_values
        step = torch.compile(
            lambda new_ids: model(input_ids=new_ids, past_key_values=past, use_cache=True).logits,
            backend=recording_backend,
            fullgraph=True,
        )
        with torch._dynamo.config.patch(capture_scalar_outputs=capture_scalar_outputs):
            logits = step(ids[:, -1:])
    torch._dynamo.reset()
    names = {getattr(node.target, "__name__", str(node.target)) for g in graphs for node in g.graph.nodes}
    return names, logits


def test_compiled_decode_uses_the_few_token_plan_when_scalars_are_captured():
    """With capture_scalar_outputs (the engine's compiled decode step) the routers' host reads trace as symbolic
    ints: one graph, no sort. Without it, the sorted plan keeps the graph whole instead."""
    model, _ = build_pair(TINY)
    ids = random_ids(1, 7)
    eager = _decode_logits(model, ids)
    names, logits = _compiled_decode(model, ids, capture_scalar_outputs=True)
    assert "sort" not in names and "item" in names, sorted(names)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)
    names, logits = _compiled_decode(model, ids, capture_scalar_outputs=False)
    assert "sort" in names and "item" not in names, sorted(names)
    torch.testing.assert_close(logits, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native.available(), reason="jetmoe's C kernels do not build here")
def test_compiled_bf16_decode_runs_product_and_next_step_as_one_operator():
    """In the engine's compiled decode step (scalars captured) the fused product + GLU and product + gated sum
    are single operators, and the traced step gives eager's logits bit for bit."""
    model, _ = build_pair(TINY)
    model = model.to(torch.bfloat16)
    ids = random_ids(1, 7)
    eager = _decode_logits(model, ids)
    names, logits = _compiled_decode(model, ids, capture_scalar_outputs=True)
    assert {"gemv_silu_mul.default", "gemv_combine.default"} <= names, sorted(names)
    assert torch.equal(logits, eager)
