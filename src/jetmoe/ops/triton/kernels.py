"""Triton kernels over the grouped (sorted-by-expert) row order. Needs triton; tensors only, no modules.

Two kernels:
- `_rows_matmul`: C[c_row(i)] = gate_i * (A[a_row(i)] @ B_e(i)) for every grouped row i, where B_e is expert
  e's weight seen through strides (W[e].T for the forward, W[e] for the input gradient). Rows are read and
  written through index arrays (or in place when grouped), so activations are never gathered into a copy.
  Optionally it also emits the gate gradient's partial dot products against a third row source.
- `_weight_grad`: dW[e] = sum over rows i of expert e of (gate_i * DY[dy_row(i)])^T X[x_row(i)].

Each `_rows_matmul` program owns BLOCK_M rows of ONE expert and BLOCK_N output columns. The rows a program
owns come from a block table built on the device from `expert_ends` (no host sync): expert e contributes
ceil(count_e / BLOCK_M) blocks, and the grid is sized by the host-known bound ceil(L / BLOCK_M) + E, the spare
blocks being empty (they return at once).

Under TRITON_INTERPRET=1 (set before triton is first imported: triton builds its own language library for the
interpreter or the compiler at import) the kernels run in triton's interpreter, on CPU tensors too.
"""

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class Blocks:
    """Tile sizes (all powers of two, at least 16 for tl.dot) and launch settings."""

    m: int = 64  # grouped rows per program
    n: int = 128  # output columns per program
    k: int = 64  # reduction step
    warps: int = 4
    stages: int = 3


