"""Element-wise steps of a layer, fused: RMSNorm, the SiLU GLU, rotary embedding, the experts' gated sum.

Each function is defined by its PyTorch op chain (`*_reference`). On the CPU (fp32 or bf16) it runs instead
as one pass of jetmoe's C kernels (ops/native/elementwise.c) that gives the chain's values bit for bit: it
rounds where the chain rounds and follows PyTorch's order where that decides an fp32 result (the norm's sum of
squares, silu's exp), so fp32 models stay bit-identical to transformers' JetMoe. One pass saves the chain's
memory traffic on prompts and its dispatch while decoding (one C call in place of up to eight operators;
docs/performance.md). Elsewhere (CUDA, fp16, fp64, kernels not built) and under torch.compile, which fuses the
chains itself, the chains run.

Training: RMSNorm, GLU and rotary have autograd Functions with fused backward kernels (the GLU's and rotary's
bit for bit autograd's through the chain; the norm's within roundings of its hand-written formula), which keep
less than autograd would: the norm its input and one fp32 scale per row, the GLU its input. The gated sum's
backward writes the expert rows' gradients straight into the experts' (grouped) order, and sums the gates'
gradients in PyTorch's order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .native import elementwise as native
from .permute import sum_slots


def _fused(*tensors: torch.Tensor) -> bool:
    return native.fused_ok(*tensors)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# A backward runs with grad mode on only under create_graph=True (second derivatives, e.g. a gradient
# penalty). The kernels' results have no autograd history, so there the backwards compute the chain's
# gradients with PyTorch operators instead, which autograd can differentiate again.


def chain_gradients(reference, inputs: tuple, needs: tuple, grad: torch.Tensor) -> tuple:
    """d reference(*inputs) / d inputs[i] applied to grad, for the inputs with needs[i], as a graph (None
    where not needed)."""
    wanted = [t for t, need in zip(inputs, needs) if need]
    with torch.enable_grad():
        found = iter(torch.autograd.grad(reference(*inputs), wanted, grad, create_graph=True, allow_unused=True))
    return tuple(next(found) if need else None for need in needs)


# --- RMSNorm ----------------------------------------------------------------------------------------------


def _rms_normalize(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / rms(x) computed in fp32, 1 / rms(x) per row [..., 1])."""
    x = x.float()
    inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return x * inv_rms, inv_rms


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x / rms(x)), normalised in fp32 and cast back to x's dtype before the weight."""
    normalized, _ = _rms_normalize(x, eps)
    return weight * normalized.to(x.dtype)


class _RMSNormFunction(torch.autograd.Function):
    """A hand-written backward that keeps only the input and one fp32 scale per row.

    Autograd through the chain keeps the fp32 copy of the input and the normalised rows as well: 6 more bytes
    per element, for every norm of the model.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        if _fused(x, weight):
            out, inv_rms = native.rms_norm(x, weight, eps)
        else:
            normalized, inv_rms = _rms_normalize(x, eps)
            out = weight * normalized.to(x.dtype)
        ctx.save_for_backward(x, weight, inv_rms)
        ctx.eps = eps
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        x, weight, inv_rms = ctx.saved_tensors
        need_x, need_weight = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # inv_rms has no history: differentiate the chain itself

            def chain(a, w):
                return rms_norm_reference(a, w, ctx.eps)

            return *chain_gradients(chain, (x, weight), (need_x, need_weight), grad_out), None
        if _fused(x, weight, grad_out):
            grad_x, grad_weight = native.rms_norm_backward(x, weight, inv_rms, grad_out, need_x, need_weight)
            return grad_x, None if grad_weight is None else grad_weight.to(weight.dtype), None
        inv_rms = inv_rms.view(*x.shape[:-1], 1)
        normalized = x.float() * inv_rms
        grad_weight = grad_x = None
        if need_weight:
            rounded = normalized.to(x.dtype).float()  # the forward multiplied the rounded rows
            grad_weight = (grad_out.float() * rounded).reshape(-1, weight.shape[-1]).sum(0).to(weight.dtype)
        if need_x:
            grad_normalized = (grad_out * weight).float()
            dot = (grad_normalized * normalized).mean(-1, keepdim=True)
            grad_x = (inv_rms * (grad_normalized - normalized * dot)).to(x.dtype)
        return grad_x, grad_weight, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _needs_grad(x, weight):
        return _RMSNormFunction.apply(x, weight, eps)
    if _fused(x, weight):
        return native.rms_norm(x, weight, eps)[0]
    return rms_norm_reference(x, weight, eps)


# --- SiLU GLU ---------------------------------------------------------------------------------------------


def silu_glu_reference(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = [gate | up] -> silu(gate) * up."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


class _SiluGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(h)
        return native.silu_mul(h)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (h,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return chain_gradients(silu_glu_reference, (h,), (True,), grad)
        return native.silu_mul_backward(h, grad)


def silu_glu(h: torch.Tensor) -> torch.Tensor:
    # PyTorch's silu computes the last (I mod 32) columns of a row with the scalar exp of the C library: the
    # kernel (vector exp throughout) equals it bit for bit where I is a multiple of 32, so it takes only those.
    if h.shape[-1] % 64 or not _fused(h):
        return silu_glu_reference(h)
    return _SiluGLUFunction.apply(h) if _needs_grad(h) else native.silu_mul(h)


# --- rotary embedding -------------------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] with cos/sin [B or 1, T, D]: x * cos + rotate_half(x) * sin."""
    cos, sin = cos[:, :, None], sin[:, :, None]
    return x * cos + rotate_half(x) * sin


