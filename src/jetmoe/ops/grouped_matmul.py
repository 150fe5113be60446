"""Grouped expert matmul: rows sorted by expert, each group multiplied by its own weight.

`grouped_linear(x, weight, offsets)` computes, for every expert e, `x[start_e:end_e] @ weight[e].T`, where the
rows of `x` are already grouped by expert and `offsets[e]` is the end row of group e (an int32 cumulative sum
that stays on the device). The result equals a per-expert loop of `F.linear`: each output element is one
fp32-accumulated dot product rounded once (bit for bit in fp32; in bf16 a kernel may order the additions
differently, within a rounding).

Paths, picked per call by `_grouped_linear_impl` (the measurements behind each choice: docs/performance.md):
- CPU, bf16/fp16: a loop over the experts with bucketed row counts and a matrix-vector product for one-row
  groups (see the section below: oneDNN compiles a kernel per new shape); when every group has at most
  WEIGHT_FIRST_MAX_ROWS rows and most experts have some (batched decoding), one `bmm` over zero-padded groups.
- `torch.nn.functional.grouped_mm`: one call for all experts, no host sync (on CPU in fp32 it beats a loop of
  `F.linear`, and gathering each row's expert weight for a `bmm` is slower still). Needs 16-byte aligned row
  strides and a dtype the device's kernel accepts.
- `triton` (CUDA, dtypes grouped_mm lacks there, e.g. fp32): the kernels of `ops/triton` in grouped mode.
  For bf16 on CUDA `grouped_mm` is faster (benchmarks/triton_experts.py), so it stays first there.
- `loop`: `F.linear` per expert on host-known group sizes; the fallback for any other case.

`slot_linear(x, weight, slot_experts)` is the few-token counterpart (routing's few-token plans, CPU decoding):
the rows stay in their own order and a few host ints name each row's expert, so nothing is sorted or moved.

All run inside the custom op `jetmoe::grouped_linear` (eager inference calls the implementation directly),
whose shape function is all torch.compile sees: a compiled model traces through it with no graph break and
no host sync, whatever path runs underneath (the fake kernel torch ships for `aten._grouped_mm` accepts bf16
only, so calling it directly would not trace fp32). Its backward is two more grouped products: dX with the
transposed weights, and dW per expert.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import cpu_bf16, native
from .native import elementwise as native_elementwise

_GROUPED_MM_DTYPES = {
    "cpu": (torch.float32, torch.bfloat16, torch.float16),
    "cuda": (torch.bfloat16,),
}


def _row_bytes_aligned(*sizes_and_tensor) -> bool:
    *sizes, t = sizes_and_tensor
    return all(size * t.element_size() % 16 == 0 for size in sizes)


def _grouped_mm_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        hasattr(F, "grouped_mm")
        and a.dtype == b.dtype
        and a.dtype in _GROUPED_MM_DTYPES.get(a.device.type, ())
    )


def _triton_ok(t: torch.Tensor) -> bool:
    if t.device.type != "cuda":
        return False
    from .triton import TRITON_AVAILABLE

    return TRITON_AVAILABLE


def _group_bounds(offsets: torch.Tensor) -> list[tuple[int, int]]:
    ends = offsets.tolist()
    return list(zip([0] + ends[:-1], ends))


def grouped_linear_reference(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Obviously correct version: split by group size and apply each expert's weight with F.linear."""
    outputs = [F.linear(x[start:end], weight[e]) for e, (start, end) in enumerate(_group_bounds(offsets))]
    return torch.cat(outputs, dim=0)


