"""Loading a checkpoint into a model: transformers' loader, checked, then the weights placed in memory.

Checks (transformers' loader itself only logs what it re-initialised randomly):
  - a tensor whose shape differs from the model's is an error naming the key and both shapes, unless
    `ignore_mismatched_sizes=True` (transformers' option: such tensors start fresh and are listed under
    `mismatched_keys`);
  - a model weight the checkpoint lacks is an error naming the key, unless the caller asks for the report
    (`output_loading_info=True`: the model loads, the missing weights start fresh and are listed under
    `missing_keys`, as transformers does). A weight tied to one that is loaded (lm_head with tied
    embeddings) is not missing, and neither is a head that starts fresh by design (the classifier's `score`
    on a causal-LM checkpoint, `fresh_head_prefixes`).
Keys the model does not have are reported under `unexpected_keys`, never an error (transformers' convention).

Placement (`align_cpu_weights`, default True): CPU tensors read in their saved dtype are views of the memory-mapped
files, usually off cache-line alignment (48 bytes off for a typical transformers checkpoint), which slowed
the matrix-vector products of decoding, and tensors converted on load sit on whatever heap pages were free
(scattered pages decode slower; docs/performance.md). Every CPU tensor gets a private copy, one at a time:
those of 2 MiB or more on memory advised for transparent huge pages (jetmoe.cpu_memory), the others on the
heap; no file mapping stays referenced. False keeps them as loaded: instant loading and no memory of the
process's own for mapped weights (the page cache holds them), e.g. for a model larger than RAM or one about
to be quantised.
"""

from __future__ import annotations

from typing import Callable

from torch import nn
from transformers.utils import logging

from .. import cpu_memory

logger = logging.get_logger(__name__)

# Left free when deciding whether private copies of mapped weights fit in memory.
_COPY_HEADROOM_BYTES = 1 << 30


def from_pretrained(load: Callable, fresh_head_prefixes: tuple[str, ...], *args, **kwargs):
    """`load` is transformers' `from_pretrained` bound to the model class; the other arguments are the caller's.
    Returns the model, or (model, loading info) with `output_loading_info=True`."""
    align = kwargs.pop("align_cpu_weights", True)
    want_info = kwargs.pop("output_loading_info", False)
    allow_mismatch = kwargs.pop("ignore_mismatched_sizes", False)
    # transformers' own mismatch error is a bare RuntimeError; ours names every key with both shapes.
    model, info = load(*args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs)
    problems = []
    if not allow_mismatch:
        problems += [
            f"{key}: checkpoint shape {tuple(saved)} != model shape {tuple(expected)}"
            for key, saved, expected in sorted(info["mismatched_keys"])
        ]
        if problems:
            problems.append("(from_pretrained(..., ignore_mismatched_sizes=True) re-initialises these instead)")
    if not want_info:
        state = model.state_dict()
        missing = [
            f"{key}: missing from the checkpoint (model shape {tuple(state[key].shape) if key in state else '?'})"
            for key in sorted(info["missing_keys"])
            if not key.startswith(fresh_head_prefixes)
        ]
        if missing:
            missing.append("(from_pretrained(..., output_loading_info=True) loads anyway and reports them)")
        problems += missing
    if problems:
        raise ValueError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    if align:
        copy_weights_if_they_fit(model)
    return (model, info) if want_info else model


def copy_weights_if_they_fit(model: nn.Module) -> None:
    """cpu_memory.place_on_huge_pages, unless the copies of the mapped weights would not fit in available
    memory: then the weights stay mapped (as with align_cpu_weights=False) and a warning says so."""
    needed, available = cpu_memory.file_backed_bytes(model), cpu_memory.available_memory_bytes()
    if needed and available is not None and needed > available - _COPY_HEADROOM_BYTES:
        logger.warning(
            f"keeping the weights mapped from the checkpoint files: private copies need {needed / 2**30:.1f} GiB "
            f"and {available / 2**30:.1f} GiB of memory are available (decoding is slower on mapped weights; "
            "from_pretrained(..., align_cpu_weights=False) keeps them mapped without this check)"
        )
        return
    cpu_memory.place_on_huge_pages(model)
