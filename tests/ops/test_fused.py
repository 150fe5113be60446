"""ops/fused: the fused element-wise kernels against their PyTorch op chains, forward and backward, and the
model with every fused path forced on against the oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from oracle_pair import ATOL, GRAD_ATOL, TINY, assert_close, build_pair, random_ids

from jetmoe.ops import fused, native
from jetmoe.ops.cross_entropy import summed_cross_entropy, summed_cross_entropy_reference
from jetmoe.ops.native import elementwise

requires_native = pytest.mark.skipif(native.load() is None, reason="no C compiler or no AVX-512 VNNI/BF16 here")
DTYPES = [torch.float32, torch.bfloat16]


def _ulps(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """|got - want| in units of want's last place (per element)."""
    spacing = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(torch.finfo(want.dtype).tiny)
    return (got.float() - want.float()).abs() / spacing


def _autograd(fn, *inputs, grad):
    """fn(*inputs) and the gradients of its float inputs for the output gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*leaves)
    out.backward(grad)
    return out.detach(), [t.grad for t in leaves if t.is_floating_point()]


@pytest.fixture
def chains_only(monkeypatch):
    """A switch to the op chains (what runs where the kernels cannot)."""
    return lambda: monkeypatch.setattr(elementwise, "fused_ok", lambda *tensors: False)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_chain_forward_and_backward(dtype):
    torch.manual_seed(0)
    x = (3 * torch.randn(3, 100, 1024)).to(dtype)
    weight = (1 + 0.2 * torch.randn(1024)).to(dtype)
    grad = torch.randn(3, 100, 1024).to(dtype)
    want = fused.rms_norm_reference(x, weight, 1e-6)

    with torch.no_grad():
        got = fused.rms_norm(x, weight, 1e-6)
    # The kernel sums the squares in PyTorch's order (its CPU cascade sum): the same fp32 scale, so the
    # same output bit for bit. (Should PyTorch change its order, this fails: the kernel would then be off by
    # a unit in the last place of the scale at most.)
    assert torch.equal(got, want)

    out, (grad_x, grad_w) = _autograd(lambda a, w: fused.rms_norm(a, w, 1e-6), x, weight, grad=grad)
    _, (want_x, want_w) = _autograd(lambda a, w: fused.rms_norm_reference(a, w, 1e-6), x, weight, grad=grad)
    assert torch.equal(out, got)  # the training forward is the same kernel
    # bf16: sums of hundreds of products, rounded differently (a unit in the last place of the largest)
    for got_grad, want_grad in ((grad_x, want_x), (grad_w, want_w)):
        scale = want_grad.float().abs().max().item()
        tol = dict(rtol=2e-2, atol=1e-2 * scale) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6 * scale)
        torch.testing.assert_close(got_grad, want_grad, **tol)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_glu_matches_the_chain_forward_and_backward(dtype):
    torch.manual_seed(0)
    h = (3 * torch.randn(300, 2 * 96)).to(dtype)
    h[0, :5] = torch.tensor([-200.0, -104.5, -103.0, 99.0, 101.0])  # exp's overflow and underflow edges
    grad = torch.randn(300, 96).to(dtype)
    got, (grad_h,) = _autograd(fused.silu_glu, h, grad=grad)
    want, (want_h,) = _autograd(fused.silu_glu_reference, h, grad=grad)
    # exp() as PyTorch's (SLEEF's polynomial), every result rounded where the chain rounds: bit for bit
    assert torch.equal(got, want) and torch.equal(grad_h, want_h)
    with torch.no_grad():
        assert torch.equal(fused.silu_glu(h), got)


def test_silu_glu_leaves_widths_off_32_to_the_chain(monkeypatch):
    """PyTorch's silu does a row's last I mod 32 columns with the scalar exp: such widths keep the chain."""
    monkeypatch.setattr(elementwise, "silu_mul", lambda h: pytest.fail("the kernel ran"))
    h = torch.randn(300, 2 * 176)
    with torch.no_grad():
        assert torch.equal(fused.silu_glu(h), fused.silu_glu_reference(h))


def _key_view(batch, length, heads, dim, dtype):
    """The attention's key: a [B, T, H, D] view with row strides of a fused K/V projection."""
    kv = torch.randn(batch, length, 2, heads, dim).to(dtype)
    return kv.unbind(2)[0]


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tables", ["shared", "per_sequence"])
def test_rotary_is_the_chain_bit_for_bit(dtype, tables):
    torch.manual_seed(0)
    batch, length, dim = 3, 17, 64
    rows = 1 if tables == "shared" else batch
    cos, sin = torch.randn(rows, length, dim).to(dtype), torch.randn(rows, length, dim).to(dtype)
    for x in (torch.randn(batch, length, 16, dim).to(dtype), _key_view(batch, length, 8, dim, dtype)):
        grad = torch.randn(x.shape).to(dtype)
        got, (grad_x,) = _autograd(lambda a: fused.rotary(a, cos, sin), x, grad=grad)
        want, (want_x,) = _autograd(lambda a: fused.rotary_reference(a, cos, sin), x, grad=grad)
        assert torch.equal(got, want) and torch.equal(grad_x, want_x)
        # A gradient arriving transposed (as the key's does, after its transpose) is read through its strides.
        grad_t = grad.transpose(1, 2).contiguous().transpose(1, 2)
        _, (grad_xt,) = _autograd(lambda a: fused.rotary(a, cos, sin), x, grad=grad_t)
        assert torch.equal(grad_xt, want_x)