class _RotaryFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return native.rotary(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        if torch.is_grad_enabled():  # the map is linear in x: its gradient, written as operators on grad
            first, second = (grad * sin[:, :, None]).chunk(2, dim=-1)
            return grad * cos[:, :, None] + torch.cat((second, -first), dim=-1), None, None
        return native.rotary(grad, cos, sin, inverse=True), None, None


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] (heads after positions) rotated by the cos/sin tables [B or 1, T, D] of its positions."""
    if x.shape[-1] % 32 or not _fused(x, cos, sin) or _needs_grad(cos, sin):
        return rotary_reference(x, cos, sin)
    return _RotaryFunction.apply(x, cos, sin) if _needs_grad(x) else native.rotary(x, cos, sin)


# --- the experts' gated sum -------------------------------------------------------------------------------


def combine_reference(slot_outputs: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Slot-order expert outputs [N*k, H] times the gates [N, k], summed per token, plus the (ungated) bias."""
    return sum_slots(slot_outputs.view(*gates.shape, -1) * gates[..., None]) + bias


class _CombineFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, outputs, slot_rows, gates, bias):
        ctx.save_for_backward(outputs, slot_rows, gates)
        return native.combine(outputs, slot_rows, gates, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        outputs, slot_rows, gates = ctx.saved_tensors
        need_outputs, _, need_gates, need_bias = ctx.needs_input_grad
        grad_bias = grad.sum(0) if need_bias else None
        if torch.is_grad_enabled():

            def chain(y, g):
                return combine_reference(y if slot_rows is None else y.index_select(0, slot_rows), g, 0.0)

            grad_outputs, grad_gates = chain_gradients(chain, (outputs, gates), (need_outputs, need_gates), grad)
            return grad_outputs, None, grad_gates, grad_bias
        grad_outputs, grad_gates = native.combine_backward(outputs, slot_rows, gates, grad, need_gates)
        return grad_outputs if need_outputs else None, None, grad_gates, grad_bias


def combine_fusable(outputs: torch.Tensor, gates: torch.Tensor, bias: torch.Tensor) -> bool:
    """Whether `combine` takes these (the fused kernels run here, and H is a multiple of 16)."""
    return outputs.shape[-1] % 16 == 0 and _fused(outputs, gates, bias)


def combine(outputs: torch.Tensor, slot_rows: torch.Tensor | None, gates: torch.Tensor, bias: torch.Tensor):
    """`combine_reference(outputs[slot_rows], gates, bias)` in one pass, for `combine_fusable` inputs: expert
    output rows [N*k, H] -> [N, H], slot n*k + j being row slot_rows[n*k + j] (None: already in slot order;
    otherwise a permutation, as a routing plan's)."""
    if _needs_grad(outputs, gates, bias):
        return _CombineFunction.apply(outputs, slot_rows, gates, bias)
    return native.combine(outputs, slot_rows, gates, bias)
