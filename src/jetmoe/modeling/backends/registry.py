"""Which backend serves a device: registered by name, chosen in one place, visible."""

from __future__ import annotations

import contextlib
import importlib
import logging
import os

import torch

from .base import Backend

logger = logging.getLogger("jetmoe.backends")

# The built-in backends, imported when first used: "module:Class" within this package.
_BUILTIN = {
    "torch": ".base:Backend",
    "cpu": ".kernels:CpuBackend",
    "cuda": ".kernels:CudaBackend",
}
# Each device type's default backend; a device type not listed gets the PyTorch reference.
DEVICE_DEFAULTS = {"cpu": "cpu", "cuda": "cuda"}
ENV_VARIABLE = "JETMOE_BACKEND"

_registered: dict[str, Backend] = {}
_forced: list[str | None] = [None]  # use_backend's names, innermost last ("": each device's default)
_by_device: dict[str, Backend] = {}  # the choice per device type, made once (reset when the choice changes)


class BackendError(ValueError):
    pass


def register_backend(backend: Backend) -> Backend:
    """Make `backend` selectable by its `name` (`use_backend`, JETMOE_BACKEND); a name already taken is replaced."""
    if not isinstance(backend, Backend):
        raise BackendError(f"a backend must be a jetmoe Backend instance, got {type(backend).__name__}")
    _registered[backend.name] = backend
    _by_device.clear()
    return backend


def backend_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_registered))


def _named(name: str) -> Backend:
    if name not in _registered:
        if name not in _BUILTIN:
            raise BackendError(f"unknown jetmoe backend {name!r}; registered: {', '.join(backend_names())}")
        module, cls = _BUILTIN[name].split(":")
        _registered[name] = getattr(importlib.import_module(module, __package__), cls)()
    return _registered[name]


def _choose(device_type: str) -> Backend:
    forced = _forced[-1]
    if forced is None:  # no use_backend block: the environment may name one
        forced = os.environ.get(ENV_VARIABLE) or None
    backend = _named(forced or DEVICE_DEFAULTS.get(device_type, "torch"))
    if not backend.supports(torch.device(device_type)):
        raise BackendError(f"jetmoe backend {backend.name!r} does not run on {device_type} tensors")
    logger.debug("jetmoe backend for %s tensors: %s", device_type, backend.name)
    return backend


def backend_for(tensor: torch.Tensor) -> Backend:
    """The backend that runs the operations on `tensor`'s device."""
    backend = _by_device.get(tensor.device.type)
    return backend if backend is not None else _settle(tensor.device.type)


def selected_backend(device: str | torch.device = "cpu") -> str:
    """The name of the backend that serves `device` now (what `jetmoe env` and `generate --stats` show)."""
    device_type = torch.device(device).type
    return (_by_device.get(device_type) or _settle(device_type)).name


def _settle(device_type: str) -> Backend:
    """Choose the backend of a device type once (JETMOE_BACKEND is read then) and keep the choice."""
    backend = _by_device[device_type] = _choose(device_type)
    return backend


@contextlib.contextmanager
def use_backend(name: str | None):
    """Within the block, `name` serves every device (None: each device's default, JETMOE_BACKEND ignored)."""
    if name is not None:
        _named(name)  # an unknown name fails here, not at the first operation
    _forced.append(name if name is not None else "")
    _by_device.clear()
    try:
        yield
    finally:
        _forced.pop()
        _by_device.clear()
