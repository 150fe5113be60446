"""An input embedding and an output head that share one weight, without a dense gradient for the embedding.

With tied weights, autograd gives the shared weight two gradients: the head's, a dense [vocab, hidden] product,
and the embedding's, which PyTorch builds as a zero-filled [vocab, hidden] tensor with the used rows added in;
the two are then summed into a third: two fresh vocab x hidden buffers and two passes over them in every
training step, for a gradient that touches only the batch's rows. Here the head's
backward returns its product as a fresh contiguous tensor, and the embedding's backward, when the head has
already given the weight that dense term in the same backward pass, returns its rows as a sparse gradient:
autograd adds them into the head's tensor in place (and the sum is dense, as optimizers need). Autograd does
the summing, so any other use of the weight (a penalty on it, say) is accounted as usual; at worst it sums out
of place. Values: the same sums in another order.

`TiedGradient` is made for one forward pass by the model and passed to both ends. It records the backward
pass (autograd's graph task id) in which the head's backward ran; a backward that reaches the embedding but
not the head, and any backward under create_graph, gets the plain dense gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _graph_task() -> int:
    return torch._C._current_graph_task_id()


class TiedGradient:
    """Remembers the backward pass (graph task) in which the head produced its dense weight gradient."""

    def __init__(self) -> None:
        self._task: int | None = None

    def head_done(self) -> None:
        self._task = _graph_task()

    def head_done_in_this_pass(self) -> bool:
        return self._task is not None and self._task == _graph_task()


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
        if ctx.shared.head_done_in_this_pass() and not torch.is_grad_enabled():  # not under create_graph
            # The weight's gradient already has the head's dense term in this pass: autograd adds these rows
            # to it (in place where it can), and the sum is dense.
            # (the ids were checked by F.embedding in forward)
            sparse = torch.sparse_coo_tensor(ids[None], rows, ctx.weight_shape, check_invariants=False)
            return sparse, None, None, None
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
            grad_weight = grad_rows.T @ x.reshape(-1, x.shape[-1])  # fresh and contiguous: summed into in place
            ctx.shared.head_done()
        return grad_x, grad_weight, None


def embed(ids: torch.Tensor, weight: torch.Tensor, padding_idx: int | None, shared: TiedGradient) -> torch.Tensor:
    """`F.embedding(ids, weight, padding_idx)`, its weight gradient sparse where the head's is there (see above)."""
    return _Embedding.apply(weight, ids, padding_idx, shared)


def project(x: torch.Tensor, weight: torch.Tensor, shared: TiedGradient) -> torch.Tensor:
    """`F.linear(x, weight)` (the output head); its backward tells `embed`'s that the dense term is there."""
    return _Head.apply(x, weight, shared)
