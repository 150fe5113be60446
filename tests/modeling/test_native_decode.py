"""A decoder layer for a few bf16 or fp32 tokens in two C calls (modeling/backends/cpu_decode.py, ops/native/decode.c): the
operator path's values bit for bit, the operator path wherever a router's choice hangs on a tie, and only
where the operator path would take its few-token plan."""

from __future__ import annotations

import pytest
import torch
from oracle_pair import TINY, build_pair, padding_mask, random_ids

from jetmoe.generation.quantize import quantize_model
from jetmoe.modeling.backends import cpu_decode as native_decode
from jetmoe.modeling.cache import JetMoeCache
from jetmoe.modeling.routing import experts_per_token, make_plan
from jetmoe.ops import native
from jetmoe.ops.native import decode as kernels

pytestmark = pytest.mark.skipif(not native.available(), reason="jetmoe's C kernels do not build here")

# The kernels' widths: H and D multiples of 32, 2I of 64. K3: top-3 of 6 (a 3-term softmax and sum).
NATIVE = dict(TINY, hidden_size=64, kv_channels=32, intermediate_size=64)
NATIVE_K3 = dict(NATIVE, num_local_experts=6, num_experts_per_tok=3)


def _model(geometry=NATIVE, seed=0, dtype=torch.bfloat16):
    model, _ = build_pair(geometry, seed=seed)
    return model.to(dtype)


class _Calls:
    """Counts the C calls per layer (those of `run_layers` per layer they run), and the ones that left the
    routing to the operator path."""

    def __init__(self, monkeypatch):
        self.taken = {"in": 0, "out": 0}
        self.undecided = {"in": 0, "out": 0}
        attention_in, attention_out = kernels.attention_in, kernels.attention_out

        def counted_in(*args):
            result = attention_in(*args)
            self.taken["in"] += 1
            self.undecided["in"] += result is None
            return result

        def counted_out(*args):
            result = attention_out(*args)
            self.taken["out"] += 1
            self.undecided["out"] += result[2] is None
            return result

        def counted_layers(operands, first, *args):  # all layers of a decoding step in one call
            status, stopped = run_layers(operands, first, *args)
            ran = stopped - first + (status == 2)  # layers whose attention_in decided (status 1: it did not)
            self.stacked += ran
            self.taken["in"] += ran
            self.taken["out"] += ran
            self.undecided["out"] += status == 2
            return status, stopped

        run_layers = kernels.run_layers
        self.stacked = 0
        monkeypatch.setattr(kernels, "attention_in", counted_in)
        monkeypatch.setattr(kernels, "attention_out", counted_out)
        monkeypatch.setattr(kernels, "run_layers", counted_layers)


def _greedy(model, ids, attention_mask=None, new_tokens=12):
    with torch.no_grad():
        out = model.generate(
            ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences, torch.stack(out.logits)


def _operator_path(monkeypatch):
    """Every layer through its modules: neither the per-layer C calls nor the one call for all layers."""
    monkeypatch.setattr(native_decode, "applicable", lambda *args: None)
    monkeypatch.setattr(native_decode, "layers_forward", lambda *args: None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("geometry", [NATIVE, NATIVE_K3], ids=["top2", "top3"])
@pytest.mark.parametrize("batch", [1, 2, 5, 8])
def test_greedy_decoding_is_the_operator_paths_bit_for_bit(monkeypatch, geometry, batch, dtype):
    """Few-token plans (batch 1, 2) and sorted plans (up to 16 slots) on the operator path."""
    model = _model(geometry, dtype=dtype)
    ids = random_ids(batch, 9)
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids)
    if batch * geometry["num_experts_per_tok"] <= native_decode.MAX_SLOTS:  # every layer of the 11 decode steps
        assert calls.taken["in"] == 11 * geometry["num_hidden_layers"]
        assert calls.stacked > 0  # through run_layers: generate()'s cache (modeling/cache.py) takes the C writes
        assert calls.taken["out"] == calls.taken["in"] - calls.undecided["in"]  # a tie: that layer's operator path
    else:
        assert calls.taken["in"] == 0
    monkeypatch.undo()
    _operator_path(monkeypatch)
    expected_sequences, expected_logits = _greedy(model, ids)
    assert torch.equal(sequences, expected_sequences)
    assert torch.equal(logits, expected_logits)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("batch", [1, 4])
def test_int8_decoding_is_the_operator_paths_bit_for_bit(monkeypatch, batch, dtype):
    """int8 projections (generation/quantize.py) go through the same int8 kernel on both paths."""
    model = _model(dtype=dtype)
    quantize_model(model)
    ids = random_ids(batch, 9)
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids)
    assert calls.taken["in"] == 11 * NATIVE["num_hidden_layers"]
    monkeypatch.undo()
    _operator_path(monkeypatch)
    expected_sequences, expected_logits = _greedy(model, ids)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)


