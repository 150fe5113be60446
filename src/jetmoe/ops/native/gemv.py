"""Python wrappers of gemv.c: matrix-vector products for decoding, and their torch.library operators."""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import torch

from .build import load

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


@torch.compiler.assume_constant_result  # under torch.compile, a constant of the trace (no build inside it)
def available() -> bool:
    return load() is not None


Groups = Sequence[int]  # flat (expert, first row, end row) triples; empty: every row through expert 0


def slot_groups(slot_experts: Sequence[int]) -> list[int]:
    """Row s through expert slot_experts[s]."""
    return [value for slot, expert in enumerate(slot_experts) for value in (expert, slot, slot + 1)]


def ends_groups(ends: Sequence[int]) -> list[int]:
    """Rows grouped by expert, group e ending at row ends[e] (empty groups left out)."""
    groups, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            groups += (expert, start, end)
        start = end
    return groups


@functools.cache
def _int64_array(length: int) -> type:
    return ctypes.c_int64 * length  # one array type per length: creating one is slow


def _groups_ok(flat: list[int], experts: int, rows: int) -> bool:
    if len(flat) % 3:
        return False
    for i in range(0, len(flat), 3):
        expert, first, end = flat[i], flat[i + 1], flat[i + 2]
        if not (0 <= expert < experts and 0 <= first <= end <= rows):
            return False
    return True


def _checked(x: torch.Tensor, weight: torch.Tensor, groups: Groups, name: str) -> tuple[torch.Tensor, ctypes.Array]:
    """x and the weight as [E, rows, cols] (contiguous), and the groups as a C array. Runs for every product of
    a decoded token: plain comparisons, and a message only when one fails."""
    if weight.dim() == 2:
        weight = weight[None]
    experts, rows, cols = weight.shape
    flat = list(groups) if groups else [0, 0, x.shape[0]]
    if (
        x.dim() != 2
        or not x.is_cpu
        or not weight.is_cpu
        or x.shape[1] != cols
        or cols % 32
        or not _groups_ok(flat, experts, x.shape[0])
    ):
        raise ValueError(f"{name}: x {tuple(x.shape)}, weight {tuple(weight.shape)}, groups {flat}")
    return weight.contiguous(), _int64_array(len(flat))(*flat)


_GEMV_DTYPES = (torch.bfloat16, torch.float32)


def gemv_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the matrix-vector kernel takes this product: CPU, both bf16 or both fp32, the weight as stored
    (not a transposed view, which would be copied), `in` a multiple of 32, and the kernels built."""
    return (
        x.is_cpu
        and x.dtype == weight.dtype
        and x.dtype in _GEMV_DTYPES
        and weight.is_contiguous()
        and weight.shape[-1] % 32 == 0
        and available()
    )


def int8_ok(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the int8 kernel takes this product: CPU, float activations and scales, `in` a multiple of 32."""
    return (
        x.is_cpu
        and x.dtype in DTYPE_CODES
        and scale.dtype in DTYPE_CODES
        and q.shape[-1] % 32 == 0
        and available()
    )


def gemv(x: torch.Tensor, weight: torch.Tensor, groups: Groups = ()) -> torch.Tensor:
    """x [M, in] times weight [out, in] (or expert weights [E, out, in] with `groups`) -> [M, out], bf16 or fp32.

    For few rows (decoding). Needs `gemv_ok(x, weight)`. Rows no group names come back uninitialised.
    Under torch.compile this is the operator `jetmoe::gemv`."""
    if torch.compiler.is_compiling():
        return gemv_op(x, weight, list(groups))
    return _gemv(x, weight, groups)


def int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, groups: Groups = ()) -> torch.Tensor:
    """x [M, in] (fp32/bf16/fp16) times int8 q [out, in] with scales [out] (or [E, out, in] and [E, out] with
    `groups`) -> [M, out] in x's dtype, y = (x @ q.T) * scale.

    For few rows (decoding). Needs `int8_ok(x, q, scale)`. The activations are put on a 16-bit grid per row
    (see gemv.c): results differ from the dequantised product by rounding only. Under torch.compile this is
    the operator `jetmoe::int8_gemv`."""
    if torch.compiler.is_compiling():
        return int8_gemv_op(x, q, scale, list(groups))
    return _int8_gemv(x, q, scale, groups)


