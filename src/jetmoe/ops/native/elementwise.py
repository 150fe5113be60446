"""Python side of elementwise.c: fused RMSNorm, SiLU GLU, rotary embedding, expert combine and cross-entropy
rows, fp32 or bf16.

Callers check `fused_ok(...)` first (CPU, one dtype of fp32/bf16, not under torch.compile, where inductor
fuses the same chains itself, and the kernels built); the functions here then validate shapes (ValueError)
and run one C call. No autograd here: ops/fused.py wraps these in autograd Functions.
"""

from __future__ import annotations

import torch

from .. import native as _kernels

_CODES = {torch.float32: 0, torch.bfloat16: 1}
_threads = torch.get_num_threads


def fused_ok(*tensors: torch.Tensor) -> bool:
    """Whether the fused kernels take these tensors: all on the CPU in one dtype, fp32 or bf16, outside
    torch.compile, and the kernels built here."""
    dtype = tensors[0].dtype
    return (
        dtype in _CODES
        and all(t.is_cpu and t.dtype == dtype for t in tensors)
        and not torch.compiler.is_compiling()
        and _kernels.available()
    )


# The wrappers run while decoding too (a few us each matters there): checks are plain comparisons, and an
# error message is only built when one fails.


def _reject(name: str, *tensors: torch.Tensor | None, note: str = "") -> None:
    described = ", ".join("None" if t is None else f"{tuple(t.shape)} {t.dtype} on {t.device}" for t in tensors)
    raise ValueError(f"{name}: unsupported inputs ({described}){': ' + note if note else ''}")


def _code(name: str, *tensors: torch.Tensor) -> int:
    """The kernels' dtype code: every tensor on the CPU, all fp32 or all bf16."""
    dtype = tensors[0].dtype
    if dtype not in _CODES or not all(t.is_cpu and t.dtype == dtype for t in tensors):
        _reject(name, *tensors, note="tensors must be fp32 or bf16, all one dtype, on the CPU")
    return _CODES[dtype]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight * round(x / rms(x)), 1 / rms(x) per row as fp32 [rows]) over the last dimension."""
    code = _code("rms_norm", x, weight)
    cols = x.shape[-1]
    if weight.dim() != 1 or weight.shape[0] != cols or cols % 16 or cols == 0:
        _reject("rms_norm", x, weight, note="weight [features], features a positive multiple of 16")
    x, weight = x.contiguous(), weight.contiguous()
    rows = x.numel() // cols
    out, inv_rms = torch.empty_like(x), torch.empty(rows, dtype=torch.float32)
    _kernels.load().jetmoe_rms_norm(
        x.data_ptr(), weight.data_ptr(), out.data_ptr(), inv_rms.data_ptr(), rows, cols, eps, code, _threads()
    )
    return out, inv_rms


def rms_norm_backward(
    x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor, grad: torch.Tensor, need_x: bool, need_weight: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(grad of x in x's dtype, grad of the weight in fp32), each None when not needed."""
    code = _code("rms_norm_backward", x, weight, grad)
    cols = x.shape[-1]
    if (
        grad.shape != x.shape or weight.dim() != 1 or weight.shape[0] != cols or cols % 16 or cols == 0
        or inv_rms.numel() * cols != x.numel() or inv_rms.dtype != torch.float32 or not inv_rms.is_cpu
    ):  # fmt: skip
        _reject("rms_norm_backward", x, weight, inv_rms, grad)
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