def grouped_weight_grad_reference(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = grad_out[group e].T @ x[group e], stacked to [E, out, in]."""
    return torch.stack([grad_out[start:end].T @ x[start:end] for start, end in _group_bounds(offsets)])


# --- CPU, bf16/fp16: oneDNN builds a kernel for every new row count ------------------------------------------
#
# oneDNN JIT-compiles a matmul kernel the first time it sees a shape, which costs several times the product
# itself, and an expert's row count changes with every routing decision. Rounding each group's rows up to a
# multiple of EXPERT_BUCKET_ROWS keeps the set of shapes small (a handful per layer shape, all warm after a step
# or two), for at most EXPERT_BUCKET_ROWS - 1 wasted rows per expert. fp32 goes through MKL, which needs no
# per-shape kernel. Groups of one row (decoding) use a matrix-vector product, which reads bf16 weights faster
# than a one-row matmul (docs/performance.md).

EXPERT_BUCKET_ROWS = 64
# A few rows (batched decoding) run faster as weight @ rows.T than as rows @ weight.T (docs/performance.md).
WEIGHT_FIRST_MAX_ROWS = 16
_ONEDNN_DTYPES = (torch.bfloat16, torch.float16)


def _bucketed(rows: int) -> int:
    """Row count to compute: exact up to one bucket (few shapes there), else the next multiple of a bucket."""
    return rows if rows <= EXPERT_BUCKET_ROWS else -(-rows // EXPERT_BUCKET_ROWS) * EXPERT_BUCKET_ROWS


def _padded_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """t [n, d] followed by zero rows up to `rows` (F.pad would first fill all of it, then copy t in)."""
    padded = t.new_empty(rows, t.shape[1])
    padded[: t.shape[0]].copy_(t)
    padded[t.shape[0] :].zero_()
    return padded


def _cpu_lowp_few_rows(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [r, in] @ weight.T for 1 <= r <= WEIGHT_FIRST_MAX_ROWS: a matrix-vector product, or weight-first."""
    if x.shape[0] == 1:
        return torch.mv(weight, x[0])[None]
    return (weight @ x.T).T


def _cpu_lowp_padded_bmm(
    x: torch.Tensor, weight: torch.Tensor, bounds: list[tuple[int, int]], rows: int
) -> torch.Tensor:
    """Few rows per expert and most experts in use (batched decoding): every group padded with zero rows to
    `rows`, all experts in one weight-first `bmm`: faster than the loop (docs/performance.md), same values (the
    zero rows add nothing). Activations are what gets padded: a few rows, while the weights are read once, in
    place."""
    num_experts, in_features = weight.shape[0], weight.shape[2]
    padded_row = [e * rows + i for e, (start, end) in enumerate(bounds) for i in range(end - start)]
    index = torch.tensor(padded_row, device=x.device)
    padded = x.new_zeros(num_experts * rows, in_features).index_copy_(0, index, x)
    products = torch.bmm(weight, padded.view(num_experts, rows, in_features).transpose(1, 2))  # [E, out, rows]
    return products.transpose(1, 2).reshape(num_experts * rows, -1).index_select(0, index)


# Up to this many rows in all (a decoding batch of up to 8 with top-2), bf16 and fp32 products go through
# jetmoe's C kernel (ops/native) in one call (fp32: MKL's products of a few rows read the weights slower). In
# bf16 its cost grows with each row (AVX-512 dot products) where oneDNN's bmm (AMX) hardly notices a few more,
# so larger batches keep the padded bmm. fp32 prompts keep MKL's products, the reference's, for its logits bit
# for bit, although the kernel is faster there too (docs/performance.md).
EXPERT_GEMV_MAX_ROWS = 16


def _cpu_lowp_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """out[group e] = x[group e] @ weight[e].T, each group computed on a bucketed row count.

    The extra rows of a group are the next groups' rows (real values, so no NaN can appear): their results
    land in the next groups' output rows, which those groups overwrite afterwards, as groups run in order.
    Only a group whose bucket runs past the last row is computed on a zero-padded copy.
    """
    total = x.shape[0]
    bounds = _group_bounds(offsets)
    counts = [end - start for start, end in bounds]
    if max(counts, default=0) <= WEIGHT_FIRST_MAX_ROWS and 4 * sum(map(bool, counts)) >= 3 * len(counts):
        return _cpu_lowp_padded_bmm(x, weight, bounds, max(counts))
    out = x.new_empty(total, weight.shape[1])
    for e, (start, end) in enumerate(bounds):
        rows = end - start
        if rows == 0:
            continue
        if rows <= WEIGHT_FIRST_MAX_ROWS:
            out[start:end] = _cpu_lowp_few_rows(x[start:end], weight[e])
            continue
        padded = _bucketed(rows)
        if start + padded <= total:
            torch.mm(x[start : start + padded], weight[e].T, out=out[start : start + padded])
        else:
            out[start:end] = (_padded_rows(x[start:end], padded) @ weight[e].T)[:rows]
    return out


# A weight gradient sums over a group's rows: grad_out[group].T @ x[group]. Up to this many rows oneDNN runs that
# product faster with the transposed gradient as a contiguous [out, rows] matrix than as a transposed view (bit
# for bit the same sums); over more rows the two are even or the view wins (docs/performance.md).
CONTIGUOUS_GRAD_MAX_ROWS = 1024


def _transposed(rows: torch.Tensor, padded: int) -> torch.Tensor:
    """F.pad(rows.T, (0, padded - len(rows))), contiguous: jetmoe's C transpose where it is built (PyTorch's
    strided copy is slow enough to matter next to the product itself: docs/performance.md)."""
    if native.available():
        return native_elementwise.transposed(rows, padded)
    return F.pad(rows.T, (0, padded - rows.shape[0]))


def _cpu_lowp_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """dW[e] = grad_out[group e].T @ x[group e], each sum over a bucketed row count.

    The extra rows are zero rows in both operands (zero-padded copies), so they add exactly nothing.
    """
    out = x.new_empty(offsets.shape[0], grad_out.shape[1], x.shape[1])
    for e, (start, end) in enumerate(_group_bounds(offsets)):
        rows = end - start
        padded = _bucketed(rows)
        if rows == 0:
            out[e].zero_()
        elif padded <= CONTIGUOUS_GRAD_MAX_ROWS:
            grad_t = _transposed(grad_out[start:end], padded)  # [out, padded], contiguous
            torch.mm(grad_t, _padded_rows(x[start:end], padded), out=out[e])
        elif padded == rows:
            torch.mm(grad_out[start:end].T, x[start:end], out=out[e])
        else:
            torch.mm(_padded_rows(grad_out[start:end], padded).T, _padded_rows(x[start:end], padded), out=out[e])
    return out


def _upcast_grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """bf16 groups in fp32 (ops/cpu_bf16.py): each expert's weight widened while its group is multiplied."""
    out = torch.empty(x.shape[0], weight.shape[1], dtype=torch.float32)
    for e, (start, end) in enumerate(_group_bounds(offsets)):
        if end > start:
            torch.mm(x[start:end].float(), weight[e].float().T, out=out[start:end])
    return out.to(x.dtype)


def _use_cpu_lowp(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == weight.dtype and x.dtype in _ONEDNN_DTYPES


def _grouped_linear_impl(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    x = x.contiguous()
    out_features, in_features = weight.shape[1], weight.shape[2]
    if x.shape[0] <= EXPERT_GEMV_MAX_ROWS and native.gemv_ok(x, weight):  # decoding: one call
        return native.gemv(x, weight, native.ends_groups([end for _, end in _group_bounds(offsets)]))
    if _use_cpu_lowp(x, weight):
        return _cpu_lowp_grouped_linear(x, weight, offsets)
    if _grouped_mm_ok(x, weight) and _row_bytes_aligned(in_features, out_features, x):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if _triton_ok(x):
        from .triton import scattered_experts

        return scattered_experts(x, weight, None, offsets, None, grouped_in=True, grouped_out=True)
    return grouped_linear_reference(x, weight, offsets)


@torch.library.custom_op("jetmoe::grouped_linear", mutates_args=())
def _grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    return _grouped_linear_impl(x, weight, offsets)


@_grouped_linear.register_fake
def _(x, weight, offsets):
    return x.new_empty((x.shape[0], weight.shape[1]))


@torch.library.custom_op("jetmoe::grouped_weight_grad", mutates_args=())
def _grouped_weight_grad(grad_out: torch.Tensor, x: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    grad_out, x = grad_out.contiguous(), x.contiguous()
    if _use_cpu_lowp(x, grad_out):
        return _cpu_lowp_weight_grad(grad_out, x, offsets)
    if _grouped_mm_ok(grad_out, x) and _row_bytes_aligned(grad_out.shape[1], x.shape[1], x.shape[0], x):
        return F.grouped_mm(grad_out.T, x, offs=offsets)
    if _triton_ok(x):
        from .triton.kernels import Blocks, weight_grad

        shape = torch.Size((offsets.shape[0], grad_out.shape[1], x.shape[1]))
        return weight_grad(grad_out, None, x, None, None, offsets, shape, Blocks())
    return grouped_weight_grad_reference(grad_out, x, offsets)


@_grouped_weight_grad.register_fake
def _(grad_out, x, offsets):
    return x.new_empty((offsets.shape[0], grad_out.shape[1], x.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight, offsets = inputs
    ctx.save_for_backward(x, weight, offsets)


def _backward(ctx, grad_out):
    x, weight, offsets = ctx.saved_tensors
    grad_x = _grouped_linear(grad_out, weight.transpose(1, 2), offsets) if ctx.needs_input_grad[0] else None
    grad_w = _grouped_weight_grad(grad_out, x, offsets) if ctx.needs_input_grad[1] else None
    return grad_x, grad_w, None


_grouped_linear.register_autograd(_backward, setup_context=_setup_context)


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Rows of `x` [M, in] grouped by expert (group e ends at `offsets[e]`), weight [E, out, in] -> [M, out]."""
    if torch.is_autocast_enabled(x.device.type):
        # The custom op is opaque to autocast (its backward would mix a bf16 gradient with fp32 weights):
        # cast here, as autocast casts F.linear's operands; the cast is differentiable, so fp32 weights get grads.
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight = x.to(dtype), weight.to(dtype)
    if not torch.compiler.is_compiling() and not (
        torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    ):
        # Eager inference: skip the custom op's dispatch, a measurable part of a decode step
        # (docs/performance.md); it is only needed for autograd and for torch.compile to trace through.
        if _use_cpu_lowp(x, weight) and cpu_bf16.upcast(x, x.shape[0]):  # a bf16 prompt where bf16 is emulated
            return _upcast_grouped_linear(x.contiguous(), weight, offsets)  # in fp32 (ops/cpu_bf16.py)
        return _grouped_linear_impl(x, weight, offsets)
    return _grouped_linear(x, weight, offsets)


# --- few tokens, rows in slot order (routing.FEW_SLOTS: decoding on CPU) ------------------------------------


def slot_products(x: torch.Tensor, slot_experts: tuple[int, ...], out_features: int, product) -> torch.Tensor:
    """out[s] = row s of x through expert slot_experts[s]: `product(rows, e)` maps the rows [r, in] of expert e
    to [r, out]. Rows stay in their own order (no sort); a few host ints say which rows each expert takes.

    Under torch.compile the ints are symbolic (see routing.use_few_token_plan): they cannot be grouped by value,
    so every slot gets its own product (an expert chosen twice is read twice; at most a few slots)."""
    if torch.compiler.is_compiling() or len(set(slot_experts)) == len(slot_experts):
        # Also when every expert takes one row (always so for one token: its k choices differ): 5 ops a
        # slot instead of the 8 of writing each into a preallocated output.
        return torch.cat([product(x[slot : slot + 1], expert) for slot, expert in enumerate(slot_experts)])
    rows_of: dict[int, list[int]] = {}
    for slot, expert in enumerate(slot_experts):
        rows_of.setdefault(expert, []).append(slot)
    out = x.new_empty(x.shape[0], out_features)
    for expert, rows in rows_of.items():
        if len(rows) == 1:
            out[rows[0]] = product(x[rows[0] : rows[0] + 1], expert)[0]
        else:
            out[rows] = product(x[rows], expert)
    return out


def slot_linear(x: torch.Tensor, weight: torch.Tensor, slot_experts: tuple[int, ...]) -> torch.Tensor:
    """Row s of x [S, in] times weight[slot_experts[s]].T -> [S, out], for few rows in inference (no autograd).

    Each expert's rows go through the product grouped_linear would use for a group of that many rows, so the
    two agree bit for bit on CPU in bf16, fp16, and fp32 where jetmoe's kernel runs (elsewhere, F.linear per
    expert)."""
    if len(slot_experts) != x.shape[0]:
        raise ValueError(f"slot_linear: {x.shape[0]} rows but {len(slot_experts)} slot experts")
    if x.shape[0] <= EXPERT_GEMV_MAX_ROWS and native.gemv_ok(x, weight):
        return native.gemv(x, weight, native.slot_groups(slot_experts))
    if _use_cpu_lowp(x, weight) and x.shape[0] <= WEIGHT_FIRST_MAX_ROWS:
        return slot_products(x, slot_experts, weight.shape[1], lambda rows, e: _cpu_lowp_few_rows(rows, weight[e]))
    return slot_products(x, slot_experts, weight.shape[1], lambda rows, e: F.linear(rows, weight[e]))

