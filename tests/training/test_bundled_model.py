"""The tiny model shipped in the package: HF format, loads with no arguments beyond its path, generates."""

from __future__ import annotations

import os

import torch

from jetmoe import JetMoeForCausalLM
from jetmoe.assets import TINY_MODEL_DIR
from jetmoe.training import bundled_model_path
from jetmoe.training.config import TINY_MODEL

def test_bundled_model_loads_and_generates():
    from transformers import AutoTokenizer

    assert bundled_model_path() == TINY_MODEL_DIR
    model = JetMoeForCausalLM.from_pretrained(TINY_MODEL_DIR).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    for key in ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok", "kv_channels"):
        assert getattr(model.config, key) == TINY_MODEL[key]
    assert len(tokenizer) == model.config.vocab_size and tokenizer.eos_token_id == model.config.eos_token_id
    size = sum(os.path.getsize(os.path.join(TINY_MODEL_DIR, f)) for f in os.listdir(TINY_MODEL_DIR))
    assert size < 10 * 2**20  # a few MB: fit for the repository and the wheel
    prompt = tokenizer("Return the absolute value of", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(out[0]) > prompt["input_ids"].shape[1] and text.strip()


def test_bundled_model_learned_the_corpus(tmp_path):
    """Its perplexity on Python's documentation is far below a uniform guess over its vocabulary."""
    from pydoc_data.topics import topics

    from jetmoe.training.evaluate import evaluate_perplexity

    text = tmp_path / "topic.txt"
    text.write_text(topics["assert"] + "\n" + topics["pass"])
    result = evaluate_perplexity(TINY_MODEL_DIR, str(text), seq_len=256)
    assert result["perplexity"] < 100 < TINY_MODEL["vocab_size"]


def test_bundled_files_are_package_data():
    import tomllib

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "pyproject.toml"), "rb") as handle:
        package_data = tomllib.load(handle)["tool"]["setuptools"]["package-data"]["jetmoe"]
    assert "assets/tiny/*" in package_data
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert os.path.exists(os.path.join(TINY_MODEL_DIR, name)), name
