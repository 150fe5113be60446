"""The engine against transformers' generate() on the same model, and its request handling."""

from __future__ import annotations

import math
import shutil
import warnings

import pytest
import torch
from toy_checkpoint import PROMPTS, load_toy

from jetmoe.generation import Engine, SamplingParams
from jetmoe.ops import native as ops_native

GREEDY = SamplingParams(max_tokens=24, temperature=0)


def reference_greedy(model, tokenizer, prompts, max_new_tokens):
    """generate() on a left-padded batch; each row cut after its first end-of-sequence token."""
    tokenizer.padding_side = "left"
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    rows = []
    for row in out[:, batch["input_ids"].shape[1] :].tolist():
        if model.generation_config.eos_token_id in row:
            row = row[: row.index(model.generation_config.eos_token_id) + 1]
        rows.append(row)
    return rows


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_greedy_equals_generate_batch_of_one(toy_dir, toy_tokenizer, attn_implementation):
    model = load_toy(toy_dir, attn_implementation)
    engine = Engine(model, toy_tokenizer, max_batch=1)
    for prompt in PROMPTS:
        expected = reference_greedy(model, toy_tokenizer, [prompt], GREEDY.max_tokens)[0]
        completion = engine.generate([prompt], GREEDY)[0]
        assert completion.token_ids == expected
        assert len(expected) > 5  # a real comparison, not an immediate end-of-sequence


def test_greedy_equals_generate_padded_batch(toy_model, toy_tokenizer):
    expected = reference_greedy(toy_model, toy_tokenizer, PROMPTS, GREEDY.max_tokens)
    lengths = {len(toy_tokenizer(p)["input_ids"]) for p in PROMPTS}
    assert len(lengths) > 1  # the reference batch really is padded
    engine = Engine(toy_model, toy_tokenizer, max_batch=len(PROMPTS))
    assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == expected


def test_requests_joining_a_running_batch_get_their_own_tokens(toy_model, toy_tokenizer):
    """Two slots, four requests of different lengths: late ones join at a token boundary mid-batch."""
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (5, 20, 9, 14)]
    prompts = PROMPTS + ["Servers answer many clients"]
    alone = [Engine(toy_model, toy_tokenizer, max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    engine = Engine(toy_model, toy_tokenizer, max_batch=2)
    together = engine.generate(prompts, params)
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [5, 20, 9, 14]
    assert not engine.running  # every slot was freed


def test_stream_yields_the_completion_text(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer, max_batch=2)
    params = SamplingParams(max_tokens=30, temperature=0.9, seed=7)
    pieces = list(engine.stream(PROMPTS[0], params))
    assert len(pieces) > 1
    assert "".join(pieces) == engine.generate([PROMPTS[0]], params)[0].text
    assert not engine.running


def test_max_tokens_and_context_limit(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer, max_batch=2, max_len=12)
    prompt_len = len(toy_tokenizer(PROMPTS[0])["input_ids"])
    short, long = engine.generate(
        [PROMPTS[0]] * 2,
        [SamplingParams(max_tokens=2, temperature=0, ignore_eos=True), SamplingParams(max_tokens=100, ignore_eos=True)],
    )
    assert (short.completion_tokens, short.finish_reason) == (2, "length")
    assert long.finish_reason == "length" and prompt_len + long.completion_tokens == 12  # the context is full


def test_stop_string_cuts_the_text(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer)
    free = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    text = free.text
    stop = next(text[i : i + 2] for i in range(4, len(text) - 2) if "\ufffd" not in text[i : i + 2])
    cut = engine.generate([PROMPTS[1]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert cut.finish_reason == "stop"
    assert cut.text == text[: text.index(stop)]
    assert cut.token_ids == free.token_ids[: cut.completion_tokens]
    assert cut.completion_tokens < free.completion_tokens


def test_stop_token_ids_and_end_of_sequence(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    stop_token = free.token_ids[6]
    first = free.token_ids.index(stop_token)
    cut = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_token]))[0]
    assert cut.token_ids == free.token_ids[: first + 1] and cut.finish_reason == "stop"
    # The end token is counted but never shown.
    assert cut.text == toy_tokenizer.decode(free.token_ids[:first], skip_special_tokens=True)


def test_end_of_sequence_token_ends_a_request(toy_model, toy_tokenizer):
    """Make the model's eos token the greedy choice after a few tokens by declaring a frequent token eos."""
    engine = Engine(toy_model, toy_tokenizer)
    free = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    engine.eos_ids = {free.token_ids[3]}
    done = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0))[0]
    assert done.finish_reason == "stop" and done.token_ids[-1] == free.token_ids[3]
    assert len(done.token_ids) == free.token_ids.index(free.token_ids[3]) + 1


