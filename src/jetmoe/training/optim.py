"""AdamW with weight decay only on the matrices that carry the model's capacity, and gradient clipping.

No decay for: norms and biases (1-D: decaying them only pulls scales and offsets towards 0) and the token
embedding (tied to the output head here; decaying it shrinks rare tokens' rows, which get few gradients).
Routers and expert weights are decayed like any projection.
"""

from __future__ import annotations

import torch
from torch import nn


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or "embed_tokens" in name or name.endswith("lm_head.weight")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen = set()
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        (no_decay if is_no_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _fused_adamw_ok(param: torch.Tensor) -> bool:
    """The fused AdamW kernel runs on CUDA, and on CPU for plain tensors (not FSDP2's sharded DTensors), where
    it is much faster than the default per-tensor loop (docs/performance.md)."""
    if param.is_cuda:
        return True
    return param.device.type == "cpu" and type(param.data) is torch.Tensor


def build_optimizer(model: nn.Module, config) -> torch.optim.AdamW:
    groups = [g for g in parameter_groups(model, config.weight_decay) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    fused = all(_fused_adamw_ok(p) for g in groups for p in g["params"])
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), eps=config.adam_eps, fused=fused or None
    )


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm (over all ranks under FSDP); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    meshes = {}
    for p in params:
        meshes.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if len(meshes) > 1:  # expert parallelism: the experts' DTensors live on another mesh than the dense ones
        return _clip_over_meshes(list(meshes.values()), max_norm)
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)


def _clip_over_meshes(groups: list[list[torch.Tensor]], max_norm: float) -> float:
    """The global norm from each mesh's own (full) norm, then every gradient scaled as clip_grad_norm_ does."""
    norms = []
    for group in groups:
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
    total = float(torch.stack([n.double() for n in norms]).norm())
    if max_norm > 0:
        scale = min(1.0, max_norm / (total + 1e-6))
        if scale < 1.0:
            for group in groups:
                torch._foreach_mul_([p.grad for p in group], scale)
    return total