@triton.jit
def _rows_matmul(
    A, B, C, table_ptr, a_rows_ptr, c_rows_ptr, gates_ptr, G, g_rows_ptr, dgate_ptr,
    num_blocks, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn, stride_gm, stride_gn,
    stride_dgate,
    A_INDEXED: tl.constexpr, C_INDEXED: tl.constexpr, G_INDEXED: tl.constexpr,
    HAS_GATES: tl.constexpr, DGATE: tl.constexpr, INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(table_ptr + pid_m).to(tl.int64)
    start = tl.load(table_ptr + num_blocks + pid_m)
    end = tl.load(table_ptr + 2 * num_blocks + pid_m)
    if start >= end:  # a spare block of the padded grid
        return

    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    if A_INDEXED:
        a_rows = tl.load(a_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        a_rows = rows.to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = A + a_rows[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptrs = B + expert * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks < K - k0
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_FP32:
            a, b = a.to(tl.float32), b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk

    if DGATE:  # d gate_i = <ungated product row i, G row>, summed over this program's columns only
        if G_INDEXED:
            g_rows = tl.load(g_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            g_rows = rows.to(tl.int64)
        g_ptrs = G + g_rows[:, None] * stride_gm + cols[None, :] * stride_gn
        g_tile = tl.load(g_ptrs, mask=row_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        tl.store(dgate_ptr + pid_n * stride_dgate + rows, tl.sum(acc * g_tile, axis=1), mask=row_mask)
    if HAS_GATES:
        acc = acc * tl.load(gates_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]

    if C_INDEXED:
        c_rows = tl.load(c_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
    else:
        c_rows = rows.to(tl.int64)
    c_ptrs = C + c_rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _weight_grad(
    DY, X, DW, ends_ptr, dy_rows_ptr, x_rows_ptr, gates_ptr,
    N, K,
    stride_dym, stride_dyn, stride_xm, stride_xk, stride_dwe, stride_dwn, stride_dwk,
    DY_INDEXED: tl.constexpr, X_INDEXED: tl.constexpr, HAS_GATES: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    expert = tl.program_id(0)
    pid = tl.program_id(1)
    tiles_k = tl.cdiv(K, BLOCK_K)
    cols_n = (pid // tiles_k) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_k = (pid % tiles_k) * BLOCK_K + tl.arange(0, BLOCK_K)
    n_mask = cols_n < N
    k_mask = cols_k < K
    start = tl.load(ends_ptr + expert - 1, mask=expert > 0, other=0)
    end = tl.load(ends_ptr + expert)

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):  # an empty expert runs no step and stores zeros
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        if DY_INDEXED:
            dy_rows = tl.load(dy_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            dy_rows = rows.to(tl.int64)
        if X_INDEXED:
            x_rows = tl.load(x_rows_ptr + rows, mask=row_mask, other=0).to(tl.int64)
        else:
            x_rows = rows.to(tl.int64)
        dy = tl.load(DY + dy_rows[:, None] * stride_dym + cols_n[None, :] * stride_dyn,
                     mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_GATES:
            gate = tl.load(gates_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
            dy = (dy.to(tl.float32) * gate[:, None]).to(DY.dtype.element_ty)
        x = tl.load(X + x_rows[:, None] * stride_xm + cols_k[None, :] * stride_xk,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if DOT_FP32:
            dy, x = dy.to(tl.float32), x.to(tl.float32)
        acc = tl.dot(tl.trans(dy), x, acc, input_precision=INPUT_PRECISION)

    dw_ptrs = DW + expert.to(tl.int64) * stride_dwe + cols_n[:, None] * stride_dwn + cols_k[None, :] * stride_dwk
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=n_mask[:, None] & k_mask[None, :])


# triton.jit returns an interpreted function instead of a JITFunction under TRITON_INTERPRET=1.
INTERPRETED = not isinstance(_rows_matmul, triton.JITFunction)


def _dot_fp32(dtype: torch.dtype) -> bool:
    # triton's interpreter multiplies bfloat16 operands as raw bit patterns (triton-lang/triton#11584; bf16
    # arithmetic is unsupported there), so under it the operands are upcast first. That is the same math
    # the GPU does: bf16 products are exact in fp32 and the sum accumulates in fp32 either way.
    return dtype == torch.bfloat16 and INTERPRETED


def _input_precision(dtype: torch.dtype) -> str:
    # fp32 products follow torch's own switch for F.linear on CUDA (TF32 off by default); others ignore it.
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def block_table(expert_ends: torch.Tensor, num_rows: int, block_m: int) -> torch.Tensor:
    """int32 [3, ceil(num_rows / block_m) + E]: per program, its expert, first row and end row (grouped order).

    Expert e's rows [ends[e-1], ends[e]) are cut into ceil(count / block_m) blocks; blocks past the last
    expert's are spare (start == end). Built with device ops only.
    """
    num_experts = expert_ends.shape[0]
    ends = expert_ends.long()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    blocks = (ends - starts + block_m - 1) // block_m
    block_ends = blocks.cumsum(0)
    num_blocks = triton.cdiv(num_rows, block_m) + num_experts
    block = torch.arange(num_blocks, device=ends.device)
    expert = torch.searchsorted(block_ends, block, right=True)
    valid = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    first = starts[expert] + (block - (block_ends[expert] - blocks[expert])) * block_m
    first = torch.where(valid, first, 0)
    end = torch.where(valid, torch.minimum(first + block_m, ends[expert]), 0)
    return torch.stack([expert, first, end]).to(torch.int32)


def rows_matmul(
    a: torch.Tensor,
    weight: torch.Tensor,
    transpose_weight: bool,
    table: torch.Tensor,
    num_rows: int,
    a_rows: torch.Tensor | None,
    out: torch.Tensor,
    out_rows: torch.Tensor | None,
    gates: torch.Tensor | None,
    blocks: Blocks,
    dgate_source: torch.Tensor | None = None,
    dgate_rows: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """out[out_rows[i]] = gates[i] * (a[a_rows[i]] @ op(weight[e_i])), op = transpose or identity.

    An index of None means the grouped row itself. With `dgate_source`, also returns the partial gate
    gradients [column tiles, L] (fp32) of <ungated product row i, dgate_source[dgate_rows[i]]>.
    """
    # B_e[k, n] must be weight[e].T (weight [E, N, K]) or weight[e] (weight [E, K, N]).
    if transpose_weight:
        n, k = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(2), weight.stride(1)
    else:
        k, n = weight.shape[1], weight.shape[2]
        stride_bk, stride_bn = weight.stride(1), weight.stride(2)
    num_blocks = table.shape[1]
    tiles_n = triton.cdiv(n, blocks.n)
    partial = None
    if dgate_source is not None:
        partial = torch.zeros(tiles_n, num_rows, device=a.device, dtype=torch.float32)
    dummy = table  # stands in for pointers a constexpr flag switches off
    g = dgate_source if dgate_source is not None else a
    _rows_matmul[(num_blocks, tiles_n)](
        a, weight, out, table,
        dummy if a_rows is None else a_rows,
        dummy if out_rows is None else out_rows,
        dummy if gates is None else gates,
        g,
        dummy if dgate_rows is None else dgate_rows,
        dummy if partial is None else partial,
        num_blocks, n, k,
        a.stride(0), a.stride(1), weight.stride(0), stride_bk, stride_bn, out.stride(0), out.stride(1),
        g.stride(0), g.stride(1), num_rows,
        A_INDEXED=a_rows is not None, C_INDEXED=out_rows is not None, G_INDEXED=dgate_rows is not None,
        HAS_GATES=gates is not None, DGATE=partial is not None, INPUT_PRECISION=_input_precision(a.dtype),
        DOT_FP32=_dot_fp32(a.dtype),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )
    return partial


def weight_grad(
    grad_rows: torch.Tensor,
    grad_index: torch.Tensor | None,
    x: torch.Tensor,
    x_index: torch.Tensor | None,
    gates: torch.Tensor | None,
    expert_ends: torch.Tensor,
    weight_shape: torch.Size,
    blocks: Blocks,
) -> torch.Tensor:
    """dW [E, N, K] with dW[e] = sum_{i in e} (gates[i] * grad_rows[grad_index[i]])^T x[x_index[i]]."""
    num_experts, n, k = weight_shape
    dw = torch.empty(weight_shape, device=x.device, dtype=x.dtype)
    dummy = expert_ends
    grid = (num_experts, triton.cdiv(n, blocks.n) * triton.cdiv(k, blocks.k))
    _weight_grad[grid](
        grad_rows, x, dw, expert_ends,
        dummy if grad_index is None else grad_index,
        dummy if x_index is None else x_index,
        dummy if gates is None else gates,
        n, k,
        grad_rows.stride(0), grad_rows.stride(1), x.stride(0), x.stride(1),
        dw.stride(0), dw.stride(1), dw.stride(2),
        DY_INDEXED=grad_index is not None, X_INDEXED=x_index is not None, HAS_GATES=gates is not None,
        INPUT_PRECISION=_input_precision(x.dtype), DOT_FP32=_dot_fp32(x.dtype),
        BLOCK_M=blocks.m, BLOCK_N=blocks.n, BLOCK_K=blocks.k,
        num_warps=blocks.warps, num_stages=blocks.stages,
    )
    return dw