def test_seeded_sampling_is_reproducible_and_independent_of_the_batch(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer, max_batch=4)
    seeded = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    alone = engine.generate([PROMPTS[0]], seeded)[0].token_ids
    assert engine.generate([PROMPTS[0]], seeded)[0].token_ids == alone
    mixed = engine.generate(
        [PROMPTS[1], PROMPTS[0], PROMPTS[2]],
        [SamplingParams(max_tokens=7, temperature=1.0), seeded, SamplingParams(max_tokens=3, temperature=0)],
    )
    assert mixed[1].token_ids == alone
    other = SamplingParams(max_tokens=20, temperature=1.0, top_k=50, top_p=0.9, seed=99, ignore_eos=True)
    assert engine.generate([PROMPTS[0]], other)[0].token_ids != alone
    greedy = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert greedy.token_ids != alone  # sampling really sampled


def test_cancel_frees_the_slot(toy_model, toy_tokenizer):
    engine = Engine(toy_model, toy_tokenizer, max_batch=2)
    a = engine.make_sequence(PROMPTS[0], SamplingParams(max_tokens=50, ignore_eos=True))
    b = engine.make_sequence(PROMPTS[1], SamplingParams(max_tokens=50, temperature=0, ignore_eos=True))
    engine.add(a)
    engine.add(b)
    engine.step()
    assert engine.free_slots == 0
    engine.cancel(a)
    assert engine.free_slots == 1 and a.finish_reason == "abort" and b.slot == 0  # b moved into slot 0
    for _ in range(5):
        engine.step()
    # b continues exactly as it would have alone, after moving slots.
    alone = Engine(toy_model, toy_tokenizer, max_batch=1).generate(
        [PROMPTS[1]], SamplingParams(max_tokens=7, temperature=0)
    )
    assert b.output_ids == alone[0].token_ids


@pytest.mark.parametrize(
    "prompt, message",
    [([], "empty"), ("word " * 300, "context holds"), ([5, 9999], "outside the vocabulary")],
)
def test_bad_prompts_raise_value_error(toy_model, toy_tokenizer, prompt, message):
    engine = Engine(toy_model, toy_tokenizer, max_len=128)
    with pytest.raises(ValueError, match=message):
        engine.generate([prompt], GREEDY)


