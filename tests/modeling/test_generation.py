"""Cached decoding and generate() against the oracle: same tokens for greedy, seeded sampling and beam search."""

from __future__ import annotations

import pytest
import torch
from oracle_pair import assert_close, build_pair, padding_mask, random_ids
from transformers.cache_utils import DynamicCache

PAD = 0


def _left_padded(lengths, total, seed=2):
    mask = padding_mask(lengths, total, "left")
    return random_ids(len(lengths), total, seed=seed).masked_fill(mask == 0, PAD), mask


@pytest.mark.parametrize("chunks", [[5, 1, 1, 1], [3, 3, 2], [2, 1, 4, 1]])
def test_incremental_decoding_equals_full_forward(attn_implementation, chunks):
    """A prefix, then single tokens or multi-token chunks through the cache == one full forward."""
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(2, sum(chunks))
    with torch.no_grad():
        full = ours(ids).logits
        want = oracle(ids).logits
        cache, pieces, start = DynamicCache(config=ours.config), [], 0
        for size in chunks:
            out = ours(ids[:, start : start + size], cache=cache, use_cache=True)
            assert out.cache is cache
            pieces.append(out.logits)
            start += size
        assert cache.get_seq_length() == sum(chunks)
    stepped = torch.cat(pieces, dim=1)
    assert_close(stepped, full, what=f"cached chunks {chunks} vs full forward [{attn_implementation}]")
    assert_close(stepped, want, what=f"cached chunks {chunks} vs oracle full forward [{attn_implementation}]")


def test_incremental_decoding_with_left_padding_matches_oracle(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids, mask = _left_padded([8, 5], 8)
    prefix = 5
    with torch.no_grad():
        results = []
        for model in (ours, oracle):
            cache = DynamicCache(config=model.config)
            logits = [model(ids[:, :prefix], attention_mask=mask[:, :prefix], cache=cache).logits]
            for t in range(prefix, 8):
                step = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache)
                logits.append(step.logits)
            results.append(torch.cat(logits, dim=1))
        full = ours(ids, attention_mask=mask).logits
    real = mask.bool()
    assert_close(results[0][real], results[1][real], what="left-padded cached decoding vs oracle")
    assert_close(results[0][real], full[real], what="left-padded cached decoding vs full forward")


def test_explicit_cache_position_is_respected():
    ours, oracle = build_pair()
    ids = random_ids(1, 6)
    with torch.no_grad():
        got, want = [], []
        for model, sink in ((ours, got), (oracle, want)):
            cache = DynamicCache(config=model.config)
            sink.append(model(ids[:, :4], cache=cache, cache_position=torch.arange(4)).logits)
            sink.append(model(ids[:, 4:], cache=cache, cache_position=torch.arange(4, 6)).logits)
    assert_close(torch.cat(got, 1), torch.cat(want, 1), what="explicit cache_position")


def _generate_both(ours, oracle, **kwargs):
    seed = kwargs.pop("seed", None)
    outputs = []
    for model in (ours, oracle):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model.generate(**kwargs))
    return outputs


def test_greedy_generate_identical_tokens(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(1, 4)
    got, want = _generate_both(ours, oracle, input_ids=ids, max_new_tokens=10, do_sample=False, eos_token_id=None)
    assert got.shape == (1, 14)
    assert torch.equal(got, want), f"\nours   {got.tolist()}\noracle {want.tolist()}"
    assert torch.equal(got[:, :4], ids)


def test_greedy_generate_left_padded_batch(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation, pad_token_id=PAD)
    ids, mask = _left_padded([6, 3, 1], 6)
    got, want = _generate_both(
        ours, oracle, input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, eos_token_id=None
    )
    assert got.shape == (3, 14)
    assert torch.equal(got, want), f"\nours   {got.tolist()}\noracle {want.tolist()}"
    # Padding does not leak: each row continues as it would alone, unpadded.
    for row, n in enumerate([6, 3, 1]):
        alone, _ = _generate_both(ours, oracle, input_ids=ids[row : row + 1, 6 - n :], max_new_tokens=8, eos_token_id=None)
        assert torch.equal(got[row, 6:], alone[0, n:]), f"row {row}"


def test_greedy_generate_stops_at_eos_like_oracle():
    ours, oracle = build_pair(pad_token_id=PAD)
    ids = random_ids(2, 3)
    with torch.no_grad():
        first = ours.generate(ids, max_new_tokens=6, eos_token_id=None)
    eos = int(first[0, 5])  # a token row 0 emits at its third step: make it the eos
    got, want = _generate_both(ours, oracle, input_ids=ids, max_new_tokens=6, eos_token_id=eos)
    assert torch.equal(got, want)
    assert (got[0] == eos).any()


def test_sampling_with_a_seed_gives_the_oracle_tokens(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation, pad_token_id=PAD)
    ids, mask = _left_padded([5, 3], 5)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, eos_token_id=None)
    got, want = _generate_both(ours, oracle, seed=123, top_k=20, temperature=2.0, **kwargs)
    assert torch.equal(got, want), f"\nours   {got.tolist()}\noracle {want.tolist()}"
    # Real sampling happened: another seed gives another continuation.
    other, _ = _generate_both(ours, oracle, seed=7, top_k=20, temperature=2.0, **kwargs)
    assert not torch.equal(got, other)


