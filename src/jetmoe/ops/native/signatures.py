"""The C kernels' signatures, declared once: name -> (return type, argument types), in the order of the C
declarations in gemv.c, elementwise.c and decode.c."""

from __future__ import annotations

import ctypes

_p, _i64, _int, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _args(spec: str) -> list:
    """'p' pointer, 'i' int64, 'c' int (dtype codes, flags, thread counts), 'f' float."""
    return [{"p": _p, "i": _i64, "c": _int, "f": _f32}[code] for code in spec.split()]


_RETURNING_INT = {
    # gemv.c
    "jetmoe_gemv": "p i i p p i p c c",
    "jetmoe_gemv_silu_mul": "p i i p p i p i p c c",
    "jetmoe_gemv_combine": "p i i p p i p p p i i p c c",
    "jetmoe_int8_gemv": "p p c i i p c i p i p c c",
    # elementwise.c
    "jetmoe_rms_norm": "p p p p i i f c c",
    "jetmoe_rms_norm_backward": "p p p p p p i i c c",
    "jetmoe_silu_mul": "p p i i c c",
    "jetmoe_silu_mul_backward": "p p p i i c c",
    "jetmoe_rotary": "p i i i p p i p i i i i c c c",
    "jetmoe_combine": "p p p p p i i i c c",
    "jetmoe_combine_backward": "p p p p p p i i i c c",
    "jetmoe_logsumexp_rows": "p i p i i c c",
    "jetmoe_cross_entropy_backward": "p i p p p p i i c c",
    "jetmoe_transpose16": "p i i i p i i c",
    "jetmoe_causal_attention_probs": "p p p i i i i f c c",
    "jetmoe_causal_attention_score_grad": "p p p p p i i i i f c c",
    # decode.c
    "jetmoe_decode_attention_in": "p i i i p f p i i p p p p i i p p i p p p p p p c c",
    "jetmoe_decode_attention_out": "p i i i p i p p p p p p f p i p p i p p p p p p c c",
    "jetmoe_softmax_sorted": "p i i p",
    "jetmoe_route_logits": "p i i i p p c",
    "jetmoe_decode_attention": "p p p p i i i p c i i p p i i i i i i f p i p i p c c",
    "jetmoe_decode_layers": "p i i p i i i i i i i p p i p c i i p p p p p p p c c",
}

SIGNATURES: dict[str, tuple[object, list]] = {
    name: (ctypes.c_int, _args(spec)) for name, spec in _RETURNING_INT.items()
} | {"jetmoe_level": (ctypes.c_char_p, []), "jetmoe_set_aten_lanes": (None, [_int])}