def _dtype_code(name: str, *tensors: torch.Tensor) -> int:
    dtype = tensors[0].dtype
    if dtype not in _GEMV_DTYPES or any(t.dtype != dtype for t in tensors):
        raise ValueError(f"{name}: {', '.join(str(t.dtype) for t in tensors)}: all bfloat16 or all float32")
    return DTYPE_CODES[dtype]


def _gemv(x: torch.Tensor, weight: torch.Tensor, groups: Groups = ()) -> torch.Tensor:
    weight, table = _checked(x, weight, groups, "gemv")
    code = _dtype_code("gemv", x, weight)
    x = x.contiguous()
    out = torch.empty(x.shape[0], weight.shape[1], dtype=x.dtype)
    load().jetmoe_gemv(
        weight.data_ptr(), weight.shape[1], weight.shape[2], x.data_ptr(), table, len(table) // 3, out.data_ptr(),
        code, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _covers_every_row(table: ctypes.Array, rows: int) -> bool:
    """Whether the groups name every row of x once, in order (as slot_groups does): the step after the product
    reads all of its rows."""
    flat = list(table)
    return [flat[i + 1 : i + 3] for i in range(0, len(flat), 3)] == [[r, r + 1] for r in range(rows)] or (
        len(flat) == 3 and flat[1] == 0 and flat[2] == rows
    )


def gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, groups: Groups) -> torch.Tensor:
    """`silu(h[:, :I]) * h[:, I:]` of h = gemv(x, weight, groups) [M, 2I], in one call: bit for bit
    elementwise.silu_mul(gemv(...)). For decoding (see gemv.c); 2I a multiple of 64, every row of x in a group.
    Under torch.compile this is the operator `jetmoe::gemv_silu_mul`."""
    if torch.compiler.is_compiling():
        return gemv_silu_mul_op(x, weight, list(groups))
    return _gemv_silu_mul(x, weight, groups)


