"""The bundled tiny model as the default of `jetmoe generate`, and int8 on a trained (not random) model."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoTokenizer

from jetmoe.cli import main
from jetmoe.generation import Engine, SamplingParams, load_model, quantize_model
from jetmoe.generation.loading import bundled_model_dir

BUNDLED = bundled_model_dir()
pytestmark = pytest.mark.skipif(BUNDLED is None, reason="the bundled tiny model is not in this checkout")

# Documentation-style text, the kind of text the tiny model was trained on.
TEXT = """
list.append(x)
Add an item to the end of the list. Equivalent to a[len(a):] = [x].

dict.get(key, default=None)
Return the value for key if key is in the dictionary, else default. If default is not given, it defaults
to None, so that this method never raises a KeyError.

str.split(sep=None, maxsplit=-1)
Return a list of the words in the string, using sep as the delimiter string. If maxsplit is given, at most
maxsplit splits are done. If sep is not specified or is None, runs of consecutive whitespace are regarded
as a single separator.
"""


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return math.exp(model(ids, labels=ids).loss.item())


def test_generate_uses_the_bundled_model_by_default(capsys):
    assert main(["generate", "The Python language", "--temperature", "0", "--max-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("The Python language") and len(out.strip()) > len("The Python language")


def test_engine_greedy_equals_generate_on_the_bundled_model():
    model = load_model(BUNDLED, "float32")
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    ids = tokenizer("The Python language", return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=20, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    got = Engine(model, tokenizer).generate(["The Python language"], SamplingParams(max_tokens=20, temperature=0))
    assert got[0].token_ids == expected[: len(got[0].token_ids)] and len(got[0].token_ids) > 5


def test_int8_perplexity_within_one_percent_of_bf16():
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED)
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"]
    bf16 = load_model(BUNDLED, "bfloat16")
    reference = perplexity(bf16, ids)
    quantize_model(bf16)
    quantized = perplexity(bf16, ids)
    assert reference < 200  # a trained model: far below the vocabulary size
    assert abs(quantized / reference - 1) < 0.01
