"""Sampler: masks and penalties against transformers' logits processors, seeded draws, parameter checks."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from jetmoe.generation.sampler import (
    BatchSampler,
    SamplingParams,
    apply_presence_frequency,
    apply_repetition_penalty,
    draw,
    top_k_mask,
    top_p_mask,
)

VOCAB = 50


def random_logits(rows=4, seed=0):
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def unsort(sorted_mask, order):
    return torch.zeros_like(sorted_mask).scatter(1, order, sorted_mask)


@pytest.mark.parametrize("k", [1, 2, 7, VOCAB, VOCAB + 5])
def test_top_k_mask_matches_transformers(k):
    logits = random_logits()
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ours = unsort(top_k_mask(sorted_logits, torch.full((4,), k)), order)
    theirs = torch.isinf(TopKLogitsWarper(top_k=k)(None, logits.clone()))
    assert torch.equal(ours, theirs)
    assert (~ours).sum(-1).tolist() == [min(k, VOCAB)] * 4


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_mask_is_the_smallest_nucleus(p):
    logits = random_logits(seed=1)
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    masked = top_p_mask(sorted_logits, torch.full((4,), p))
    probs = sorted_logits.softmax(-1)
    for row in range(4):
        kept = int((~masked[row]).sum())
        assert not masked[row, :kept].any()  # a prefix of the sorted order
        assert probs[row, :kept].sum() >= p - 1e-6 or kept == VOCAB  # reaches p ...
        assert kept == 1 or probs[row, : kept - 1].sum() < p  # ... and no shorter prefix does
    theirs = torch.isinf(TopPLogitsWarper(top_p=p)(None, logits.clone()))
    assert torch.equal(unsort(masked, order), theirs)


def test_per_row_parameters():
    logits = random_logits()
    sorted_logits, _ = logits.sort(dim=-1, descending=True)
    kept = (~top_k_mask(sorted_logits, torch.tensor([0, 1, 3, 10]))).sum(-1).tolist()
    assert kept == [VOCAB, 1, 3, 10]  # k = 0 disables


def test_repetition_penalty_matches_transformers():
    logits = random_logits()
    history = torch.randint(0, VOCAB, (4, 12), generator=torch.Generator().manual_seed(3))
    seen = torch.zeros(4, VOCAB, dtype=torch.bool).scatter(1, history, True)
    ours = apply_repetition_penalty(logits, seen, torch.full((4,), 1.3))
    theirs = RepetitionPenaltyLogitsProcessor(penalty=1.3)(history, logits.clone())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_presence_and_frequency_penalties():
    logits = torch.zeros(1, 4)
    counts = torch.tensor([[0, 1, 3, 0]])
    out = apply_presence_frequency(logits, counts, torch.tensor([0.5]), torch.tensor([0.25]))
    assert out.tolist() == [[0.0, -0.75, -1.25, 0.0]]


def test_greedy_rows_take_the_penalised_argmax():
    sampler = BatchSampler(VOCAB, num_slots=2)
    logits = torch.zeros(2, VOCAB)
    logits[:, 7] = 2.0
    logits[:, 8] = 1.9
    sampler.reset_slot(0, [7])  # slot 0 has seen token 7 in its prompt
    sampler.reset_slot(1, [7])
    params = [SamplingParams(temperature=0, repetition_penalty=1.5), SamplingParams(temperature=0)]
    generators = [p.make_generator() for p in params]
    assert sampler.choose(logits, params, generators) == [8, 7]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_greedy_choice_is_torch_argmax_with_ties_and_nan(dtype):
    """The first largest logit, NaN counting as largest, as argmax picks it, over a vocabulary of the model's size."""
    sampler = BatchSampler(32000, num_slots=6)
    logits = torch.randint(-3, 4, (6, 32000), generator=torch.Generator().manual_seed(0)).to(dtype)  # many ties
    logits[1, [5, 31000]] = float("nan")
    logits[2] = float("-inf")
    logits[3, 100] = logits[3, 20000] = 10.0
    params = [SamplingParams(temperature=0)] * 6
    choices = sampler.choose(logits, params, [p.make_generator() for p in params])
    assert choices == logits.argmax(dim=-1).tolist()
    assert choices[1:4] == [5, 0, 100]


