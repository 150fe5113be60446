"""int8 weight-only quantisation: per-channel error bound, model closeness, save/load round trip, engine use."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch._dynamo.utils import counters
from toy_checkpoint import PROMPTS, load_toy

import jetmoe
from jetmoe import cpu_memory
from jetmoe.generation import Engine, SamplingParams, load_model, load_quantized, quantize_model, save_quantized
from jetmoe.generation.quantize import SPEC_FILE
from jetmoe.modeling.int8 import Int8Linear, Int8ParallelExperts, quantize_tensor

VALIDATION_TEXT = (
    "The Python language is a programming language. A mixture of experts routes every token to two experts. "
    "Servers answer many clients at once with continuous batching. Generation streams text one token at a time."
)


@pytest.mark.skipif(not cpu_memory.huge_pages_supported(), reason="huge pages are a Linux feature")
def test_large_quantised_weights_are_written_onto_huge_pages():
    """Straight onto huge-page memory, not the heap (whose freed copies the process would keep); small ones
    stay ordinary tensors. Values as from a plain buffer."""
    big = torch.randn(4, 1024, 640)  # 2.5 MiB of int8
    q, scale = quantize_tensor(big)
    assert cpu_memory.on_huge_pages(q)
    assert torch.equal(q, (big / scale[..., None]).round().clamp(-127, 127).to(torch.int8))
    small_q, _ = quantize_tensor(torch.randn(8, 64))
    assert not cpu_memory.on_huge_pages(small_q)


def test_quantize_tensor_error_is_at_most_half_a_step_per_channel():
    weight = torch.randn(3, 40, 64) * torch.linspace(0.01, 5, 40)[None, :, None]  # very different row scales
    q, scale = quantize_tensor(weight)
    assert q.dtype == torch.int8 and scale.shape == (3, 40)
    assert q.abs().max() == 127
    error = (q.float() * scale[..., None] - weight).abs()
    assert (error <= scale[..., None] / 2 + 1e-7).all()


@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, the dequantising fallback
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_matches_its_dequantised_weight(in_features, dtype):
    linear = torch.nn.Linear(in_features, 24, bias=True).to(dtype)
    quantized = Int8Linear.from_float(linear)
    x = torch.randn(2, 5, in_features).to(dtype)
    dequantised = quantized.weight_int8.float() * quantized.scale.float()[:, None]
    expected = x.float() @ dequantised.T + linear.bias.float()
    tolerance = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(quantized(x).float(), expected, rtol=tolerance, atol=tolerance)


def perplexity(model, tokenizer, text: str) -> float:
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return torch.exp(model(ids, labels=ids).loss).item()


def test_int8_model_stays_close_to_the_float_model(toy_dir, toy_tokenizer):
    reference = load_toy(toy_dir)
    model = load_toy(toy_dir)
    names = quantize_model(model)
    assert sum(isinstance(m, Int8ParallelExperts) for m in model.modules()) == 4 * 2  # MoA + MoE, in and out
    assert any(n == "lm_head" for n in names) and not any("router" in n for n in names)
    assert not any(isinstance(m, torch.nn.Linear) and "router" not in n for n, m in model.named_modules())
    ids = toy_tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        ref_logits, int8_logits = reference(**ids).logits, model(**ids).logits
    relative = (int8_logits - ref_logits).norm() / ref_logits.norm()
    assert relative < 0.02
    ref_ppl, int8_ppl = (
        perplexity(reference, toy_tokenizer, VALIDATION_TEXT),
        perplexity(model, toy_tokenizer, VALIDATION_TEXT),
    )
    assert abs(int8_ppl / ref_ppl - 1) < 0.01


def test_save_and_load_round_trip(toy_dir, toy_tokenizer, tmp_path):
    model = load_toy(toy_dir)
    quantize_model(model)
    save_quantized(model, tmp_path / "int8", toy_tokenizer)
    spec = json.loads((tmp_path / "int8" / SPEC_FILE).read_text())
    assert "lm_head" in spec["modules"]
    loaded = load_model(tmp_path / "int8", dtype="float32")  # the generic loader recognises int8 checkpoints
    ids = toy_tokenizer(PROMPTS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, model.state_dict()[name]), name
    with pytest.raises(OSError, match="model.safetensors"):
        jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path / "int8")  # never silently random weights
    assert loaded.model.rotary_emb.inv_freq.equal(model.model.rotary_emb.inv_freq)


def test_load_rejects_an_unknown_method(toy_dir, toy_tokenizer, tmp_path):
    model = load_toy(toy_dir)
    quantize_model(model)
    save_quantized(model, tmp_path / "int8")
    (tmp_path / "int8" / SPEC_FILE).write_text(json.dumps({"method": "int4-magic", "modules": []}))
    with pytest.raises(ValueError, match="int4-magic"):
        load_quantized(tmp_path / "int8")


def test_engine_on_int8_equals_generate_on_int8(toy_dir, toy_tokenizer):
    model = load_toy(toy_dir, dtype=torch.bfloat16)
    quantize_model(model)
    ids = toy_tokenizer(PROMPTS[1], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=12, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    engine = Engine(model, toy_tokenizer)
    got = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=12, temperature=0))[0].token_ids
    assert got == expected[: len(got)] and len(got) > 3


# jetmoe's native kernel up to 16 rows (where it builds), aten's int8 kernel up to 24, bf16 matmul above
@pytest.mark.parametrize("rows", [1, 16, 17, 24, 25, 64])
def test_int8_matmul_equals_the_dequantized_product_on_both_paths(rows):
    from jetmoe.ops.int8 import int8_matmul

    torch.manual_seed(0)
    weight = torch.randn(48, 32)
    q, scale = quantize_tensor(weight)
    x = torch.randn(rows, 32, dtype=torch.bfloat16)
    got = int8_matmul(x, q, scale.to(torch.bfloat16))
    want = x.double() @ (q.double() * scale.to(torch.bfloat16).double()[:, None]).T
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 48)
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


def test_compiled_int8_engine_decodes_the_same_tokens(toy_dir, toy_tokenizer):
    """The int8 model through the compiled decode step (the fastest batch-1 path on CPU): generate()'s tokens."""
    model = load_toy(toy_dir, dtype=torch.bfloat16)
    quantize_model(model)
    ids = toy_tokenizer(PROMPTS[0], return_tensors="pt")
    with torch.no_grad():
        expected = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1] :].tolist()
    engine = Engine(model, toy_tokenizer, max_batch=1, compile=True)
    got = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0))[0].token_ids
    assert got == expected[: len(got)] and len(got) > 3
    if shutil.which("g++") or shutil.which("clang++"):  # inductor's CPU code is C++: with a compiler, no fallback
        assert engine.compiled, "the compiled decode step fell back to eager"


