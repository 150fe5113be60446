"""Python side of elementwise.c: fused RMSNorm, SiLU GLU, rotary embedding and expert combine, fp32 or bf16.

Callers check `fused_ok(...)` first (CPU, one dtype of fp32/bf16, not under torch.compile, where inductor
fuses the same chains itself, and the kernels built); the functions here then validate shapes (ValueError)
and run one C call. No autograd here: ops/fused.py wraps these in autograd Functions.
"""

from __future__ import annotations

import torch

from .. import native as _kernels

_CODES = {torch.float32: 0, torch.bfloat16: 1}


def fused_ok(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: all on the CPU in one dtype, fp32 or bf16, outside
    torch.compile, and the kernels built here."""
    if torch.compiler.is_compiling():
        return False
    dtype = tensors[0].dtype
    return (
        dtype in _CODES
        and all(t.device.type == "cpu" and t.dtype == dtype for t in tensors)
        and _kernels.available()
    )


def _threads() -> int:
    return torch.get_num_threads()


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _same_dtype(name: str, *tensors: torch.Tensor) -> int:
    dtype = tensors[0].dtype
    _require(
        dtype in _CODES and all(t.dtype == dtype and t.device.type == "cpu" for t in tensors),
        f"{name}: tensors must be fp32 or bf16, all one dtype, on the CPU; got "
        + ", ".join(f"{t.dtype} on {t.device}" for t in tensors),
    )
    return _CODES[dtype]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * round(x / rms(x)), 1 / rms(x) per row as fp32 [rows]) over the last dimension."""
    code = _same_dtype("rms_norm", x, weight)
    cols = x.shape[-1]
    _require(weight.shape == (cols,) and cols % 16 == 0, f"rms_norm: x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    x, weight = x.contiguous(), weight.contiguous()
    out = torch.empty_like(x)
    inv_rms = torch.empty(x.shape[:-1], dtype=torch.float32)
    _kernels.load().jetmoe_rms_norm(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), inv_rms.data_ptr(), x.numel() // cols, cols, eps, code, _threads()
    )
    return out, inv_rms


def rms_norm_backward(
    x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor, grad: torch.Tensor, need_x: bool, need_weight: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of x in x's dtype, grad of the weight in fp32), each None when not needed."""
    code = _same_dtype("rms_norm_backward", x, weight, grad)
    cols = x.shape[-1]
    _require(
        grad.shape == x.shape and weight.shape == (cols,) and inv_rms.numel() * cols == x.numel()
        and inv_rms.dtype == torch.float32 and cols % 16 == 0,
        f"rms_norm_backward: x {tuple(x.shape)}, grad {tuple(grad.shape)}, weight {tuple(weight.shape)}, "
        f"inv_rms {tuple(inv_rms.shape)} {inv_rms.dtype}",
    )
    x, weight, grad, inv_rms = x.contiguous(), weight.contiguous(), grad.contiguous(), inv_rms.contiguous()
    grad_x = torch.empty_like(x) if need_x else None
    grad_weight = torch.empty(cols, dtype=torch.float32) if need_weight else None
    status = _kernels.load().jetmoe_rms_norm_backward(
        x.data_ptr(), weight.data_ptr(), inv_rms.data_ptr(), grad.data_ptr(),
        grad_x.data_ptr() if need_x else None, grad_weight.data_ptr() if need_weight else None,
        x.numel() // cols, cols, code, _threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("rms_norm_backward: out of memory for the per-thread weight gradients")
    return grad_x, grad_weight


def _glu_shapes(name: str, h: torch.Tensor) -> tuple[int, int]:
    _require(
        h.dim() >= 1 and h.shape[-1] % 32 == 0,
        f"{name}: h {tuple(h.shape)} must end in 2 * inner features, inner a multiple of 16",
    )
    inner = h.shape[-1] // 2
    return h.numel() // max(2 * inner, 1), inner


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = [gate | up] -> silu(gate) * up [..., I], the silu rounded to h's dtype first."""
    code = _same_dtype("silu_mul", h)
    rows, inner = _glu_shapes("silu_mul", h)
    h = h.contiguous()
    out = h.new_empty(*h.shape[:-1], inner)
    _kernels.load().jetmoe_silu_mul(h.data_ptr(), out.data_ptr(), rows, inner, code, _threads())
    return out


def silu_mul_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of silu_mul's input h [..., 2I] from the gradient of its output [..., I]."""
    code = _same_dtype("silu_mul_backward", h, grad)
    rows, inner = _glu_shapes("silu_mul_backward", h)
    _require(grad.shape == (*h.shape[:-1], inner), f"silu_mul_backward: h {tuple(h.shape)}, grad {tuple(grad.shape)}")
    h, grad = h.contiguous(), grad.contiguous()
    grad_h = torch.empty_like(h)
    _kernels.load().jetmoe_silu_mul_backward(h.data_ptr(), grad.data_ptr(), grad_h.data_ptr(), rows, inner, code, _threads())
    return grad_h


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [B, T, H, D] (any strides but a contiguous last dimension) with cos/sin [B or 1, T, D] ->
    x * cos + rotate_half(x) * sin as a contiguous [B, T, H, D]. `inverse`: the gradient of that map
    applied to x (a gradient of the output) instead."""
    code = _same_dtype("rotary", x, cos, sin)
    _require(x.dim() == 4 and cos.dim() == 3, f"rotary: x {tuple(x.shape)} must be [B, T, H, D], cos [B or 1, T, D]")
    batch, length, heads, dim = x.shape
    _require(
        cos.shape == sin.shape and cos.shape[0] in (1, batch) and cos.shape[1:] == (length, dim) and dim % 32 == 0,
        f"rotary: x {tuple(x.shape)}, cos {tuple(cos.shape)}, sin {tuple(sin.shape)} (D a multiple of 32)",
    )
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, length, heads, dim, dtype=x.dtype)
    table_stride = length * dim if cos.shape[0] == batch and batch > 1 else 0
    _kernels.load().jetmoe_rotary(
        x.data_ptr(), x.stride(0), x.stride(1), x.stride(2), cos.data_ptr(), sin.data_ptr(), table_stride,
        out.data_ptr(), batch, length, heads, dim, int(inverse), code, _threads(),
    )  # fmt: skip
    return out


def combine(y: torch.Tensor, rows: torch.Tensor | None, gates: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Expert output rows y [N*k, H] -> [N, H]: each token's k rows times their gates [N, k], summed, plus bias.
    Slot n*k + j is row rows[n*k + j] of y (rows None: y is in slot order)."""
    code = _same_dtype("combine", y, gates, bias)
    tokens, k = gates.shape
    hidden = y.shape[-1]
    _require(
        y.dim() == 2 and y.shape[0] == tokens * k and bias.shape == (hidden,) and hidden % 16 == 0
        and (rows is None or (rows.dtype == torch.int64 and rows.shape == (tokens * k,))),
        f"combine: y {tuple(y.shape)}, gates {tuple(gates.shape)}, bias {tuple(bias.shape)}, "
        f"rows {None if rows is None else (tuple(rows.shape), rows.dtype)}",
    )
    if rows is not None and rows.numel():
        low, high = rows.aminmax()
        _require(0 <= low and high < tokens * k, f"combine: rows must index y's {tokens * k} rows")
        rows = rows.contiguous()
    y, gates, bias = y.contiguous(), gates.contiguous(), bias.contiguous()
    out = y.new_empty(tokens, hidden)
    _kernels.load().jetmoe_combine(
        y.data_ptr(), None if rows is None else rows.data_ptr(), gates.data_ptr(), bias.data_ptr(), out.data_ptr(),
        tokens, k, hidden, code, _threads(),
    )  # fmt: skip
    return out