@pytest.mark.parametrize(
    "settings",
    [dict(top_k=3), dict(top_k=0), dict(top_k=5, top_p=0.8), dict(top_p=0.7)],
    ids=["top-k", "untruncated", "top-k-and-top-p", "top-p"],
)
def test_sampling_follows_the_masked_distribution(settings):
    """Only the tokens transformers' warpers keep appear, at frequencies close to their renormalised
    probabilities (without top-p the draw skips sorting the vocabulary; with it, it samples the sorted one)."""
    sampler = BatchSampler(VOCAB, num_slots=2)
    logits = random_logits(rows=2, seed=5)
    params = [SamplingParams(temperature=0.8, seed=0, **settings), SamplingParams(temperature=0.8, seed=1)]
    generators = [p.make_generator() for p in params]  # row 1: untruncated, beside row 0's settings
    draws = torch.tensor([sampler.choose(logits, params, generators) for _ in range(3000)])
    for row, setting in enumerate((settings, {})):
        warped = TemperatureLogitsWarper(0.8)(None, logits[row : row + 1].clone())
        if setting.get("top_k"):
            warped = TopKLogitsWarper(setting["top_k"])(None, warped)
        if setting.get("top_p"):
            warped = TopPLogitsWarper(setting["top_p"])(None, warped)
        probs = warped.softmax(-1)[0]
        allowed = set(probs.nonzero().flatten().tolist())
        assert set(draws[:, row].tolist()) <= allowed
        if setting.get("top_k") and not setting.get("top_p"):
            assert len(allowed) == setting["top_k"]
        for token in allowed:
            frequency = (draws[:, row] == token).float().mean().item()
            assert abs(frequency - probs[token].item()) < 4 * math.sqrt(probs[token].item() / 3000) + 0.01


def test_draw_follows_each_rows_distribution_and_skips_impossible_indices():
    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]])
    generators = [torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)]
    draws = torch.tensor([draw(probs, generators) for _ in range(4000)])
    assert set(draws[:, 1].tolist()) == {5}
    for token in range(6):
        frequency = (draws[:, 0] == token).float().mean().item()
        assert abs(frequency - probs[0, token].item()) < 4 * math.sqrt(probs[0, token].item() / 4000) + 0.005
    assert draw(probs, [torch.Generator().manual_seed(7)] * 2) == draw(probs, [torch.Generator().manual_seed(7)] * 2)
    with pytest.raises(ValueError, match="not finite"):
        draw(torch.tensor([[0.5, float("nan")]]), [torch.Generator()])


def test_same_seed_same_draws_other_seed_other_draws():
    sampler = BatchSampler(VOCAB, num_slots=2)
    logits = torch.zeros(2, VOCAB)  # uniform: every draw is pure randomness

    def draws(seed_a, seed_b, n=20):
        params = [SamplingParams(seed=seed_a), SamplingParams(seed=seed_b)]
        generators = [p.make_generator() for p in params]
        return [sampler.choose(logits, params, generators) for _ in range(n)]

    first = draws(1, 2)
    assert first == draws(1, 2)
    assert [row[0] for row in first] == [row[1] for row in draws(3, 1)]  # a row's draws depend only on its seed
    assert [row[0] for row in first] != [row[1] for row in first]


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_tokens", 0),
        ("max_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("repetition_penalty", 0),
        ("presence_penalty", 3),
        ("frequency_penalty", -2.5),
        ("seed", "42"),
        ("stop", [""]),
        ("stop", [3]),
        ("stop_token_ids", [-1]),
    ],
)
def test_invalid_parameters_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_stop_accepts_a_single_string():
    assert SamplingParams(stop="END").stop == ("END",)