def test_left_padded_batch_is_the_operator_paths_bit_for_bit(monkeypatch):
    """Rows of different lengths: the padding mask reaches attention as the operator path's."""
    model = _model()
    ids = random_ids(2, 10)
    mask = padding_mask([10, 6], 10, "left")
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids, mask)
    assert calls.taken["in"] > 0
    monkeypatch.undo()
    _operator_path(monkeypatch)
    expected_sequences, expected_logits = _greedy(model, ids, mask)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)


@pytest.mark.parametrize("layer", [0, -1])
@pytest.mark.parametrize("router", ["self_attention.experts.router", "mlp.router"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_a_tied_router_leaves_the_choice_to_the_operator_path(monkeypatch, router, layer, dtype):
    """All-zero router weights tie every logit: PyTorch's topk decides, so the C calls hand that part back (and
    the one call for all layers stops at that layer, then resumes after it)."""
    model = _model(dtype=dtype)
    with torch.no_grad():
        model.model.layers[layer].get_submodule(router).layer.weight.zero_()
    ids = random_ids(1, 9)
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids)
    side = "in" if router.startswith("self_attention") else "out"
    assert calls.undecided[side] == 11  # that layer of each decode step
    assert calls.undecided["in" if side == "out" else "out"] == 0
    monkeypatch.undo()
    _operator_path(monkeypatch)
    expected_sequences, expected_logits = _greedy(model, ids)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)


def test_tied_choices_after_the_first_two_go_to_the_operator_path(monkeypatch):
    """Top-3: two experts with the same router row always tie. Where they meet after the first choice, their
    order would decide the order of the gated sum's additions, so that layer's routing is PyTorch's."""
    model = _model(NATIVE_K3)
    with torch.no_grad():
        for layer in model.model.layers:
            for router in (layer.self_attention.experts.router, layer.mlp.router):
                router.layer.weight[2] = router.layer.weight[1]
    ids = random_ids(1, 9)
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids)
    assert calls.undecided["in"] + calls.undecided["out"] > 0
    assert calls.taken["out"] - calls.undecided["out"] > 0  # and the C path ran where there was no such tie
    monkeypatch.undo()
    _operator_path(monkeypatch)
    expected_sequences, expected_logits = _greedy(model, ids)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_router_gates_are_pytorchs_softmax(seed, dtype):
    """Many random tokens through the attention router: logits, choices and gates as TopKRouter gives them
    (rounded to bf16, or fp32 as computed)."""
    model = _model(NATIVE_K3, seed=seed, dtype=dtype)
    layer = model.model.layers[0]
    attention = layer.self_attention
    generator = torch.Generator().manual_seed(seed)
    cos = torch.ones(1, 1, attention.head_dim, dtype=dtype)
    for _ in range(64):
        x = (3 * torch.randn(1, 1, NATIVE_K3["hidden_size"], generator=generator)).to(dtype)
        with torch.no_grad():
            plan = attention.experts.router(layer.input_layernorm(x).view(1, -1))
        routed = kernels.attention_in(
            x, layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon,
            attention.experts.router.layer.weight, attention.top_k, (attention.experts.input_linear.weight, None),
            (attention.kv_proj.weight, None), cos, torch.zeros_like(cos),
        )  # fmt: skip
        if routed is None:  # a tie at the cut: nothing to compare
            continue
        logits, chosen, gates = routed[:3]
        assert torch.equal(logits, plan.router_logits)
        assert torch.equal(chosen, plan.expert_ids)
        assert torch.equal(gates, plan.gates)