def test_compiled_engines_of_two_models_in_one_process_keep_their_own_graphs(toy_dir, toy_tokenizer):
    """The compiled step drops the guards on the model's modules, so each engine must keep its own compiled
    entries: a bf16 engine compiled first, then an int8 engine of the same geometry (other modules, same input
    shapes), each decodes its own model's eager tokens and neither falls back to eager."""
    if not (shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("inductor needs a C++ compiler")
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    models = [load_toy(toy_dir, dtype=torch.bfloat16), load_toy(toy_dir, dtype=torch.bfloat16)]
    quantize_model(models[1])
    engines = [Engine(model, toy_tokenizer, max_batch=1, compile=True) for model in models]
    for model, engine in zip(models, engines):
        eager = Engine(model, toy_tokenizer, max_batch=1).generate([PROMPTS[0]], params)[0].token_ids
        assert engine.generate([PROMPTS[0]], params)[0].token_ids == eager
        assert engine.compiled, "the compiled decode step fell back to eager"


def test_compiled_int8_engine_batch_equals_eager(toy_dir, toy_tokenizer):
    """A batch of three (six slots: the sorted plan, int8 experts through their custom op): eager's tokens."""
    model = load_toy(toy_dir, dtype=torch.bfloat16)
    quantize_model(model)
    params = SamplingParams(max_tokens=6, temperature=0)
    eager = [c.token_ids for c in Engine(model, toy_tokenizer, max_batch=3).generate(PROMPTS[:3], params)]
    engine = Engine(model, toy_tokenizer, max_batch=3, compile=True)
    counters.clear()
    assert [c.token_ids for c in engine.generate(PROMPTS[:3], params)] == eager
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["resumes"])  # no graph break
    if shutil.which("g++") or shutil.which("clang++"):
        assert engine.compiled, "the compiled decode step fell back to eager"
