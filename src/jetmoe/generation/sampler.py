"""Sampling parameters and the batched next-token choice: penalties, temperature, top-k, top-p, seeded draws.

Every row of a batch has its own parameters. The order of operations is transformers' (penalties on the raw
logits, then temperature, then top-k, then top-p), so a row's distribution is the one `generate()` would
sample from with the same settings. Greedy rows take the argmax after the penalties.

Each sequence draws from its own `torch.Generator`, so a seeded request gives the same tokens whatever else
shares its batch: one uniform number per row and token, mapped through the row's cumulative distribution (all
rows in one search). The vocabulary is sorted only for rows that use top-p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. `temperature == 0` means greedy."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1.0: off
    repetition_penalty: float = 1.0  # transformers' multiplicative penalty over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI's additive penalties over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self):
        def check(ok: bool, name: str, requirement: str):
            if not ok:
                raise ValueError(f"{name} must be {requirement}, got {getattr(self, name)!r}")

        def is_int(value) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def is_number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        check(is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "an integer >= 1")
        check(is_number(self.temperature) and self.temperature >= 0, "temperature", "a number >= 0")
        check(is_int(self.top_k) and self.top_k >= 0, "top_k", "an integer >= 0 (0 disables it)")
        check(is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "a number in (0, 1]")
        check(is_number(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty", "a number > 0")
        check(is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2, "presence_penalty", "in [-2, 2]")
        check(
            is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2, "frequency_penalty", "in [-2, 2]"
        )
        check(self.seed is None or is_int(self.seed), "seed", "an integer or None")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        check(all(isinstance(s, str) and s for s in self.stop), "stop", "a list of non-empty strings")
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        check(all(is_int(t) and t >= 0 for t in self.stop_token_ids), "stop_token_ids", "a list of token ids")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def uses_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()  # fresh entropy per request
        else:
            generator.manual_seed(self.seed)
        return generator


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' rule on tokens already present (`seen` [B, V] bool): divide positive logits by the
    penalty, multiply negative ones by it. `penalty` is [B]."""
    penalty = penalty[:, None]
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI's rule: logit -= frequency * count + presence * (count > 0), counts over output tokens."""
    counts = counts.to(logits.dtype)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def top_k_mask(sorted_logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """For logits sorted descending [B, V]: True where a position falls outside its row's top k (k = 0: none).

    Ties at the k-th value are kept, as transformers' TopKLogitsWarper does (it compares against the k-th
    value rather than counting positions).
    """
    vocab = sorted_logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    kth_value = sorted_logits.gather(1, (k - 1)[:, None])
    return sorted_logits < kth_value


def top_p_mask(sorted_logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """For logits sorted descending [B, V]: True where a position falls outside its row's nucleus, the
    smallest prefix whose probability reaches top_p (the most likely token is always kept)."""
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    return mass_before >= top_p[:, None]


class BatchSampler:
    """Chooses the next token of every row given the last logits [B, V] and the per-row state."""

    def __init__(self, vocab_size: int, num_slots: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        # Per-slot history for the penalties; rows move with their sequence when the engine compacts.
        self.seen = torch.zeros(num_slots, vocab_size, dtype=torch.bool, device=device)
        self.counts = torch.zeros(num_slots, vocab_size, dtype=torch.int32, device=device)

    def reset_slot(self, slot: int, prompt_ids: list[int]) -> None:
        self.seen[slot].zero_()
        self.counts[slot].zero_()
        if prompt_ids:
            ids = torch.tensor(prompt_ids, device=self.seen.device)
            self.seen[slot, ids[ids < self.vocab_size]] = True

    def record(self, slot: int, token: int) -> None:
        self.seen[slot, token] = True
        self.counts[slot, token] += 1

    def move(self, source: int, target: int) -> None:
        self.seen[target] = self.seen[source]
        self.counts[target] = self.counts[source]

    def choose(
        self, logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator], first_slot: int = 0
    ) -> list[int]:
        """logits [B, V] for rows in slots first_slot..first_slot+B-1 -> one token id per row."""
        rows = slice(first_slot, first_slot + logits.shape[0])
        device = logits.device
        if any(p.uses_penalties for p in params):
            logits = logits.float()
            rep = torch.tensor([p.repetition_penalty for p in params], device=device)
            logits = apply_repetition_penalty(logits, self.seen[rows], rep)
            presence = torch.tensor([p.presence_penalty for p in params], device=device)
            frequency = torch.tensor([p.frequency_penalty for p in params], device=device)
            logits = apply_presence_frequency(logits, self.counts[rows], presence, frequency)

        # max's indices are argmax's (the first largest; NaN counts as largest), and ATen's max reduces bf16
        # rows several times faster than its argmax (docs/performance.md)
        choices = logits.max(dim=-1).indices.tolist()
        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if not sampled:
            return choices
        logits = logits.float()
        index = torch.tensor(sampled, device=device)
        chosen = logits[index] / torch.tensor([params[i].temperature for i in sampled], device=device)[:, None]
        if all(params[i].top_p >= 1 for i in sampled):
            # No nucleus: no need to sort the vocabulary (a sort of [8, 32000] cost more than the rest of a
            # decoding step of the bundled model). top-k keeps what the sorted path keeps: values >= the k-th.
            top_k = [params[i].top_k for i in sampled]
            if any(top_k):
                k = torch.tensor(top_k, device=device).clamp(max=self.vocab_size)
                best = chosen.topk(int(k.max()), dim=-1).values
                kth = best.gather(1, (k.clamp(min=1) - 1)[:, None]).masked_fill(k[:, None] == 0, -math.inf)
                chosen = chosen.masked_fill(chosen < kth, -math.inf)
            picks = draw(chosen.softmax(dim=-1), [generators[i] for i in sampled])
            for i, pick in zip(sampled, picks):
                choices[i] = pick
            return choices
        sorted_logits, sorted_ids = chosen.sort(dim=-1, descending=True)
        top_k = torch.tensor([params[i].top_k for i in sampled], device=device)
        sorted_logits = sorted_logits.masked_fill(top_k_mask(sorted_logits, top_k), -math.inf)
        top_p = torch.tensor([params[i].top_p for i in sampled], device=device)
        sorted_logits = sorted_logits.masked_fill(top_p_mask(sorted_logits, top_p), -math.inf)
        picks = draw(sorted_logits.softmax(dim=-1), [generators[i] for i in sampled])
        for j, (i, pick) in enumerate(zip(sampled, picks)):
            choices[i] = int(sorted_ids[j, pick])
        return choices


def draw(probs: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """One index per row of probs [R, V] (rows summing to ~1), row r drawn with generators[r]: the inverse of
    each row's cumulative distribution at a uniform draw (one batched cumsum and search instead of a
    `torch.multinomial` over the vocabulary per row). Never an index of probability 0."""
    cdf = probs.double().cumsum(dim=-1)
    if not bool(torch.isfinite(cdf[:, -1]).all()):
        raise ValueError("sampling: a row's probabilities are not finite (nan or inf in the logits)")
    uniform = torch.cat([torch.rand(1, generator=g, dtype=torch.float64, device=probs.device) for g in generators])
    result = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True)[:, 0].tolist()
    for row, pick in enumerate(result):
        if pick == probs.shape[-1]:  # rounding put the draw at the very end: the last possible index
            pick -= 1
            while probs[row, pick] == 0:
                pick -= 1
            result[row] = pick
    return result
