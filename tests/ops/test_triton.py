"""Triton grouped-expert kernels against plain torch: the reference implementation and per-token F.linear loops.

Without CUDA the kernels run in triton's interpreter, which works only if TRITON_INTERPRET=1 was set before
triton was first imported in the process (triton builds its language library for one mode at import). Run on
its own, this module sets it before that import. In a whole-suite run triton has already been imported by
then (transformers imports it), so the kernel tests skip here and `test_kernels_in_a_child_process` runs this
module again in a fresh interpreter-mode process, whose failures it reports. Nothing is changed for other
modules of the same process.

Shapes are tiny and tiles 16 wide, so that experts span several row blocks, grouped rows end mid-block
(2 * 37 = 74 rows) and both feature sizes (40, 24) end mid-tile.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
CHILD_FLAG = "JETMOE_TRITON_TEST_CHILD"
if not CUDA and "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")
triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from jetmoe.modeling.routing import make_plan  # noqa: E402
from jetmoe.ops.triton import scattered_experts, scattered_experts_reference  # noqa: E402
from jetmoe.ops.triton.kernels import Blocks, block_table  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
SMALL = Blocks(m=16, n=16, k=16)
TOKENS, TOP_K, EXPERTS, IN, OUT = 37, 2, 4, 40, 24
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@triton.jit
def _probe(x_ptr, out_ptr):
    block = tl.zeros((16, 16), dtype=tl.float32) + tl.load(x_ptr)
    tl.store(out_ptr, tl.sum(tl.dot(block, block)))


def _kernels_run_here() -> bool:
    """True where triton kernels launch in this process: on CUDA, or on CPU if triton is in interpreter mode."""
    if CUDA or os.environ.get(CHILD_FLAG) == "1":
        return True
    out = torch.zeros(1)
    try:
        _probe[(1,)](torch.ones(1), out)
    except Exception:  # a compiled-mode triton without a GPU: no driver
        return False
    return out.item() == 16 * 256


IN_PROCESS = _kernels_run_here()


@pytest.fixture(autouse=True)
def kernels_run_here(request):
    if not IN_PROCESS and request.function is not test_kernels_in_a_child_process:
        pytest.skip("triton was imported before TRITON_INTERPRET=1 could be set: run by test_kernels_in_a_child_process")


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests run in this process")
def test_kernels_in_a_child_process():
    env = dict(os.environ, TRITON_INTERPRET="1", **{CHILD_FLAG: "1"})
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, f"child pytest failed:\n{result.stdout[-8000:]}\n{result.stderr[-2000:]}"
    assert " passed" in result.stdout, result.stdout[-2000:]


def plan_for(seed=0, unused_experts=()):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(TOKENS, EXPERTS, generator=generator)
    logits[:, list(unused_experts)] = -100.0
    return make_plan(logits.to(DEVICE), TOP_K, torch.float32)


# name -> how the rows are read and written (all with the plan's tensors)
MODES = {
    "grouped->grouped": dict(x_rows="grouped", grouped_in=True, grouped_out=True),
    "tokens->grouped (MoE up)": dict(x_rows="tokens", grouped_in=False, grouped_out=True),
    "grouped->slots": dict(x_rows="grouped", grouped_in=True, grouped_out=False, out="slots"),
    "tokens->slots (MoA map)": dict(x_rows="tokens", grouped_in=False, grouped_out=False, out="slots"),
    "slots->slots gated": dict(x_rows="slots", grouped_in=False, grouped_out=False, out="slots", gates=True),
    "grouped->reduce gated (MoE down)": dict(x_rows="grouped", grouped_in=True, grouped_out=False, reduce=True, gates=True),
    "slots->reduce gated (MoA reduce)": dict(x_rows="slots", grouped_in=False, grouped_out=False, reduce=True, gates=True),
    "tokens->reduce ungated": dict(x_rows="tokens", grouped_in=False, grouped_out=False, reduce=True),
}


def call(fn, mode, plan, x, weight, gates, **extra):
    spec = MODES[mode]
    rows_in = {"tokens": plan.sorted_tokens, "slots": plan.sorted_slots, "grouped": None}[spec["x_rows"]]
    rows_out = plan.sorted_tokens if spec.get("reduce") else plan.sorted_slots if spec.get("out") else None
    return fn(
        x, weight, rows_in, plan.expert_ends, rows_out,
        grouped_in=spec["grouped_in"], grouped_out=spec["grouped_out"],
        gates=gates if spec.get("gates") else None, out_rows=plan.num_tokens if spec.get("reduce") else None,
        **extra,
    )


def inputs(mode, plan, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    rows = TOKENS if MODES[mode]["x_rows"] == "tokens" else TOKENS * TOP_K
    x = torch.randn(rows, IN, generator=generator)
    weight = torch.randn(EXPERTS, OUT, IN, generator=generator) / IN**0.5
    gates = plan.sorted_gates.cpu().clone()
    return [t.to(DEVICE, dtype).requires_grad_() for t in (x, weight, gates)]


def fp32_leaves(tensors):
    return [t.detach().float().requires_grad_() for t in tensors]


def assert_close_rel(actual, expected, tol, what):
    scale = expected.abs().max().clamp_min(1e-6)
    error = (actual.float() - expected).abs().max() / scale
    assert error <= tol, f"{what}: max error {error.item():.3g} of max |value| exceeds {tol}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_forward_matches_reference(mode, dtype):
    plan = plan_for()
    x, weight, gates = inputs(mode, plan, dtype)
    y = call(scattered_experts, mode, plan, x, weight, gates, blocks=SMALL)
    expected = call(scattered_experts_reference, mode, plan, *fp32_leaves([x, weight, gates]))
    assert y.dtype == dtype and y.shape == expected.shape
    assert_close_rel(y, expected, TOL[dtype], mode)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mode", list(MODES))
def test_backward_matches_reference(mode, dtype):
    plan = plan_for()
    x, weight, gates = inputs(mode, plan, dtype)
    y = call(scattered_experts, mode, plan, x, weight, gates, blocks=SMALL)
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    (y.float() * upstream).sum().backward()

    leaves = fp32_leaves([x, weight, gates])
    expected = call(scattered_experts_reference, mode, plan, *leaves)
    (expected * upstream).sum().backward()
    for name, ours, ref in zip(("dX", "dW", "dGates"), (x, weight, gates), leaves):
        if ref.grad is None:  # gates unused in this mode
            assert ours.grad is None
            continue
        assert ours.grad.dtype == dtype
        assert_close_rel(ours.grad, ref.grad, TOL[dtype], f"{mode} {name}")


def per_token_loop_moe(x, w_in, w_out, plan):
    """The MoE MLP written out per token and choice with F.linear: no sorting, no plan order."""
    out = torch.zeros(x.shape[0], w_out.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for j in range(plan.top_k):
            e = plan.expert_ids[t, j]
            gate, up = F.linear(x[t].float(), w_in[e].float()).chunk(2)
            out[t] += plan.gates[t, j].float() * F.linear(F.silu(gate) * up, w_out[e].float())
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moe_mlp_calls_match_f_linear_loop(dtype):
    plan = plan_for(seed=3)
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(TOKENS, IN, generator=generator).to(DEVICE, dtype)
    w_in = (torch.randn(EXPERTS, 2 * OUT, IN, generator=generator) / IN**0.5).to(DEVICE, dtype)
    w_out = (torch.randn(EXPERTS, IN, OUT, generator=generator) / OUT**0.5).to(DEVICE, dtype)
    gates = plan.sorted_gates.to(dtype)

    h = scattered_experts(x, w_in, plan.sorted_tokens, plan.expert_ends, None, grouped_in=False, grouped_out=True,
                          blocks=SMALL)
    gate, up = h.chunk(2, dim=-1)
    y = scattered_experts(F.silu(gate) * up, w_out, None, plan.expert_ends, plan.sorted_tokens, grouped_in=True,
                          grouped_out=False, gates=gates, out_rows=TOKENS, blocks=SMALL)
    assert y.shape == (TOKENS, IN)
    assert_close_rel(y, per_token_loop_moe(x, w_in, w_out, plan), 1e-5 if dtype == torch.float32 else 3e-2, "MoE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_moa_map_and_reduce_match_f_linear_loop(dtype):
    plan = plan_for(seed=5)
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(TOKENS, IN, generator=generator).to(DEVICE, dtype)
    w_q = torch.randn(EXPERTS, OUT, IN, generator=generator).to(DEVICE, dtype)
    w_o = torch.randn(EXPERTS, IN, OUT, generator=generator).to(DEVICE, dtype)
    slot_values = torch.randn(TOKENS * TOP_K, OUT, generator=generator).to(DEVICE, dtype)
    gates = plan.sorted_gates.to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 2e-2

    queries = scattered_experts(x, w_q, plan.sorted_tokens, plan.expert_ends, plan.sorted_slots, grouped_in=False,
                                grouped_out=False, blocks=SMALL)
    reduced = scattered_experts(slot_values, w_o, plan.sorted_slots, plan.expert_ends, plan.sorted_tokens,
                                grouped_in=False, grouped_out=False, gates=gates, out_rows=TOKENS, blocks=SMALL)

    expected_q = torch.stack([
        F.linear(x[t].float(), w_q[plan.expert_ids[t, j]].float()) for t in range(TOKENS) for j in range(TOP_K)
    ])
    expected_o = torch.stack([
        sum(plan.gates[t, j].float() * F.linear(slot_values[t * TOP_K + j].float(), w_o[plan.expert_ids[t, j]].float())
            for j in range(TOP_K))
        for t in range(TOKENS)
    ])
    assert_close_rel(queries, expected_q, tol, "MoA map")
    assert_close_rel(reduced, expected_o, tol, "MoA reduce")


@pytest.mark.parametrize("mode", ["tokens->grouped (MoE up)", "slots->reduce gated (MoA reduce)"])
def test_empty_experts(mode):
    plan = plan_for(unused_experts=(0, 3))  # the first and the last expert get no rows, the others all of them
    assert plan.expert_ends.tolist() == [0, TOKENS, 2 * TOKENS, 2 * TOKENS]
    x, weight, gates = inputs(mode, plan, torch.float32)
    y = call(scattered_experts, mode, plan, x, weight, gates, blocks=SMALL)
    y.square().sum().backward()
    leaves = fp32_leaves([x, weight, gates])
    expected = call(scattered_experts_reference, mode, plan, *leaves)
    expected.square().sum().backward()
    assert_close_rel(y, expected, 1e-5, "output")
    assert_close_rel(x.grad, leaves[0].grad, 1e-5, "dX")
    assert_close_rel(weight.grad, leaves[1].grad, 1e-5, "dW")
    assert torch.count_nonzero(weight.grad[[0, 3]]) == 0


def test_default_tiles_larger_than_the_problem():
    plan = plan_for(seed=7)
    for mode in ("tokens->grouped (MoE up)", "grouped->reduce gated (MoE down)"):
        x, weight, gates = inputs(mode, plan, torch.float32)
        y = call(scattered_experts, mode, plan, x, weight, gates)
        y.sum().backward()
        leaves = fp32_leaves([x, weight, gates])
        expected = call(scattered_experts_reference, mode, plan, *leaves)
        expected.sum().backward()
        assert_close_rel(y, expected, 1e-5, mode)
        for ours, ref in zip((x, weight), leaves):
            assert_close_rel(ours.grad, ref.grad, 1e-5, mode)


def test_strided_inputs():
    """Rows and weights are addressed through strides: views need no copy."""
    plan = plan_for(seed=8)
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(TOKENS, 2 * IN, generator=generator).to(DEVICE)[:, ::2]  # row stride 2*IN, column stride 2
    weight = torch.randn(EXPERTS, IN, OUT, generator=generator).to(DEVICE).transpose(1, 2)  # [E, OUT, IN] view
    assert not x.is_contiguous() and not weight.is_contiguous()
    x.requires_grad_()
    weight.requires_grad_()
    y = scattered_experts(x, weight, plan.sorted_tokens, plan.expert_ends, plan.sorted_slots, grouped_in=False,
                          grouped_out=False, blocks=SMALL)
    y.square().sum().backward()
    leaves = fp32_leaves([x, weight])
    expected = scattered_experts_reference(leaves[0], leaves[1], plan.sorted_tokens, plan.expert_ends,
                                           plan.sorted_slots, grouped_in=False, grouped_out=False)
    expected.square().sum().backward()
    assert_close_rel(y, expected, 1e-5, "output")
    assert_close_rel(x.grad, leaves[0].grad, 1e-5, "dX")
    assert_close_rel(weight.grad, leaves[1].grad, 1e-5, "dW")


def test_reduce_is_deterministic():
    plan = plan_for(seed=10)
    mode = "slots->reduce gated (MoA reduce)"
    results = []
    for _ in range(2):
        x, weight, gates = inputs(mode, plan, torch.float32)
        y = call(scattered_experts, mode, plan, x, weight, gates, blocks=SMALL)
        y.square().sum().backward()
        results.append([y.detach(), x.grad, weight.grad, gates.grad])
    for first, second in zip(*results):
        assert torch.equal(first, second)


@pytest.mark.parametrize("ends", [[0, 5, 5, 40, 74], [74, 74, 74, 74, 74], [1, 2, 3, 4, 74], [0, 0, 0, 0, 0]])
def test_block_table_gives_each_row_to_one_block_of_its_expert(ends):
    block_m = 16
    expert_ends = torch.tensor(ends, dtype=torch.int32)
    table = block_table(expert_ends, ends[-1], block_m)
    assert table.shape == (3, -(-ends[-1] // block_m) + len(ends))
    starts = [0] + ends[:-1]
    owner = torch.full((ends[-1],), -1)
    for expert, first, end in table.t().tolist():
        if first == end:
            continue  # spare program
        assert 0 < end - first <= block_m and starts[expert] <= first and end <= ends[expert]
        assert (owner[first:end] == -1).all()
        owner[first:end] = expert
    expected_owner = torch.repeat_interleave(torch.arange(len(ends)), torch.tensor(ends) - torch.tensor(starts))
    assert torch.equal(owner, expected_owner)


def test_bad_input_raises_clear_errors():
    plan = plan_for()
    x = torch.randn(TOKENS, IN, device=DEVICE)
    weight = torch.randn(EXPERTS, OUT, IN, device=DEVICE)
    ends, tokens = plan.expert_ends, plan.sorted_tokens

    def run(**overrides):
        args = dict(x=x, weight=weight, sorted_rows_in=tokens, expert_ends=ends, sorted_rows_out=None,
                    grouped_in=False, grouped_out=True)
        args.update(overrides)
        return scattered_experts(**args)

    with pytest.raises(ValueError, match="features"):
        run(weight=torch.randn(EXPERTS, OUT, IN + 1, device=DEVICE))
    with pytest.raises(ValueError, match="share one of"):
        run(weight=weight.double())
    with pytest.raises(ValueError, match="sorted_rows_in is required"):
        run(sorted_rows_in=None)
    with pytest.raises(ValueError, match="1-D integer"):
        run(sorted_rows_in=tokens.float())
    with pytest.raises(ValueError, match="not a multiple"):
        run(sorted_rows_in=tokens[:-1])
    with pytest.raises(ValueError, match="expert_ends"):
        run(expert_ends=ends[:-1])
    with pytest.raises(ValueError, match="sorted_rows_out has"):
        run(grouped_out=False, sorted_rows_out=tokens[:-2])
    with pytest.raises(ValueError, match="needs grouped_out=False"):
        run(out_rows=TOKENS)
    with pytest.raises(ValueError, match="divide"):
        run(grouped_out=False, sorted_rows_out=tokens, out_rows=TOKENS + 1)
    with pytest.raises(ValueError, match="gates must be"):
        run(gates=torch.ones(TOKENS, device=DEVICE))
