"""The model's default cache (modeling/cache.py): a DynamicCache that appends into buffers, with the same
contents and results as transformers' DynamicCache, and the caller's cache kept where one is passed."""

from __future__ import annotations

import pytest
import torch
from oracle_pair import TINY, build_pair, padding_mask, random_ids
from transformers.cache_utils import DynamicCache

from jetmoe.modeling.cache import AppendingLayer, JetMoeCache
from jetmoe.ops import native

# Widths the C decoder layers take (see test_native_decode.py), so bf16 decoding runs them.
NATIVE = dict(TINY, hidden_size=64, kv_channels=32, intermediate_size=64)


def _generate(model, ids, cache=None, **kwargs):
    settings = dict(max_new_tokens=10, min_new_tokens=10, do_sample=False, output_logits=True)
    settings.update(kwargs)
    with torch.no_grad():
        out = model.generate(ids, past_key_values=cache, return_dict_in_generate=True, **settings)
    return out.sequences, torch.stack(out.logits), out.past_key_values


def _same_contents(ours, theirs):
    assert len(ours.layers) == len(theirs.layers)
    for a, b in zip(ours.layers, theirs.layers):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_uses_it_and_matches_a_dynamic_cache(dtype, batch):
    """generate() builds a JetMoeCache sized to its max_length; tokens, logits and the cache's contents equal
    those of a run with a caller's DynamicCache (which is kept as it is)."""
    model, _ = build_pair(NATIVE)
    model = model.to(dtype)
    ids = random_ids(batch, 7)
    sequences, logits, cache = _generate(model, ids)
    assert type(cache) is JetMoeCache and isinstance(cache, DynamicCache)
    assert all(type(layer) is AppendingLayer for layer in cache.layers)
    assert all(layer._key_buffer.shape[2] == 7 + 10 for layer in cache.layers)  # never regrown
    theirs = DynamicCache(config=model.config)
    expected_sequences, expected_logits, returned = _generate(model, ids, cache=theirs)
    assert returned is theirs and type(theirs.layers[0]) is not AppendingLayer
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)
    _same_contents(cache, theirs)


@pytest.mark.skipif(not native.available(), reason="jetmoe's C kernels do not run here (no compiler, or switched off)")
def test_bf16_decoding_writes_the_new_rows_in_c(monkeypatch):
    """The C decoder layers write the new K/V row into the cache's buffers themselves (decode_buffers /
    decode_written) in every layer of every decode step, with a left-padded batch's mask."""
    model, _ = build_pair(NATIVE)
    model = model.to(torch.bfloat16)
    ids, mask = random_ids(2, 8), padding_mask([8, 5], 8, "left")
    written = []
    decode_written = JetMoeCache.decode_written
    monkeypatch.setattr(JetMoeCache, "decode_written", lambda self, i: (written.append(i), decode_written(self, i)))
    sequences, logits, cache = _generate(model, ids, attention_mask=mask)
    assert len(written) >= 9 * NATIVE["num_hidden_layers"] - 2  # all 9 decode steps (a router tie may hand one back)
    monkeypatch.undo()
    theirs = DynamicCache(config=model.config)
    expected_sequences, expected_logits, _ = _generate(model, ids, theirs, attention_mask=mask)
    assert torch.equal(sequences, expected_sequences) and torch.equal(logits, expected_logits)
    _same_contents(cache, theirs)


def test_a_forward_without_cache_returns_one_that_grows():
    model, _ = build_pair(NATIVE)
    ids = random_ids(2, 5)
    with torch.no_grad():
        out = model(ids, use_cache=True)
        cache = out.past_key_values
        assert type(cache) is JetMoeCache and cache.get_seq_length() == 5
        theirs = model(ids, use_cache=True, past_key_values=DynamicCache(config=model.config)).past_key_values
        for step in range(4):  # 5 -> 10 -> 20 positions: doubled, contents kept
            token = random_ids(2, 1, seed=step)
            mask = torch.ones(2, 6 + step, dtype=torch.long)
            ours_logits = model(token, attention_mask=mask, past_key_values=cache).logits
            their_logits = model(token, attention_mask=mask, past_key_values=theirs).logits
            assert torch.equal(ours_logits, their_logits)
    assert cache.layers[0]._key_buffer.shape[2] == 10
    _same_contents(cache, theirs)


def test_crop_reorder_and_select_behave_as_in_a_dynamic_cache():
    """Anything that replaces or slices a layer's keys (assisted decoding's crop, beam search's reorder, batch
    selection) is taken over at the next update."""
    generator = torch.Generator().manual_seed(0)

    def states(length):
        return [torch.randn(3, 2, length, 4, generator=generator) for _ in range(2)]

    ours, theirs = JetMoeCache(), DynamicCache()
    for operation in ("fill", "crop", "append", "reorder", "append", "select", "append", "reset", "append"):
        for cache in (ours, theirs):
            if operation == "crop":
                cache.crop(-2)
            elif operation == "reorder":
                cache.reorder_cache(torch.tensor([2, 0, 1]))
            elif operation == "select":
                cache.batch_select_indices(torch.tensor([0, 2]))
            elif operation == "reset":
                cache.reset()
        if operation in ("fill", "append"):
            batch = ours.layers[0].keys.shape[0] if ours.layers and ours.layers[0].keys is not None else 3
            keys, values = (t[:batch] for t in states(6 if operation == "fill" else 1))
            returned = ours.update(keys, values, 0)
            expected = theirs.update(keys, values, 0)
            assert torch.equal(returned[0], expected[0]) and torch.equal(returned[1], expected[1])
        assert ours.get_seq_length() == theirs.get_seq_length()
    _same_contents(ours, theirs)


def test_beam_search_matches_a_dynamic_cache():
    model, _ = build_pair(NATIVE)
    ids = random_ids(2, 6)
    settings = dict(max_new_tokens=8, do_sample=False, num_beams=3, num_return_sequences=2)
    with torch.no_grad():
        ours = model.generate(ids, **settings)
        theirs = model.generate(ids, past_key_values=DynamicCache(config=model.config), **settings)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("capacity", [-1, 2.5, "8", True])
def test_a_bad_capacity_is_rejected_with_the_problem_named(capacity):
    with pytest.raises(ValueError, match="capacity must be an integer >= 0"):
        JetMoeCache(capacity=capacity)


def test_it_is_part_of_the_public_api():
    import jetmoe

    assert jetmoe.JetMoeCache is JetMoeCache and "JetMoeCache" in jetmoe.__all__


def test_a_large_capacity_hint_is_allocated_as_it_is_used(monkeypatch):
    """generate()'s max_length can be far beyond what a run uses: at most PREALLOCATE positions beyond the first
    update's come up front, then doubling up to the hint, then doubling beyond it."""
    from jetmoe.modeling import cache as cache_module

    monkeypatch.setattr(cache_module, "PREALLOCATE", 8)
    cache, theirs = JetMoeCache(capacity=40), DynamicCache()
    generator = torch.Generator().manual_seed(0)
    capacities = []
    for length in (5, *[1] * 60):
        keys, values = (torch.randn(2, 3, length, 4, generator=generator) for _ in range(2))
        cache.update(keys, values, 0)
        theirs.update(keys, values, 0)
        capacities.append(cache.layers[0]._key_buffer.shape[2])
    assert sorted(set(capacities)) == [13, 26, 40, 80]  # 5 + 8; doubled; capped at the hint; past it, doubled
    _same_contents(cache, theirs)