@requires_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("order", ["slots", "grouped"])
def test_combine_is_the_chain_bit_for_bit_forward_and_backward(dtype, k, order):
    torch.manual_seed(k)
    tokens, hidden = 37, 96
    outputs = torch.randn(tokens * k, hidden).to(dtype)
    gates = torch.rand(tokens, k).to(dtype)
    bias = torch.randn(hidden).to(dtype)
    grad = torch.randn(tokens, hidden).to(dtype)
    rows = None if order == "slots" else torch.randperm(tokens * k)
    assert fused.combine_fusable(outputs, gates, bias)

    def chain(y, g, b):
        return fused.combine_reference(y if rows is None else y[rows], g, b)

    got, got_grads = _autograd(lambda y, g, b: fused.combine(y, rows, g, b), outputs, gates, bias, grad=grad)
    want, want_grads = _autograd(chain, outputs, gates, bias, grad=grad)
    with torch.no_grad():
        assert torch.equal(fused.combine(outputs, rows, gates, bias), got)
    # Gate gradients are sums over H in PyTorch's order: bit for bit too.
    assert all(torch.equal(a, b) for a, b in zip(got_grads, want_grads))
    if k <= 2 or dtype == torch.float32:
        assert torch.equal(got, want)
    else:  # k > 2 in bf16: one fp32 sum of the k products, in slot order; torch's sum may order it otherwise
        assert (_ulps(got, want) <= 1).all()


@requires_native
def test_bad_inputs_raise_value_errors():
    x = torch.randn(4, 64)
    with pytest.raises(ValueError, match="rms_norm"):
        elementwise.rms_norm(x, torch.randn(32), 1e-6)
    with pytest.raises(ValueError, match="one dtype"):
        elementwise.rms_norm(x, torch.randn(64).bfloat16(), 1e-6)
    with pytest.raises(ValueError, match="silu_mul"):
        elementwise.silu_mul(torch.randn(4, 48))
    with pytest.raises(ValueError, match="silu_mul"):
        elementwise.silu_mul(torch.randn(4, 0))
    with pytest.raises(ValueError, match="rms_norm"):
        elementwise.rms_norm(torch.randn(4, 0), torch.randn(0), 1e-6)
    with pytest.raises(ValueError, match="silu_mul_backward"):
        elementwise.silu_mul_backward(torch.randn(4, 64), torch.randn(4, 64))
    with pytest.raises(ValueError, match="rotary"):
        elementwise.rotary(torch.randn(2, 5, 4, 64), torch.randn(1, 6, 64), torch.randn(1, 6, 64))
    with pytest.raises(ValueError, match="rotary"):
        elementwise.rotary(torch.randn(2, 5, 4, 48), torch.randn(1, 5, 48), torch.randn(1, 5, 48))
    outputs, gates, bias = torch.randn(6, 64), torch.rand(3, 2), torch.randn(64)
    with pytest.raises(ValueError, match="must index"):
        elementwise.combine(outputs, torch.tensor([0, 1, 2, 3, 4, 6]), gates, bias)
    with pytest.raises(ValueError, match="combine"):
        elementwise.combine(outputs, None, torch.rand(4, 2), bias)
    with pytest.raises(ValueError, match="combine"):
        elementwise.combine(outputs, torch.arange(6, dtype=torch.int32), gates, bias)
    with pytest.raises(ValueError, match="combine_backward"):
        elementwise.combine_backward(outputs, None, gates, torch.randn(3, 32), need_gates=True)
    with pytest.raises(ValueError, match="CPU|dtype"):
        elementwise.silu_mul(torch.randn(4, 64, dtype=torch.float64))