def test_compiled_engine_decodes_the_same_tokens(toy_model, toy_tokenizer):
    """--compile: a compiled decode step, or (where tracing this model fails, e.g. an op without a compile path
    in this dtype) the eager one after a warning; either way the greedy tokens are generate()'s."""
    expected = reference_greedy(toy_model, toy_tokenizer, [PROMPTS[0]], 6)[0]
    engine = Engine(toy_model, toy_tokenizer, max_batch=1, compile=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = engine.generate([PROMPTS[0]], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    assert got == expected
    if shutil.which("g++") or shutil.which("clang++"):  # inductor's CPU code is C++: with a compiler, no fallback
        assert engine.compiled, "the compiled decode step fell back to eager"


def test_compiled_engine_follows_batch_size_changes_and_weight_updates(toy_dir, toy_tokenizer):
    """The compiled step keeps only the guards on its inputs and the cache (not on the model's modules): a
    batch that grows and shrinks (few-token plans at one or two rows, sorted ones at three) still decodes
    eager's tokens, and an in-place change of a weight is seen by the next compiled call."""
    if not (shutil.which("g++") or shutil.which("clang++")):
        pytest.skip("inductor needs a C++ compiler")
    model = load_toy(toy_dir, dtype=torch.bfloat16)
    params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in (9, 3, 6)]
    eager = [c.token_ids for c in Engine(model, toy_tokenizer, max_batch=3).generate(PROMPTS[:3], params)]
    engine = Engine(model, toy_tokenizer, max_batch=3, compile=True)
    assert [c.token_ids for c in engine.generate(PROMPTS[:3], params)] == eager
    assert [c.token_ids for c in engine.generate(PROMPTS[:1], params[:1])] == eager[:1]
    assert engine.compiled

    head = model.lm_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head.zero_()  # every logit 0: greedy picks token 0
        forced = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
        assert eager[0][:4] != [0, 0, 0, 0]
        assert engine.generate([PROMPTS[0]], forced)[0].token_ids == [0, 0, 0, 0]
    finally:
        with torch.no_grad():
            head.copy_(saved)


def test_compiled_decode_backend_keeps_aten_matrix_vector_products():
    """The engine's compile backend leaves `mv` to aten (inductor's own reduction read weights slower): the
    compiled product is bit for bit the eager one."""
    from jetmoe.generation.engine import _inductor_keeping_mv

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 1024, generator=generator).to(torch.bfloat16)
    vector = torch.randn(1024, generator=generator).to(torch.bfloat16)
    compiled = torch.compile(lambda w, v: torch.mv(w, v) * 2, backend=_inductor_keeping_mv)
    assert torch.equal(compiled(weight, vector), torch.mv(weight, vector) * 2)


