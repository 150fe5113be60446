"""The seam between the model and its kernels: named operations, implemented by backends.

The model's modules call `backend_for(tensor)` and then that backend's operations (RMSNorm, rotary, the GLU,
expert products over a routing plan, the gated sum, attention over shared K/V, and a whole decoder step where
a backend offers one); they never name a kernel. A backend is a `Backend` subclass registered by name. Which
backend serves a device is decided here only: `use_backend(name)` or the `JETMOE_BACKEND` variable names one
for every device; otherwise the device type picks its default ("cpu": jetmoe's C kernels and oneDNN, "cuda":
Triton and grouped_mm, any other: the PyTorch reference "torch").
"""

from .base import Backend
from .registry import (
    DEVICE_DEFAULTS,
    BackendError,
    backend_for,
    backend_names,
    register_backend,
    selected_backend,
    use_backend,
)

__all__ = [
    "Backend",
    "BackendError",
    "DEVICE_DEFAULTS",
    "backend_for",
    "backend_names",
    "register_backend",
    "selected_backend",
    "use_backend",
]