def _undecided(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Rows whose top-k PyTorch decides by its own tie-breaking (a tie at the cut, or among choices after the
    first two), or that hold a non-finite logit."""
    ordered = logits.sort(dim=-1, descending=True).values
    cut_tie = (ordered[:, k - 1] == ordered[:, k]) if k < logits.shape[1] else torch.zeros(len(logits), dtype=torch.bool)
    inner_tie = torch.zeros_like(cut_tie)
    for j in range(2, k):
        inner_tie |= (ordered[:, j - 1] == ordered[:, j]) | (ordered[:, j] == ordered[:, j + 1] if j + 1 < logits.shape[1] else False)
    return cut_tie | inner_tie | ~torch.isfinite(logits).all(-1)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_the_c_routing_is_make_plans_routing(k, dtype):
    """Routing is defined once: the C steps' choice of experts and their gates equal routing.make_plan's, row
    by row, and the C steps decline exactly the rows whose choice rests on PyTorch's tie-breaking or a
    non-finite logit."""
    generator = torch.Generator().manual_seed(k)
    logits = torch.randn(4096, 8, generator=generator).to(torch.bfloat16).float()  # bf16 values: many ties
    logits[::97, 3] = logits[::97, 5]
    logits[::89, 0] = float("inf")
    logits[::83, 1] = float("nan")
    undecided = _undecided(logits, k)
    assert 0 < int(undecided.sum()) < len(logits)
    for row in range(len(logits)):
        one = logits[row : row + 1]
        routed = kernels.route(one, k, dtype)
        assert (routed is None) == bool(undecided[row]), (row, one)
        if routed is not None:
            plan = make_plan(one, k, dtype)
            assert torch.equal(_first_tie_sorted(one, routed[0]), _first_tie_sorted(one, plan.expert_ids)), row
            assert torch.equal(routed[1], plan.gates), row
    decided = logits[~undecided]
    chosen, gates = kernels.route(decided, k, dtype)  # many rows in one call
    plan = make_plan(decided, k, dtype)
    assert torch.equal(_first_tie_sorted(decided, chosen), _first_tie_sorted(decided, plan.expert_ids))
    assert torch.equal(gates, plan.gates)


def _first_tie_sorted(logits: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """The choices with the first two in index order where their logits tie: either order gives two equal gates
    and the same (commutative) sum of two terms, so the C steps may take either."""
    if chosen.shape[1] < 2:
        return chosen
    picked = logits.gather(1, chosen[:, :2])
    tie = picked[:, 0] == picked[:, 1]
    out = chosen.clone()
    out[tie, :2] = chosen[tie, :2].sort(dim=1).values
    return out


def test_routing_from_the_routers_top_k():
    """Top-k has one source: the config, held by the routers; the attention reads its router's."""
    model = _model(NATIVE_K3)
    for layer in model.model.layers:
        assert layer.self_attention.top_k == layer.self_attention.experts.router.top_k == 3
        assert layer.mlp.router.top_k == 3
    assert model.experts_per_token() == 3
    assert experts_per_token(model.model.layers[1]) == 3  # what a pipeline stage and the trainer read
    with pytest.raises(ValueError, match="holds no router, so it has no experts per token"):
        experts_per_token(model.model.embed_tokens)


@pytest.mark.parametrize("k", [1, 2, 3, 8])
@pytest.mark.parametrize("values", ["bf16", "fp32"])
def test_the_routers_softmax_is_pytorchs_bit_for_bit(k, values):
    """The gates before their rounding to bf16 (after it, an ulp of fp32 almost never shows; an fp32 model keeps
    them as they are): 2^18 rows of bf16-valued or fp32 logits, top k of them in descending order, as the
    routers see them."""
    logits = torch.randn(1 << 18, 8, generator=torch.Generator().manual_seed(k))
    if values == "bf16":
        logits = logits.to(torch.bfloat16).float()
    top = logits.topk(k, dim=-1).values
    assert torch.equal(kernels.softmax_sorted(top), torch.softmax(top, dim=-1))


def test_the_routers_softmax_leaves_an_unknown_summation_order_to_the_caller():
    """Where PyTorch's vector width is unknown (or implausible), more than 3 gates are not computed in C."""
    library = kernels._library()
    top = torch.tensor([[3.0, 2.0, 1.0, 0.5]])
    try:
        for lanes in (0, 1000):
            library.jetmoe_set_aten_lanes(lanes)
            with pytest.raises(ValueError, match="order of summing 4 values is not known"):
                kernels.softmax_sorted(top)
            assert torch.equal(kernels.softmax_sorted(top[:, :3]), torch.softmax(top[:, :3], dim=-1))
    finally:
        library.jetmoe_set_aten_lanes(kernels._ATEN_FLOAT_LANES.get(torch.backends.cpu.get_cpu_capability(), 0))


def test_applicable_only_where_the_operator_path_takes_a_few_token_plan_in_the_layers_dtype():
    model = _model()
    layer = model.model.layers[0]
    one = torch.randn(1, 1, NATIVE["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        assert native_decode.applicable(layer, one, output_attentions=False)
        assert not native_decode.applicable(layer, one, output_attentions=True)  # probabilities: the operator path
        assert not native_decode.applicable(layer, one.float(), output_attentions=False)
        eight = one.expand(1, native_decode.MAX_TOKENS, -1)
        assert native_decode.applicable(layer, eight, output_attentions=False)
        nine = one.expand(1, native_decode.MAX_TOKENS + 1, -1)  # a prompt: the operator path's other kernels
        assert not native_decode.applicable(layer, nine, output_attentions=False)
        assert not native_decode.applicable(layer, one[:, :0], output_attentions=False)  # no tokens
    assert not native_decode.applicable(layer, one, output_attentions=False)  # autograd on
    with torch.no_grad():
        assert native_decode.applicable(_model().float().model.layers[0], one.float(), output_attentions=False)
        assert not native_decode.applicable(_model().float().model.layers[0], one, output_attentions=False)
        assert not native_decode.applicable(_model().half().model.layers[0], one.half(), output_attentions=False)
        # what a layer was prepared with is rebuilt when its modules are replaced or change dtype
        changed = _model()
        assert native_decode.applicable(changed.model.layers[0], one, output_attentions=False)
        changed.float()
        assert not native_decode.applicable(changed.model.layers[0], one, output_attentions=False)
        changed.to(torch.bfloat16)
        assert native_decode.applicable(changed.model.layers[0], one, output_attentions=False)
        quantize_model(changed)  # int8 projections: taken, with their scales
        prepared = native_decode.applicable(changed.model.layers[0], one, output_attentions=False)
        assert prepared and all(scale is not None for _, scale in prepared.operands[2:5] + prepared.operands[7:])
        changed.model.layers[0].self_attention.kv_proj = torch.nn.Linear(NATIVE["hidden_size"], 128, bias=False)
        assert not native_decode.applicable(changed.model.layers[0], one, output_attentions=False)  # not ours


def test_bad_shapes_are_rejected_with_the_problem_named():
    model = _model()
    layer = model.model.layers[0]
    attention = layer.self_attention
    x = torch.randn(1, 1, NATIVE["hidden_size"], dtype=torch.bfloat16)
    cos = torch.ones(1, 1, attention.head_dim, dtype=torch.bfloat16)
    args = (
        layer.input_layernorm.weight, 1e-6, attention.experts.router.layer.weight, attention.top_k,
        (attention.experts.input_linear.weight, None), (attention.kv_proj.weight, None),
    )  # fmt: skip
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        kernels.attention_in(x.float(), *args, cos, cos)  # fp32 activations, bf16 weights
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        kernels.attention_in(x.half(), *(a.half() if isinstance(a, torch.Tensor) else a for a in args[:3]),
                             *args[3:], cos.half(), cos.half())  # fmt: skip
    with pytest.raises(ValueError, match="attention_in"):
        kernels.attention_in(x, *args, cos[..., :16], cos[..., :16])
    with pytest.raises(ValueError, match="slots"):
        kernels.attention_in(x.expand(1, 9, -1).contiguous(), *args, cos.expand(1, 9, -1), cos.expand(1, 9, -1))
    mlp, moa = layer.mlp, attention.experts
    attended = torch.zeros(2, attention.num_key_value_heads * attention.head_dim, dtype=torch.bfloat16)
    chosen, gates = torch.zeros(1, 2, dtype=torch.int64), torch.ones(1, 2, dtype=torch.bfloat16)
    out_args = (
        (moa.output_linear.weight, None), chosen, gates, moa.bias, layer.post_attention_layernorm.weight, 1e-6,
        mlp.router.layer.weight, (mlp.input_linear.weight, None), (mlp.output_linear.weight, None), mlp.bias,
    )  # fmt: skip
    with pytest.raises(ValueError, match="attention_out"):
        kernels.attention_out(x.view(1, -1), attended[:1], *out_args)
    with pytest.raises(ValueError, match="attention_out"):
        kernels.attention_out(x.view(1, -1), attended, *out_args[:1], chosen.int(), *out_args[2:])
    with pytest.raises(ValueError, match="outside"):
        kernels.attention_out(x.view(1, -1), attended, *out_args[:1], chosen + NATIVE["num_local_experts"], *out_args[2:])
    with pytest.raises(ValueError, match="all bf16 or all fp32"):
        kernels.attention_out(x.view(1, -1).float(), attended.float(), *out_args[:2], gates.float(), *out_args[3:])


def test_hooks_on_a_layer_run_with_the_layers_called_one_by_one(monkeypatch):
    """A forward hook on a decoder layer sees every decoding call: the one call for all layers steps aside."""
    model = _model()
    ids = random_ids(1, 9)
    seen = []
    handle = model.model.layers[1].register_forward_hook(lambda module, args, output: seen.append(output[0].shape))
    calls = _Calls(monkeypatch)
    sequences, logits = _greedy(model, ids)
    handle.remove()
    assert len(seen) == 12 and calls.stacked == 0  # the prompt and 11 decode steps
    assert calls.taken["in"] == 11 * NATIVE["num_hidden_layers"]  # still each layer's two C calls
    expected_sequences, expected_logits = _greedy(model, ids)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)


def _stack_inputs(model, batch=1, capacity=16):
    """run_layers' inputs for `model`'s layers over fresh caches of `capacity` positions, 4 of them filled."""
    layers = model.model.layers
    x = torch.zeros(batch, 1, NATIVE["hidden_size"], dtype=torch.bfloat16)
    attention = layers[0].self_attention
    shape = (batch, attention.num_key_value_heads, capacity, attention.head_dim)
    buffers = [(torch.randn(shape).to(torch.bfloat16), torch.randn(shape).to(torch.bfloat16)) for _ in layers]
    with torch.no_grad():
        prepared = [native_decode.applicable(layer, x, False) for layer in layers]
        stack = native_decode._stack(layers, prepared, [(k, v, None, 5) for k, v in buffers])
    return stack, buffers


def test_run_layers_rejects_bad_input_with_the_problem_named():
    model = _model()
    stack, _ = _stack_inputs(model)
    hidden, experts, count = NATIVE["hidden_size"], NATIVE["num_local_experts"], NATIVE["num_hidden_layers"]
    x, out = torch.randn(1, hidden).to(torch.bfloat16), torch.empty(1, hidden, dtype=torch.bfloat16)
    cos = torch.ones(1, 1, stack.sizes.head_dim, dtype=torch.bfloat16)
    logits = torch.empty(count, 1, experts)
    where = torch.tensor([4])

    def run(**changes):
        args = dict(x=x, cos=cos, sin=cos, mask=None, positions=5, new_positions=where, moa_logits=logits,
                    moe_logits=logits.clone(), out=out)  # fmt: skip
        args.update(changes)
        return kernels.run_layers(stack.operands, 0, stack.sizes, **args)

    assert run() == (0, count)
    with pytest.raises(ValueError, match="decode layers"):
        run(x=x.float())
    with pytest.raises(ValueError, match="decode layers"):
        run(moa_logits=logits[:1])
    with pytest.raises(ValueError, match="decode layers"):
        run(mask=torch.ones(1, 1, 1, 4, dtype=torch.bool))  # not the positions attended over
    with pytest.raises(ValueError, match="outside 0..4"):
        run(new_positions=torch.tensor([5]))
    with pytest.raises(ValueError, match="decode layers"):
        run(new_positions=torch.tensor([4], dtype=torch.int32))
    norm, head = model.model.norm.weight, model.lm_head.weight
    vocab = head.shape[0]
    final = kernels.head_operands(norm, 1e-6, (head, None), hidden)
    assert run(head=final, logits=torch.empty(1, vocab, dtype=torch.bfloat16)) == (0, count)
    with pytest.raises(ValueError, match="decode layers"):
        run(head=final, logits=torch.empty(1, vocab + 1, dtype=torch.bfloat16))  # not [B, V]
    with pytest.raises(ValueError, match="decode layers"):
        run(head=final)  # no logits to write
    with pytest.raises(ValueError, match="decode layers"):  # made for fp32 activations
        run(head=kernels.head_operands(norm.float(), 1e-6, (head.float(), None), hidden),
            logits=torch.empty(1, vocab, dtype=torch.bfloat16))  # fmt: skip
    with pytest.raises(ValueError, match="decode head"):  # not [V, H]
        kernels.head_operands(norm, 1e-6, (torch.zeros(vocab, hidden + 32, dtype=torch.bfloat16), None), hidden)
    layer = model.model.layers[0]
    with torch.no_grad():
        prepared = native_decode.applicable(layer, x.view(1, 1, -1), False)
    keys = torch.zeros(1, layer.self_attention.num_key_value_heads, 8, layer.self_attention.head_dim)
    with pytest.raises(ValueError, match="decode layers"):  # fp32 caches for bf16 weights
        kernels.layer_operands(native_decode._weights(prepared), (1e-6, 1e-6), 1.0, keys, keys, stack.sizes)
    with pytest.raises(ValueError, match="decode layers"):  # sizes not the layer's
        kernels.layer_operands(
            native_decode._weights(prepared), (1e-6, 1e-6), 1.0, keys.bfloat16(), keys.bfloat16(),
            stack.sizes._replace(inner=2 * stack.sizes.inner),
        )  # fmt: skip


def test_run_layers_writes_each_layers_new_row_and_matches_the_layers():
    """One call for both layers against calling each layer's forward on the same caches (SlotKVCache-like
    buffers with room at position 4 of 5): same output, same cache rows, same router logits."""
    model = _model()
    stack, buffers = _stack_inputs(model, batch=2)
    layers = model.model.layers
    x = torch.randn(2, 1, NATIVE["hidden_size"]).to(torch.bfloat16)
    cos, sin = torch.randn(2, 1, stack.sizes.head_dim).to(torch.bfloat16), torch.randn(2, 1, stack.sizes.head_dim)
    sin = sin.to(torch.bfloat16)
    where = torch.tensor([4, 4])
    count, experts = len(layers), NATIVE["num_local_experts"]
    moa, moe, out = torch.empty(count, 2, experts), torch.empty(count, 2, experts), torch.empty(2, x.shape[-1])
    out = out.to(torch.bfloat16)
    expected_buffers = [(k.clone(), v.clone()) for k, v in buffers]
    status, stopped = kernels.run_layers(stack.operands, 0, stack.sizes, x.view(2, -1), cos, sin, None, 5, where,
                                         moa, moe, out)  # fmt: skip
    assert (status, stopped) == (0, count)

    class Buffers:  # the cache protocol the layers' own forward uses for these buffers
        def decode_buffers(self, index):
            keys, values = expected_buffers[index]
            return keys, values, where, 5

        def decode_written(self, index):
            pass

    h = x
    with torch.no_grad():
        for index, layer in enumerate(layers):
            h, _, (moa_logits, moe_logits) = layer(h, (cos, sin), attention_mask=None, cache=Buffers())
            assert torch.equal(moa[index], moa_logits) and torch.equal(moe[index], moe_logits)
    assert torch.equal(out, h.view(2, -1))
    for (keys, values), (expected_keys, expected_values) in zip(buffers, expected_buffers):
        assert torch.equal(keys, expected_keys) and torch.equal(values, expected_values)


def test_the_layer_stack_follows_weights_that_moved():
    """`.float()` then `.bfloat16()` keeps the Parameter objects but gives them new storage: the cached structs
    of the one call for all layers must be rebuilt with the new addresses."""
    model = _model()
    stack, buffers = _stack_inputs(model)
    layers = model.model.layers
    old_storage = [parameter.data for parameter in model.parameters()]  # kept alive: new storage lands elsewhere
    model.float().to(torch.bfloat16)
    x = torch.zeros(1, 1, NATIVE["hidden_size"], dtype=torch.bfloat16)
    with torch.no_grad():
        prepared = [native_decode.applicable(layer, x, False) for layer in layers]
        again = native_decode._stack(layers, prepared, [(k, v, None, 5) for k, v in buffers])
    assert again is not stack
    for operands, layer, old in zip(again.operands, layers, old_storage):
        assert operands.input_norm == layer.input_layernorm.weight.data_ptr() != old.data_ptr()
        assert operands.w2 == layer.mlp.output_linear.weight.data_ptr()
    with torch.no_grad():  # and unchanged inputs reuse it
        assert native_decode._stack(layers, prepared, [(k, v, None, 5) for k, v in buffers]) is again


def test_a_decoding_forward_returns_the_layers_router_logits(monkeypatch):
    """A decoding step through the one call for all layers, asked for router logits: the layers' own, in order
    (MoA then MoE per layer), and the same logits."""
    model = _model()
    ids = random_ids(2, 7)
    calls = _Calls(monkeypatch)

    def step():
        cache = JetMoeCache(config=model.config)
        with torch.no_grad():
            model(ids, past_key_values=cache)
            return model(random_ids(2, 1, seed=9), past_key_values=cache, output_router_logits=True)

    stacked = step()
    assert calls.stacked == NATIVE["num_hidden_layers"]
    monkeypatch.setattr(native_decode, "layers_forward", lambda *args: None)
    one_by_one = step()
    assert torch.equal(stacked.logits, one_by_one.logits)
    assert len(stacked.router_logits) == len(one_by_one.router_logits) == 2 * NATIVE["num_hidden_layers"]
    assert all(torch.equal(a, b) for a, b in zip(stacked.router_logits, one_by_one.router_logits))


def _decode_step(model, batch=2, use_decode_logits=True):
    """Prefill 7 tokens a row into the model's own cache, then one decoding step: decode_logits' logits [B, V]
    (None where it declines), or forward's for the last position."""
    cache = JetMoeCache(config=model.config)
    ids, new = random_ids(batch, 7), random_ids(batch, 1, seed=9)
    with torch.no_grad():
        model(ids, past_key_values=cache)
        if not use_decode_logits:
            return model(new, past_key_values=cache).logits[:, -1]
        positions = torch.full((batch, 1), 7)
        mask = torch.ones(batch, 1, 1, 8, dtype=torch.bool)
        return model.decode_logits(new, positions, mask, cache)


@pytest.mark.parametrize("quantized", [False, True], ids=["float", "int8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_decode_logits_are_the_operator_paths_with_the_head_in_the_c_call(monkeypatch, dtype, quantized):
    """The engine's step: every layer, the final norm and the output head (float or int8) in one C call, the
    logits of the layers' and modules' own forward bit for bit."""
    model = _model(dtype=dtype)
    if quantized:
        quantize_model(model)
    heads = []
    run_layers = kernels.run_layers

    def recorded(*args):
        heads.append(args[12] is not None and bool(args[12].w))  # the head's weights went into the call
        return run_layers(*args)

    monkeypatch.setattr(kernels, "run_layers", recorded)
    logits = _decode_step(model)
    assert heads == [True] and logits.shape == (2, NATIVE["vocab_size"]) and logits.dtype == dtype
    monkeypatch.undo()
    _operator_path(monkeypatch)
    assert torch.equal(logits, _decode_step(model, use_decode_logits=False))


@pytest.mark.parametrize("router", ["self_attention.experts.router", "mlp.router"])
def test_decode_logits_apply_the_head_after_a_last_layer_the_operator_path_routed(monkeypatch, router):
    """Where the last layer's routing is the operator path's, the one call stops before it: the norm and head
    then run as modules, with the same values."""
    model = _model()
    with torch.no_grad():
        model.model.layers[-1].get_submodule(router).layer.weight.zero_()  # every logit tied
    logits = _decode_step(model)
    _operator_path(monkeypatch)
    assert torch.equal(logits, _decode_step(model, use_decode_logits=False))


def test_decode_logits_run_a_head_the_c_call_does_not_take_as_a_module(monkeypatch):
    """A head with a bias (not the model's own kind of head) is called as a module on the normed output."""
    model = _model()
    vocab, hidden = model.lm_head.weight.shape
    head = torch.nn.Linear(hidden, vocab, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.normal_()
    model.lm_head = head
    logits = _decode_step(model)
    _operator_path(monkeypatch)
    assert torch.equal(logits, _decode_step(model, use_decode_logits=False))


def test_decode_logits_decline_where_forward_must_run():
    """With autograd recording, or a hook that only the module's own call would run, decode_logits returns None
    (and writes nothing): the caller runs forward."""
    model = _model()
    cache = JetMoeCache(config=model.config)
    new, positions = random_ids(1, 1), torch.zeros(1, 1, dtype=torch.long)
    mask = torch.ones(1, 1, 1, 1, dtype=torch.bool)
    assert model.decode_logits(new, positions, mask, cache) is None  # grad mode on
    handle = model.model.norm.register_forward_hook(lambda *args: None)
    try:
        assert _decode_step(model) is None
    finally:
        handle.remove()
    assert _decode_step(model) is not None


def test_decode_logits_follow_a_norm_and_head_that_moved():
    """`.float()` then `.bfloat16()` gives the norm and head new storage: the cached head operands are rebuilt
    with the new addresses (and give the same logits)."""
    model = _model()
    before = _decode_step(model)
    old_storage = [parameter.data for parameter in model.parameters()]  # kept alive: new storage lands elsewhere
    model.float().to(torch.bfloat16)
    assert torch.equal(_decode_step(model), before)
    operands = native_decode._cache_get(model.model.norm, "_native_decode_head")[-1]
    assert operands.norm == model.model.norm.weight.data_ptr() and operands.w == model.lm_head.weight.data_ptr()
    assert all(operands.w != old.data_ptr() for old in old_storage)


def test_a_model_that_decoded_through_the_c_calls_copies_and_pickles():
    """The C calls' cached inputs (addresses, guards) stay with the original: deepcopy and pickle work after
    decoding (ctypes structs cannot be pickled), and the copy decodes the same logits through its own."""
    import copy
    import pickle

    model = _model()
    with torch.no_grad():  # the per-layer calls too
        model(random_ids(1, 1))
    logits = _decode_step(model)
    twin = copy.deepcopy(model)
    assert native_decode._cache_get(twin.model.layers, "_native_decode_stack") is None
    assert torch.equal(_decode_step(twin), logits)
    assert native_decode._cache_get(twin.model.norm, "_native_decode_head")[-1].w == twin.lm_head.weight.data_ptr()
    assert torch.equal(_decode_step(pickle.loads(pickle.dumps(model))), logits)