@pytest.mark.skipif(not ops_native.available(), reason="jetmoe's C kernels do not run here (no compiler, or switched off)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_engine_with_native_decode_layers_decodes_the_operator_paths_tokens(toy_tokenizer, monkeypatch, dtype):
    """bf16 or fp32 on the CPU, a geometry jetmoe's C decoder layers take: rows of different lengths joining and
    leaving a running batch of 3 (the cache's masks, slot moves) decode the tokens and logits of the operator
    path."""
    from oracle_pair import TINY, build_pair

    from jetmoe.modeling.backends import cpu_decode as native_decode
    from jetmoe.ops.native import decode as kernels

    model, _ = build_pair(dict(TINY, hidden_size=64, kv_channels=32, intermediate_size=64))
    model = model.to(dtype)
    prompts = [[5 + i for i in range(n)] for n in (3, 11, 6, 17, 8)]
    params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    stacked, run_layers = [], kernels.run_layers

    def counted(operands, first, *args):
        status, stopped = run_layers(operands, first, *args)
        stacked.append(stopped - first)  # layers run through, each writing its new K/V rows into the cache
        return status, stopped

    monkeypatch.setattr(kernels, "run_layers", counted)

    def run():
        engine, logits = Engine(model, toy_tokenizer, max_batch=3), []
        decode = engine._decode_once
        engine._decode_once = lambda *args: logits.append(decode(*args).clone()) or logits[-1]
        return [c.token_ids for c in engine.generate(prompts, params)], logits

    native, native_logits = run()
    assert sum(stacked) > 20  # both layers of every decode step in one C call (prompts of <= 8 tokens: not)
    monkeypatch.setattr(native_decode, "applicable", lambda *args: None)
    monkeypatch.setattr(native_decode, "layers_forward", lambda *args: None)
    stacked.clear()
    operator, operator_logits = run()
    assert not stacked  # every layer through its modules
    assert native == operator and all(len(ids) == 10 for ids in native)
    assert len(native_logits) == len(operator_logits) > 10
    assert all(torch.equal(a, b) for a, b in zip(native_logits, operator_logits))


def _bf16_steps(got: torch.Tensor, want: torch.Tensor) -> float:
    """Largest difference in units of one bf16 step (ulp) at the magnitude of the largest expected logit."""
    step = 2.0 ** (math.floor(math.log2(want.float().abs().max().item())) - 7)
    return ((got.float() - want.float()).abs().max() / step).item()


@pytest.mark.skipif(not ops_native.available(), reason="jetmoe's C kernels do not run here (no compiler, or switched off)")
def test_bf16_greedy_equals_generate_where_the_c_decoder_layers_run(toy_tokenizer, monkeypatch):
    """bf16 on the CPU, a geometry jetmoe's C decoder layers take: the engine and generate() decode through
    the same C kernels on the same values, so greedy tokens are generate()'s, alone and in a padded batch."""
    from oracle_pair import TINY, build_pair

    from jetmoe.ops.native import decode as kernels

    model = build_pair(dict(TINY, hidden_size=64, kv_channels=32, intermediate_size=64))[0].to(torch.bfloat16)
    prompts = [[5 + i for i in range(n)] for n in (3, 11, 6, 17, 8)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    calls, run_layers = [], kernels.run_layers
    monkeypatch.setattr(kernels, "run_layers", lambda *args: calls.append(1) or run_layers(*args))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        batched = model.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[:, width:].tolist()  # fmt: skip
    assert calls, "generate() did not run the C decoder layers"
    for prompt, expected in zip(prompts, batched):
        with torch.no_grad():
            alone = model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None)
        assert alone[0, len(prompt) :].tolist() == expected
    calls.clear()
    engine = Engine(model, toy_tokenizer, max_batch=len(prompts))
    assert [c.token_ids for c in engine.generate(prompts, params)] == batched
    assert calls, "the engine did not run the C decoder layers"


def test_bf16_sdpa_decode_logits_are_within_a_few_bf16_steps_of_generate(toy_dir, toy_tokenizer, monkeypatch):
    """bf16 where attention runs through SDPA (here: head_dim 16, which the C kernels do not take): SDPA's bf16
    result depends on the keys' layout (the engine's slot buffers, masked and rounded up to 64 positions, vs
    generate()'s exact-length cache). The prompt's logits are generate()'s exactly; the first decode step's are
    within 4 bf16 steps of the largest logit (the README's statement)."""
    from jetmoe.ops.native import decode as kernels

    model = load_toy(toy_dir, dtype=torch.bfloat16)
    monkeypatch.setattr(kernels, "run_layers", lambda *args: pytest.fail("the C decoder layers ran"))
    generator = torch.Generator().manual_seed(0)
    prompts = [toy_tokenizer(p)["input_ids"] for p in PROMPTS]
    prompts += [torch.randint(3, 290, (n,), generator=generator).tolist() for n in (2, 9, 40, 65)]
    differences = []
    for prompt in prompts:
        with torch.no_grad():
            want = model.generate(torch.tensor([prompt]), max_new_tokens=2, do_sample=False, eos_token_id=None,
                                  return_dict_in_generate=True, output_logits=True)  # fmt: skip
        engine, got = Engine(model, toy_tokenizer, max_batch=1), []
        choose = engine.sampler.choose
        engine.sampler.choose = lambda logits, *a, **k: got.append(logits.clone()) or choose(logits, *a, **k)
        engine.generate([prompt], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))
        assert torch.equal(got[0], want.logits[0]), "prompt logits"
        differences.append(_bf16_steps(got[1], want.logits[1]))
    assert max(differences) <= 4, differences


def test_engine_text_after_a_prompt_ending_in_llama_byte_tokens_is_the_decode():
    """The reported case end to end: a Llama-2-style tokenizer, the prompt "Reactions: 🙂🙂" (8 byte tokens at
    its end), the tokens of "七 nice😀 Zürich 東京\\n done" chosen in turn (a scripted sampler): the streamed
    pieces and the completion's text are tokenizer.decode() of the completion's tokens."""
    from llama_tokenizer import build_llama_tokenizer
    from toy_checkpoint import build_model

    tokenizer = build_llama_tokenizer()
    engine = Engine(build_model(-(-len(tokenizer) // 16) * 16), tokenizer, max_batch=1)
    script = tokenizer("七 nice😀 Zürich 東京\n done", add_special_tokens=False)["input_ids"][1:]
    chosen = iter(script)
    engine.sampler.choose = lambda logits, *args, **kwargs: [next(chosen) for _ in range(logits.shape[0])]
    params = SamplingParams(max_tokens=len(script), temperature=0, ignore_eos=True)
    pieces = list(engine.stream("Reactions: 🙂🙂", params))
    assert engine.last_completion.token_ids == script
    assert "".join(pieces) == engine.last_completion.text == tokenizer.decode(script)
    assert tokenizer.decode(script) == "七 nice😀 Zürich 東京\n done"
