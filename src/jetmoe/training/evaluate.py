"""Perplexity of a model on a text file: `jetmoe eval --model DIR --text FILE`.

The file is tokenised as one document (with bos first if the tokenizer adds one), cut into consecutive
windows of `seq_len` tokens, and every token after a window's first is predicted; the perplexity is
exp(mean cross-entropy) over all predicted tokens.
"""

from __future__ import annotations

import math
import os

import torch

from .. import JetMoeForCausalLM
from .objective import compute_terms
from .sources import resolve_source
from .tokenizer import adds_bos, load_tokenizer


def read_text(path: str) -> str:
    source = resolve_source([path], data_format="text")  # the same checks as training data: exists, not empty, UTF-8
    return "".join(source.examples())


def evaluate_perplexity(model_dir: str, text_path: str, seq_len: int | None = None, batch_size: int = 8,
                        device: str = "cpu") -> dict:
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"model folder {model_dir!r} does not exist")
    tokenizer = load_tokenizer(model_dir)
    model = JetMoeForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    seq_len = seq_len or min(model.config.max_position_embeddings, 1024)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"seq_len {seq_len} is above the model's max_position_embeddings {model.config.max_position_embeddings}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    ids = tokenizer(read_text(text_path), add_special_tokens=False)["input_ids"]
    if adds_bos(tokenizer):
        ids = [tokenizer.bos_token_id] + ids
    if len(ids) < 2:
        raise ValueError(f"{text_path!r} is too short to measure: it has {len(ids)} token(s)")
    windows = [ids[start : start + seq_len] for start in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]
    # Full windows in batches; the shorter last one on its own (no padding needed).
    full = [w for w in windows if len(w) == seq_len]
    groups = [full[i : i + batch_size] for i in range(0, len(full), batch_size)] + [[w] for w in windows if len(w) != seq_len]
    ce_sum, targets = 0.0, 0
    with torch.no_grad():
        for group in groups:
            tensor = torch.tensor(group, device=device)
            terms = compute_terms(model(input_ids=tensor, use_cache=False), tensor)
            ce_sum += float(terms.ce_sum)
            targets += terms.targets
    mean = ce_sum / targets
    return {"loss": mean, "perplexity": math.exp(mean), "tokens": targets, "seq_len": seq_len}