@requires_native
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_is_f_pad_of_the_transpose_bit_for_bit(monkeypatch, dtype, threads):
    """Blocks of 32 x 32 in registers plus the edges: row counts and widths on and off 32, strided rows, zero
    padding, special values (a bit copy: nan payloads, -0.0, inf survive)."""
    monkeypatch.setattr(elementwise, "_threads", lambda: threads)
    torch.manual_seed(0)
    source = torch.randn(300, 2900).to(dtype)
    source[5, 7], source[40, 33], source[64, 100] = float("nan"), float("-inf"), -0.0
    for rows, cols, padded in [(283, 2816, 320), (64, 1024, 64), (31, 77, 40), (1, 40, 64), (96, 2890, 96), (0, 32, 8)]:
        x = source[3 : 3 + rows, 5 : 5 + cols]  # strided rows
        got = elementwise.transposed(x, padded)
        want = F.pad(x.T, (0, padded - rows))
        assert got.is_contiguous() and got.shape == (cols, padded)
        assert torch.equal(got.view(torch.int16), want.contiguous().view(torch.int16)), (rows, cols, padded)
    whole = elementwise.transposed(source[:40, :64])  # padded defaults to the row count
    assert torch.equal(whole.view(torch.int16), source[:40, :64].T.contiguous().view(torch.int16))
    with pytest.raises(ValueError, match="transposed"):
        elementwise.transposed(source[:40, :64], 39)  # padded below the row count
    with pytest.raises(ValueError, match="transposed"):
        elementwise.transposed(torch.randn(4, 64))  # fp32
    with pytest.raises(ValueError, match="transposed"):
        elementwise.transposed(source[:4, :64].T)  # rows not contiguous


def test_other_dtypes_and_kernels_off_take_the_chain(monkeypatch):
    """In fp64, mixed dtypes, or with the kernels off, the results are the chains' own."""
    calls = []
    monkeypatch.setattr(elementwise, "rms_norm", lambda *a: calls.append(a))
    x, weight = torch.randn(2, 64), torch.randn(64)
    assert torch.equal(fused.rms_norm(x, weight.bfloat16(), 1e-6), fused.rms_norm_reference(x, weight.bfloat16(), 1e-6))
    x64, w64 = x.double(), weight.double()
    assert torch.equal(fused.rms_norm(x64, w64, 1e-6), fused.rms_norm_reference(x64, w64, 1e-6))
    monkeypatch.setattr(native, "available", lambda: False)
    assert torch.equal(fused.rms_norm(x, weight, 1e-6), fused.rms_norm_reference(x, weight, 1e-6))
    assert not calls


@requires_native
def test_model_with_every_fused_path_matches_the_oracle(monkeypatch):
    """Forward, loss and gradients in fp32 within the parity tolerances, with the fused kernels doing every
    norm, rotary, GLU and gated sum; a spy confirms each kernel ran."""
    ran = set()
    kernels = ("rms_norm", "rms_norm_backward", "silu_mul", "silu_mul_backward", "rotary", "combine", "combine_backward")
    for name in kernels:
        kernel = getattr(elementwise, name)
        monkeypatch.setattr(elementwise, name, lambda *a, _k=kernel, _n=name, **kw: (ran.add(_n), _k(*a, **kw))[1])
    geometry = dict(TINY, kv_channels=32)  # rotary needs head dims of a multiple of 32
    ours, oracle = build_pair(geometry)
    ids = random_ids(2, 9)
    with torch.no_grad():
        got, want = ours(input_ids=ids, labels=ids), oracle(input_ids=ids, labels=ids)
    assert_close(got.logits, want.logits, what="fused logits")
    assert_close(got.loss, want.loss, what="fused loss")
    assert {"rms_norm", "silu_mul", "rotary", "combine"} <= ran

    ours.train(), oracle.train()
    ours(input_ids=ids, labels=ids).loss.backward()
    oracle(input_ids=ids, labels=ids).loss.backward()
    assert {"rms_norm_backward", "silu_mul_backward", "combine_backward"} <= ran
    oracle_params = dict(oracle.named_parameters())
    for name, param in ours.named_parameters():
        assert_close(param.grad, oracle_params[name].grad, atol=GRAD_ATOL, what=f"grad {name}")
    assert ATOL < GRAD_ATOL


