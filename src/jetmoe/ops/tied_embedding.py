"""An input embedding and an output head that share one weight, with one gradient buffer between them.

With tied weights, autograd gives the shared weight two gradients: the head's, a dense [vocab, hidden] product,
and the embedding's, which PyTorch builds as a zero-filled [vocab, hidden] tensor with the used rows added in;
the two are then summed into a third. For the "small" config (32000 x 1024 bf16) that is two fresh 65 MB buffers
and two passes over them in every training step, for a gradient that touches 1024 rows. Here the head's
backward hands its product to the embedding's backward of the same backward pass, which adds its rows into it
in place (`index_add_`) and returns nothing of its own: autograd still holds the head's tensor for the weight
and accumulates it as usual. Values: the same sums in another order (the embedding rows are added to the head's
gradient one by one instead of first to each other).

`TiedGradient` is made for one forward pass by the model and passed to both ends; the embedding's backward
only takes a product offered in its own backward pass (autograd's graph task id), so a backward that reaches
the embedding but not the head (or a second backward over a retained graph) gets the plain dense gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


class TiedGradient:
    """The head's weight gradient, offered to the embedding's backward of the same backward pass."""

    def __init__(self) -> None:
        self._task: int | None = None
        self._grad: torch.Tensor | None = None

    def offer(self, grad: torch.Tensor) -> None:
        self._task, self._grad = _graph_task(), grad

    def take(self) -> torch.Tensor | None:
        grad, task = self._grad, self._task
        self._task = self._grad = None
        return grad if task is not None and task == _graph_task() else None


class _Embedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, ids, padding_idx, shared):
        ctx.save_for_backward(ids)
        ctx.padding_idx, ctx.shared, ctx.weight_shape = padding_idx, shared, weight.shape
        return F.embedding(ids, weight, padding_idx)

    @staticmethod
    def backward(ctx, grad_out):
        (ids,) = ctx.saved_tensors
        ids, rows = ids.reshape(-1), grad_out.reshape(-1, grad_out.shape[-1])
        if ctx.padding_idx is not None:  # nn.Embedding gives the padding row no gradient
            rows = rows.masked_fill((ids == ctx.padding_idx)[:, None], 0)
        head_grad = ctx.shared.take()
        if head_grad is not None:
            head_grad.index_add_(0, ids, rows.to(head_grad.dtype))
            return None, None, None, None
        return rows.new_zeros(ctx.weight_shape).index_add_(0, ids, rows), None, None, None


class _Head(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, shared):
        ctx.save_for_backward(x, weight)
        ctx.shared = shared
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        grad_rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = (grad_rows @ weight).view(x.shape) if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = grad_rows.T @ x.reshape(-1, x.shape[-1])  # a fresh contiguous tensor autograd will own
            ctx.shared.offer(grad_weight)
        return grad_x, grad_weight, None


def embed(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, shared: TiedGradient) -> torch.Tensor:
    """`F.embedding(ids, weight, padding_idx)`, its weight gradient added into the head's (see above)."""
    return _Embedding.apply(weight, ids, padding_idx, shared)


def project(x: torch.Tensor, weight: torch.Tensor, shared: TiedGradient) -> torch.Tensor:
    """`F.linear(x, weight)` (the output head), offering its weight gradient to `embed`'s backward."""
    return _Head.apply(x, weight, shared)