def _gemv_silu_mul(x: torch.Tensor, weight: torch.Tensor, groups: Groups) -> torch.Tensor:
    weight, table = _checked(x, weight, groups, "gemv_silu_mul")
    code = _dtype_code("gemv_silu_mul", x, weight)
    inner2 = weight.shape[1]
    if inner2 % 64 or not _covers_every_row(table, x.shape[0]):
        raise ValueError(f"gemv_silu_mul: x {tuple(x.shape)}, weight {tuple(weight.shape)}, groups {list(table)}: "
                         "2I % 64 == 0, every row in a group")  # fmt: skip
    x = x.contiguous()
    h = torch.empty(x.shape[0], inner2, dtype=x.dtype)
    out = torch.empty(x.shape[0], inner2 // 2, dtype=x.dtype)
    load().jetmoe_gemv_silu_mul(
        weight.data_ptr(), inner2, weight.shape[2], x.data_ptr(), table, len(table) // 3, h.data_ptr(), x.shape[0],
        out.data_ptr(), code, torch.get_num_threads(),
    )  # fmt: skip
    return out


def gemv_combine(
    x: torch.Tensor, weight: torch.Tensor, groups: Groups, gates: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    """Slot-order expert outputs y = gemv(x, weight, groups) [N*k, H] gate-weighted, summed per token, plus bias
    -> [N, H], in one call: bit for bit elementwise.combine(y, None, gates, bias). For decoding (see gemv.c);
    gates [N, k] and bias [H] in x's dtype (bf16 or fp32), H a multiple of 16, every row of x in a group.
    Under torch.compile this is the operator `jetmoe::gemv_combine`."""
    if torch.compiler.is_compiling():
        return gemv_combine_op(x, weight, list(groups), gates, bias)
    return _gemv_combine(x, weight, groups, gates, bias)


def _gemv_combine(
    x: torch.Tensor, weight: torch.Tensor, groups: Groups, gates: torch.Tensor, bias: torch.Tensor
) -> torch.Tensor:
    weight, table = _checked(x, weight, groups, "gemv_combine")
    code = _dtype_code("gemv_combine", x, weight, gates, bias)
    hidden = weight.shape[1]
    tokens, k = gates.shape if gates.dim() == 2 else (0, 0)
    if (
        not (gates.is_cpu and bias.is_cpu)
        or tokens * k != x.shape[0]
        or tuple(bias.shape) != (hidden,)
        or hidden % 16
        or not _covers_every_row(table, x.shape[0])
    ):
        raise ValueError(f"gemv_combine: x {tuple(x.shape)}, weight {tuple(weight.shape)}, gates "
                         f"{tuple(gates.shape)}, bias {tuple(bias.shape)}, groups {list(table)}: gates [N, k] for "
                         "N*k rows, bias [H], H % 16 == 0")  # fmt: skip
    x, gates, bias = x.contiguous(), gates.contiguous(), bias.contiguous()
    y = torch.empty(x.shape[0], hidden, dtype=x.dtype)
    out = torch.empty(tokens, hidden, dtype=x.dtype)
    load().jetmoe_gemv_combine(
        weight.data_ptr(), hidden, weight.shape[2], x.data_ptr(), table, len(table) // 3, y.data_ptr(),
        gates.data_ptr(), bias.data_ptr(), tokens, k, out.data_ptr(), code, torch.get_num_threads(),
    )  # fmt: skip
    return out


def _int8_gemv(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, groups: Groups = ()) -> torch.Tensor:
    q, table = _checked(x, q, groups, "int8_gemv")
    if scale.shape != q.shape[:2] and scale.shape != q.shape[1:2] or scale.device.type != "cpu":
        raise ValueError(f"int8_gemv: scale {tuple(scale.shape)} on {scale.device} for weights {tuple(q.shape)}")
    if q.dtype != torch.int8 or x.dtype not in DTYPE_CODES or scale.dtype not in DTYPE_CODES:
        raise ValueError(f"int8_gemv: weights {q.dtype} (must be int8), x {x.dtype} and scale {scale.dtype} (float)")
    x, scale = x.contiguous(), scale.contiguous()
    out = torch.empty(x.shape[0], q.shape[1], dtype=x.dtype)
    status = load().jetmoe_int8_gemv(
        q.data_ptr(), scale.data_ptr(), DTYPE_CODES[scale.dtype], q.shape[1], q.shape[2],
        x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], table, len(table) // 3, out.data_ptr(), DTYPE_CODES[out.dtype],
        torch.get_num_threads(),
    )  # fmt: skip
    if status != 0:
        raise MemoryError("int8_gemv: out of memory for the quantised activations")
    return out


# For torch.compile: the kernels as opaque operators (dynamo cannot trace a ctypes call). The groups may be
# symbolic ints (the few-token plan's experts under the engine's compiled decode step). Defined with the
# low-level torch.library API, CPU kernel only (inference: no autograd formula), whose dispatch costs less than
# `torch.library.custom_op`'s (docs/performance.md).
_LIBRARY = torch.library.Library("jetmoe", "FRAGMENT")
_LIBRARY.define("gemv(Tensor x, Tensor weight, SymInt[] groups) -> Tensor")
_LIBRARY.define("int8_gemv(Tensor x, Tensor q, Tensor scale, SymInt[] groups) -> Tensor")
_LIBRARY.define("gemv_silu_mul(Tensor x, Tensor weight, SymInt[] groups) -> Tensor")
_LIBRARY.define("gemv_combine(Tensor x, Tensor weight, SymInt[] groups, Tensor gates, Tensor bias) -> Tensor")
_LIBRARY.impl("gemv", _gemv, "CPU")
_LIBRARY.impl("gemv_silu_mul", _gemv_silu_mul, "CPU")
_LIBRARY.impl("gemv_combine", _gemv_combine, "CPU")
_LIBRARY.impl("int8_gemv", _int8_gemv, "CPU")


@torch.library.register_fake("jetmoe::gemv")
def _(x, weight, groups):
    return x.new_empty((x.shape[0], weight.shape[-2]))


@torch.library.register_fake("jetmoe::int8_gemv")
def _(x, q, scale, groups):
    return x.new_empty((x.shape[0], q.shape[-2]))


@torch.library.register_fake("jetmoe::gemv_silu_mul")
def _(x, weight, groups):
    return x.new_empty((x.shape[0], weight.shape[-2] // 2))


@torch.library.register_fake("jetmoe::gemv_combine")
def _(x, weight, groups, gates, bias):
    return x.new_empty((gates.shape[0], weight.shape[-2]))


gemv_op = torch.ops.jetmoe.gemv.default
gemv_silu_mul_op = torch.ops.jetmoe.gemv_silu_mul.default
gemv_combine_op = torch.ops.jetmoe.gemv_combine.default
int8_gemv_op = torch.ops.jetmoe.int8_gemv.default