@requires_native
def test_bf16_prompt_logits_agree_with_the_chains(chains_only):
    """A bf16 model, fused vs chains: equal apart from the norms' last-place differences and their effects."""
    ours, _ = build_pair(dict(TINY, kv_channels=32))
    ours = ours.to(torch.bfloat16)
    ids = random_ids(2, 40)
    with torch.no_grad():
        kernels = ours(input_ids=ids).logits.float()
        chains_only()
        chains = ours(input_ids=ids).logits.float()
    assert (kernels - chains).abs().max() <= 0.05 * chains.abs().max()
    assert (kernels.argmax(-1) == chains.argmax(-1)).float().mean() >= 0.9
    assert F.cosine_similarity(kernels.flatten(), chains.flatten(), dim=0) > 0.999


def _second_order(fn, *inputs, grad):
    """Gradient of |d fn . grad / d inputs|^2 (a gradient penalty): second derivatives through fn."""
    leaves = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    floats = [t for t in leaves if t.requires_grad]
    firsts = torch.autograd.grad(fn(*leaves), floats, grad, create_graph=True)
    # (+ 0 * inputs: a linear map's gradient does not depend on its input, and backward needs a graph)
    (sum(f.pow(2).sum() for f in firsts) + sum((0 * t).sum() for t in floats)).backward()
    return [t.grad for t in floats]


@requires_native
@pytest.mark.parametrize(
    "case", ["rms_norm", "silu_glu", "rotary", "combine", "cross_entropy"],
)
def test_second_derivatives_match_the_chains(case):
    """Under create_graph the backwards compute the chains' gradients with operators: autograd can
    differentiate them again, and the results are the chains' own."""
    torch.manual_seed(0)
    rows = torch.randperm(12)
    cases = {
        "rms_norm": (lambda x, w: fused.rms_norm(x, w, 1e-6), lambda x, w: fused.rms_norm_reference(x, w, 1e-6),
                     (torch.randn(6, 32), 1 + 0.2 * torch.randn(32)), (6, 32)),
        "silu_glu": (fused.silu_glu, fused.silu_glu_reference, (torch.randn(6, 128),), (6, 64)),
        "rotary": (lambda x, c, s: fused.rotary(x, c, s), fused.rotary_reference,
                   (torch.randn(2, 3, 4, 32), torch.randn(1, 3, 32), torch.randn(1, 3, 32)), (2, 3, 4, 32)),
        "combine": (lambda y, g, b: fused.combine(y, rows, g, b),
                    lambda y, g, b: fused.combine_reference(y[rows], g, b),
                    (torch.randn(12, 32), torch.rand(6, 2), torch.randn(32)), (6, 32)),
        "cross_entropy": (lambda z: summed_cross_entropy(z, torch.arange(6)),
                          lambda z: summed_cross_entropy_reference(z, torch.arange(6)), (torch.randn(6, 32),), ()),
    }
    fn, reference, inputs, out_shape = cases[case]
    if case == "rotary":  # the tables are constants (no gradient), as in the model
        inputs = (inputs[0],)
        cos, sin = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
        fn, reference = (lambda x: fused.rotary(x, cos, sin)), (lambda x: fused.rotary_reference(x, cos, sin))
    grad = torch.randn(out_shape)
    got = _second_order(fn, *inputs, grad=grad)
    want = _second_order(reference, *inputs, grad=grad)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