def test_beam_search_gives_the_oracle_tokens(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation, pad_token_id=PAD)
    ids, mask = _left_padded([5, 2], 5)
    kwargs = dict(input_ids=ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2,
                  do_sample=False, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
    got, want = _generate_both(ours, oracle, **kwargs)
    assert got.sequences.shape == (4, 11)
    assert torch.equal(got.sequences, want.sequences), f"\nours   {got.sequences.tolist()}\noracle {want.sequences.tolist()}"
    assert_close(got.sequences_scores, want.sequences_scores, what="beam sequence scores")


def test_generate_with_cache_off_matches_cached():
    ours, _ = build_pair()
    ids = random_ids(2, 4)
    with torch.no_grad():
        cached = ours.generate(ids, max_new_tokens=6, eos_token_id=None, use_cache=True)
        uncached = ours.generate(ids, max_new_tokens=6, eos_token_id=None, use_cache=False)
    assert torch.equal(cached, uncached)


def test_static_cache_generate_gives_the_oracle_tokens():
    ours, oracle = build_pair(pad_token_id=PAD)
    ids, mask = _left_padded([5, 3], 5)
    got, want = _generate_both(ours, oracle, input_ids=ids, attention_mask=mask, max_new_tokens=5,
                               eos_token_id=None, cache_implementation="static")
    assert torch.equal(got, want)
    dynamic, _ = _generate_both(ours, oracle, input_ids=ids, attention_mask=mask, max_new_tokens=5, eos_token_id=None)
    assert torch.equal(got, dynamic)


def test_static_cache_without_padding_gives_the_oracle_scores(attn_implementation):
    """No padding: transformers' mask builder passes no mask for the prompt into the (longer) static cache,
    meaning causal attention aligned at the cache's start; the scores of every step are the oracle's."""
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    kwargs = dict(input_ids=random_ids(2, 6), max_new_tokens=4, eos_token_id=None, do_sample=False,
                  return_dict_in_generate=True, output_scores=True, cache_implementation="static")
    got, want = _generate_both(ours, oracle, **kwargs)
    assert torch.equal(got.sequences, want.sequences)
    for step, (g, w) in enumerate(zip(got.scores, want.scores)):
        assert_close(g, w, what=f"static-cache scores at step {step} [{attn_implementation}]")


def test_generate_with_a_fullgraph_compiled_forward():
    """generate() compiles the forward with fullgraph=True (we declare _can_compile_fullgraph) for a static
    cache: no graph break (the input checks read no tensor into a Python branch), no recompilation for a
    second prompt of the same shape, and the tokens and scores of the eager forward. The "eager" backend:
    dynamo traces the same graph, without inductor's compile time."""
    from transformers import CompileConfig

    ours, _ = build_pair()
    assert ours._can_compile_fullgraph
    config = CompileConfig(fullgraph=True, dynamic=False, backend="eager")
    config._compile_all_devices = True  # transformers compiles on accelerators only, unless told
    kwargs = dict(max_new_tokens=4, eos_token_id=None, do_sample=False, return_dict_in_generate=True,
                  output_scores=True, cache_implementation="static")
    torch.compiler.reset()
    try:
        for run, ids in enumerate((random_ids(2, 5, seed=3), random_ids(2, 5, seed=4))):
            with torch.no_grad(), torch.compiler.set_stance("force_eager"):
                eager = ours.generate(ids, **kwargs)
            assert not hasattr(ours, "_compiled_call")
            with torch.no_grad(), torch.compiler.set_stance("fail_on_recompile" if run else "default"):
                compiled = ours.generate(ids, compile_config=config, **kwargs)
            assert hasattr(ours, "_compiled_call")  # generate() really took the compiled forward
            assert torch.equal(compiled.sequences, eager.sequences)
            for step, (c, e) in enumerate(zip(compiled.scores, eager.scores)):
                assert_close(c, e, what=f"compiled forward's scores, run {run} step {step}")
            del ours._compiled_call
    finally:
        torch.compiler.reset()


def test_cache_argument_names_and_use_cache():
    ours, _ = build_pair()
    ids = random_ids(2, 6)
    with torch.no_grad():
        full = ours(ids).logits
        assert isinstance(ours(ids).cache, DynamicCache)  # made when use_cache (the default) and none is given
        assert ours(ids, use_cache=False).cache is None
        cache = DynamicCache(config=ours.config)
        ours(ids[:, :4], past_key_values=cache)  # the seed's (deprecated) name for the cache
        step = ours(ids[:, 4:], past_key_values=cache).logits
        assert_close(step, full[:, 4:], what="past_key_values= decoding")
        with pytest.raises(ValueError, match="not both"):
            ours(ids, past_key_values=DynamicCache(config=ours.config), cache=DynamicCache(config=ours.config))
