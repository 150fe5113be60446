"""Row moves between token order, slot order and the expert-grouped order of a routing plan.

All of them are gathers, forward and backward. The obvious `index_add`/`index_copy` formulations scatter, and
a bf16 scatter-add on CPU is many times slower than a gather of the same rows. The gathers are `index_select`,
faster than the same gather written `x[index]`, with the same values (docs/performance.md).
"""

from __future__ import annotations

import torch


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.index_select(0, index)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return _gather(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return _gather(grad, inverse), None, None


class _RepeatRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.repeats = repeats
        return _gather(x, index)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        grad_slots = _gather(grad, inverse)
        return sum_slots(grad_slots.view(-1, ctx.repeats, grad.shape[-1])), None, None, None


def _needs_autograd(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def permute_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """`x[index]` for a permutation `index` whose inverse permutation is `inverse`."""
    # Without autograd the Function's bookkeeping is pure overhead, paid at every call while decoding.
    return _PermuteRows.apply(x, index, inverse) if _needs_autograd(x) else _gather(x, index)


def permute_rows_reference(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    return x[index]


def repeat_rows(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int) -> torch.Tensor:
    """`x[index]` where `index` holds every row of x exactly `repeats` times: index = slot_order // repeats
    for a permutation `slot_order` of the repeated rows, with inverse permutation `inverse`."""
    return _RepeatRows.apply(x, index, inverse, repeats) if _needs_autograd(x) else _gather(x, index)


def repeat_rows_reference(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor, repeats: int) -> torch.Tensor:
    return x[index]


def sum_slots(t: torch.Tensor) -> torch.Tensor:
    """[N, k, D] -> [N, D]: each token's k slot rows summed. For k = 2 an add of the two halves: the same values
    as `.sum(1)` (one rounding either way), faster on CPU (a middle-dimension reduction of size 2 is a slow case
    of the reduction kernel; docs/performance.md)."""
    if t.shape[1] == 2:
        first, second = t.unbind(1)  # unbind: its backward is one stack, where select's zero-fills k copies
        return first + second
    return t.sum(1)