def silu_mul(h: torch.Tensor) -> torch.Tensor:
    """h [..., 2I] = [gate | up] -> silu(gate) * up [..., I], the silu rounded to h's dtype first."""
    code = _code("silu_mul", h)
    if h.dim() == 0 or h.shape[-1] % 32 or h.shape[-1] == 0:
        _reject("silu_mul", h, note="h ends in 2 * inner features, inner a positive multiple of 16")
    h = h.contiguous()
    inner = h.shape[-1] // 2
    out = h.new_empty(*h.shape[:-1], inner)
    _kernels.load().jetmoe_silu_mul(h.data_ptr(), out.data_ptr(), h.numel() // (2 * inner), inner, code, _threads())
    return out


def silu_mul_backward(h: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """The gradient of silu_mul's input h [..., 2I] from the gradient of its output [..., I]."""
    code = _code("silu_mul_backward", h, grad)
    if h.dim() == 0 or h.shape[-1] % 32 or h.shape[-1] == 0 or grad.shape != (*h.shape[:-1], h.shape[-1] // 2):
        _reject("silu_mul_backward", h, grad, note="h [..., 2I] and grad [..., I], I a positive multiple of 16")
    h, grad = h.contiguous(), grad.contiguous()
    inner = h.shape[-1] // 2
    grad_h = torch.empty_like(h)
    _kernels.load().jetmoe_silu_mul_backward(
        h.data_ptr(), grad.data_ptr(), grad_h.data_ptr(), h.numel() // (2 * inner), inner, code, _threads()
    )
    return grad_h


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, inverse: bool = False) -> torch.Tensor:
    """x [B, T, H, D] (any strides but a contiguous last dimension) with cos/sin [B or 1, T, D] ->
    x * cos + rotate_half(x) * sin as a contiguous [B, T, H, D]. `inverse`: the gradient of that map
    applied to x (a gradient of the output) instead."""
    code = _code("rotary", x, cos, sin)
    if x.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape:
        _reject("rotary", x, cos, sin, note="x [B, T, H, D], cos and sin [B or 1, T, D]")
    batch, length, heads, dim = x.shape
    if cos.shape[0] not in (1, batch) or cos.shape[1] != length or cos.shape[2] != dim or dim % 32 or dim == 0:
        _reject("rotary", x, cos, sin, note="x [B, T, H, D], cos and sin [B or 1, T, D], D a multiple of 32")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = cos.contiguous(), sin.contiguous()
    out = torch.empty(batch, length, heads, dim, dtype=x.dtype)
    table_stride = length * dim if cos.shape[0] == batch and batch > 1 else 0
    sb, st, sh, _ = x.stride()
    _kernels.load().jetmoe_rotary(
        x.data_ptr(), sb, st, sh, cos.data_ptr(), sin.data_ptr(), table_stride,
        out.data_ptr(), batch, length, heads, dim, int(inverse), code, _threads(),
    )  # fmt: skip
    return out


def _combine_checked(name, y, rows, gates, bias_or_grad, grad_shape: bool):
    """The combine arguments, contiguous, after the shape checks both directions share."""
    code = _code(name, y, gates, bias_or_grad)
    if gates.dim() != 2 or y.dim() != 2:
        _reject(name, y, rows, gates, bias_or_grad, note="y [N*k, H], gates [N, k]")
    tokens, k = gates.shape
    hidden = y.shape[1]
    other = (tokens, hidden) if grad_shape else (hidden,)
    if y.shape[0] != tokens * k or tuple(bias_or_grad.shape) != other or hidden % 16:
        note = "y [N*k, H], gates [N, k], bias [H] or grad [N, H], H % 16 == 0"
        _reject(name, y, rows, gates, bias_or_grad, note=note)
    if rows is not None:
        if rows.dtype != torch.int64 or rows.dim() != 1 or rows.shape[0] != tokens * k or not rows.is_cpu:
            _reject(name, y, rows, gates, bias_or_grad, note="rows: int64 [N*k] on the CPU")
        if rows.numel():
            low, high = rows.aminmax()
            if low < 0 or high >= tokens * k:
                _reject(name, y, rows, gates, bias_or_grad, note=f"rows must index y's {tokens * k} rows")
        rows = rows.contiguous()
    return code, y.contiguous(), rows, gates.contiguous(), bias_or_grad.contiguous()


def combine(y: torch.Tensor, rows: torch.Tensor | None, gates: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Expert output rows y [N*k, H] -> [N, H]: each token's k rows times their gates [N, k], summed, plus bias.
    Slot n*k + j is row rows[n*k + j] of y (rows None: y is in slot order)."""
    code, y, rows, gates, bias = _combine_checked("combine", y, rows, gates, bias, grad_shape=False)
    tokens, k = gates.shape
    out = y.new_empty(tokens, y.shape[1])
    _kernels.load().jetmoe_combine(
        y.data_ptr(), None if rows is None else rows.data_ptr(), gates.data_ptr(), bias.data_ptr(), out.data_ptr(),
        tokens, k, y.shape[1], code, _threads(),
    )  # fmt: skip
    return out


def combine_backward(
    y: torch.Tensor, rows: torch.Tensor | None, gates: torch.Tensor, grad: torch.Tensor, need_gates: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of combine's y (in y's row order) and gates from the gradient of its output [N, H] (the bias
    gradient is grad.sum(0)). rows must be a permutation (as a routing plan's are): every row gets written."""
    code, y, rows, gates, grad = _combine_checked("combine_backward", y, rows, gates, grad, grad_shape=True)
    tokens, k = gates.shape
    grad_y = torch.empty_like(y)
    grad_gates = torch.empty_like(gates) if need_gates else None
    _kernels.load().jetmoe_combine_backward(
        y.data_ptr(), None if rows is None else rows.data_ptr(), gates.data_ptr(), grad.data_ptr(), grad_y.data_ptr(),
        grad_gates.data_ptr() if need_gates else None, tokens, k, y.shape[1], code, _threads(),
    )  # fmt: skip
    return grad_y, grad_gates


def _logit_rows(name: str, x: torch.Tensor) -> int:
    code = _code(name, x)
    if x.dim() != 2 or x.shape[1] % 16 or x.stride(1) != 1:
        _reject(name, x, note="logits [N, V] with contiguous rows, V a multiple of 16")
    return code


def logsumexp_rows(x: torch.Tensor) -> torch.Tensor:
    """log(sum(exp(x[n]))) per row of logits [N, V], fp32 [N] (max-shifted, fp32 sums)."""
    code = _logit_rows("logsumexp_rows", x)
    lse = torch.empty(x.shape[0], dtype=torch.float32)
    _kernels.load().jetmoe_logsumexp_rows(
        x.data_ptr(), x.stride(0), lse.data_ptr(), x.shape[0], x.shape[1], code, _threads()
    )
    return lse


def cross_entropy_backward(
    x: torch.Tensor, lse: torch.Tensor, targets: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """(softmax(x[n]) - one_hot(targets[n])) * scale[n] per row, in x's dtype, from the rows' log-sum-exp."""
    code = _logit_rows("cross_entropy_backward", x)
    rows, vocab = x.shape
    if (
        lse.shape != (rows,) or scale.shape != (rows,) or targets.shape != (rows,)
        or lse.dtype != torch.float32 or scale.dtype != torch.float32 or targets.dtype != torch.int64
        or not (lse.is_cpu and scale.is_cpu and targets.is_cpu)
    ):  # fmt: skip
        _reject("cross_entropy_backward", x, lse, targets, scale, note="lse and scale fp32 [N], targets int64 [N]")
    if rows and not bool(((targets >= 0) & (targets < vocab)).all()):
        _reject("cross_entropy_backward", x, targets, note=f"targets must lie in 0..{vocab - 1}")
    lse, targets, scale = lse.contiguous(), targets.contiguous(), scale.contiguous()
    grad = torch.empty(rows, vocab, dtype=x.dtype)
    _kernels.load().jetmoe_cross_entropy_backward(
        x.data_ptr(), x.stride(0), lse.data_ptr(), targets.data_ptr(), scale.data_ptr(), grad.data_ptr(),
        rows, vocab, code, _threads(),
    )  # fmt: skip
    return grad


def transposed(x: torch.Tensor, padded: int | None = None) -> torch.Tensor:
    """x [rows, cols] of 2-byte elements (rows may be strided, each row contiguous) -> [cols, padded] contiguous:
    x.T with zero columns after the first `rows` (padded defaults to rows): F.pad(x.T, (0, padded - rows))."""
    rows, cols = (x.shape[0], x.shape[1]) if x.dim() == 2 else (-1, -1)
    padded = rows if padded is None else padded
    if x.dim() != 2 or not x.is_cpu or x.element_size() != 2 or (cols > 1 and x.stride(1) != 1) or padded < rows:
        _reject("transposed", x, note=f"a 2-d CPU tensor of 2-byte elements, contiguous rows, padded {padded} >= rows")
    out = torch.empty(cols, padded, dtype=x.dtype)
    if out.numel():
        _kernels.load().jetmoe_transpose16(
            x.data_ptr(), x.stride(0), rows, cols, out.data_ptr(), padded, padded, _threads()
        )
    return out


def _causal_scores(name: str, scores: torch.Tensor, lse: torch.Tensor, q_len: int, *others: torch.Tensor) -> int:
    code = _code(name, scores, *others)
    if (
        scores.dim() != 3 or not scores.is_contiguous() or any(o.shape != scores.shape or not o.is_contiguous()
                                                                for o in others)
        or lse.shape != scores.shape[:2] or lse.dtype != torch.float32 or not lse.is_cpu or not lse.is_contiguous()
        or q_len < 1 or q_len > scores.shape[2] or scores.shape[1] % q_len
    ):  # fmt: skip
        _reject(name, scores, lse, *others, note="scores [blocks, groups * q_len, keys] contiguous, lse fp32 "
                "[blocks, groups * q_len], q_len <= keys")
    return code


def causal_attention_probs(scores: torch.Tensor, lse: torch.Tensor, q_len: int, scale: float) -> torch.Tensor:
    """exp(scale * scores - lse) where a query may see the key, else 0, in the scores' dtype.

    scores [blocks, groups * q_len, keys]: row r of a block is query position r % q_len, the last q_len of
    `keys` positions; lse [blocks, groups * q_len] the softmax's log-sum-exp of the scaled scores (fp32)."""
    code = _causal_scores("causal_attention_probs", scores, lse, q_len)
    probs = torch.empty_like(scores)
    blocks, rows, keys = scores.shape
    _kernels.load().jetmoe_causal_attention_probs(
        scores.data_ptr(), lse.data_ptr(), probs.data_ptr(), blocks, rows, q_len, keys, scale, code, _threads()
    )
    return probs


def causal_attention_score_grad(
    scores: torch.Tensor, grad_probs: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor, q_len: int, scale: float
) -> torch.Tensor:
    """The gradient of the scores, probs * (grad_probs - delta) * scale (probs as in causal_attention_probs),
    written over grad_probs and returned. delta [blocks, groups * q_len] fp32: sum(grad_out * out) per row."""
    code = _causal_scores("causal_attention_score_grad", scores, lse, q_len, grad_probs)
    if delta.shape != lse.shape or delta.dtype != torch.float32 or not delta.is_cpu or not delta.is_contiguous():
        _reject("causal_attention_score_grad", lse, delta, note="delta fp32, the shape of lse")
    blocks, rows, keys = scores.shape
    _kernels.load().jetmoe_causal_attention_score_grad(
        scores.data_ptr(), grad_probs.data_ptr(), lse.data_ptr(), delta.data_ptr(), grad_probs.data_ptr(),
        blocks, rows, q_len, keys, scale, code, _threads(),
    )  # fmt: skip
    return grad_probs
