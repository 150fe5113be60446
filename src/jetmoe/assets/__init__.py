"""Files shipped inside the package. TINY_MODEL_DIR: a tiny JetMoE trained on Python's documentation (HF format,
weights and tokenizer), the default model when none is given. How it was made: README.md, "## Training"."""

from __future__ import annotations

import os

TINY_MODEL_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")

__all__ = ["TINY_MODEL_DIR"]
