"""Weighted data mixtures and their phase schedule.

`data: [web/:0.7, code.jsonl:0.3]` trains on two sources, each tokenised and packed on its own (its own token
file, validation split and per-epoch order), drawn at those weights; `data_phases` changes the weights from a
given step on (as the JetMoE report's second training phase does):

    data_phases: ["20000:web/=0.5,code.jsonl=0.5"]          # or, in YAML/TOML:
    data_phases: [{step: 20000, weights: {web/: 0.5, code.jsonl: 0.5}}]

Which source data position p draws from is a function of (seed, p) alone: positions come in blocks of
_BLOCK, each block's choices drawn from a generator seeded by (seed, block), against the weights of the phase
that position's step falls in. The sequence taken from that source is the next one of its own order (its
count of earlier draws), so a source smaller than its share repeats, epoch by epoch. As with one source, the
run's data position is one integer: a resumed run draws the batches an uninterrupted one draws, and the global
batch is split the same way whatever the number of processes.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

_BLOCK = 4096  # positions per block of draws
_MIX_SEED = 7_340_033  # separates the mixture's draws from the sources' epoch orders
_WEIGHT = re.compile(r"^(?P<path>.+):(?P<weight>[-+0-9.eE]+)$")


@dataclass(frozen=True)
class Phase:
    step: int  # the first step these weights apply to
    weights: tuple[float, ...]  # one per source, in `data` order


def split_weight(entry: str) -> tuple[str, float | None]:
    """`PATH:WEIGHT` -> (PATH, WEIGHT); a plain path -> (path, None)."""
    match = _WEIGHT.match(entry)
    if match is None:
        return entry, None
    try:
        return match["path"], float(match["weight"])
    except ValueError:
        return entry, None


def _entry(entry) -> tuple[str, float | None]:
    if isinstance(entry, dict) and len(entry) == 1:  # YAML's `- web/: 0.7`
        (path, weight), = entry.items()
        try:
            return str(path), float(weight)
        except (TypeError, ValueError):
            raise ValueError(f"data: the weight of {path!r} must be a number, got {weight!r}") from None
    if not isinstance(entry, str):
        raise ValueError(f"data: {entry!r} is not a path, PATH:WEIGHT or {{PATH: WEIGHT}}")
    return split_weight(entry)


def parse_mixture(data: list, phases: list) -> tuple[list[str], list[Phase]] | None:
    """(source paths, phases starting with step 0) for a mixture, None for plain data (no weights, no phases).

    Errors name the entry: a weight that is not positive, a source without a weight among weighted ones, a
    phase naming a source that is not in `data` (or leaving one out), phases out of order."""
    entries = [_entry(entry) for entry in data]
    if all(weight is None for _, weight in entries) and not phases:
        return None
    if not entries:
        raise ValueError("data_phases needs weighted data sources (data: [PATH:WEIGHT, ...])")
    missing = [path for path, weight in entries if weight is None]
    if missing:
        raise ValueError(f"data: give every source a weight (PATH:WEIGHT) or none; {missing} have none")
    paths = [path for path, _ in entries]
    duplicates = sorted({p for p in paths if paths.count(p) > 1})
    if duplicates:
        raise ValueError(f"data: sources {duplicates} are listed more than once")
    for path, weight in entries:
        if not (weight > 0 and np.isfinite(weight)):
            raise ValueError(f"data: the weight of {path!r} must be a positive number, got {weight}")
    result = [Phase(0, tuple(weight for _, weight in entries))]
    for entry in phases:
        phase = _parse_phase(entry, paths)
        if phase.step <= result[-1].step:
            raise ValueError(f"data_phases: step {phase.step} must come after step {result[-1].step} (steps increase, "
                             "from 1; step 0 is data's own weights)")
        result.append(phase)
    return paths, result


def _parse_phase(entry, paths: list[str]) -> Phase:
    where = f"data_phases entry {entry!r}"
    if isinstance(entry, str):
        step, sep, rest = entry.partition(":")
        if not sep:
            raise ValueError(f"{where}: write STEP:PATH=WEIGHT,PATH=WEIGHT")
        weights = {}
        for item in rest.split(","):
            path, sep, weight = item.rpartition("=")
            if not sep:
                raise ValueError(f"{where}: {item!r} is not PATH=WEIGHT")
            weights[path] = weight
    elif isinstance(entry, dict) and set(entry) == {"step", "weights"} and isinstance(entry["weights"], dict):
        step, weights = entry["step"], entry["weights"]
    else:
        raise ValueError(f"{where}: expected 'STEP:PATH=W,PATH=W' or {{step: N, weights: {{PATH: W, ...}}}}")
    try:
        step = int(step)
        weights = {str(path): float(weight) for path, weight in weights.items()}
    except (TypeError, ValueError):
        raise ValueError(f"{where}: the step must be an integer and the weights numbers") from None
    unknown = [path for path in weights if path not in paths]
    if unknown:
        raise ValueError(f"{where}: {unknown} {'is' if len(unknown) == 1 else 'are'} not among the data sources "
                         f"{paths}")
    left_out = [path for path in paths if path not in weights]
    if left_out:
        raise ValueError(f"{where}: give every data source a weight (0 leaves one out); {left_out} have none")
    values = [weights[path] for path in paths]
    if any(not (v >= 0 and np.isfinite(v)) for v in values) or sum(values) <= 0:
        raise ValueError(f"{where}: weights must be >= 0, and not all 0")
    return Phase(step, tuple(values))


def describe(paths: list[str], weights: tuple[float, ...]) -> str:
    total = sum(weights)
    return ", ".join(f"{path} {weight / total:.3g}" for path, weight in zip(paths, weights))


class SourceMix:
    """The sources of a mixture as one text source (what a tokenizer is trained on, and its cache key)."""

    def __init__(self, sources: list):
        self.sources = sources

    def fingerprint(self) -> str:
        digest = hashlib.sha256("|".join(source.fingerprint() for source in self.sources).encode())
        return digest.hexdigest()[:20]

    def texts(self) -> Iterator[str]:
        return itertools.chain.from_iterable(source.texts() for source in self.sources)


class MixedSequences:
    """Sequences drawn from several PackedSequences by weight and phase; the interface of PackedSequences."""

    def __init__(self, parts: list, names: list[str], phases: list[Phase], global_batch: int, seed: int):
        self.parts, self.names, self.phases, self.seed = parts, names, phases, seed
        # A phase starts at the data position of its first step's first sequence.
        self.starts = np.array([phase.step * global_batch for phase in phases], dtype=np.int64)
        edges = [np.cumsum(phase.weights)[:-1] / sum(phase.weights) for phase in phases]
        self.edges = np.array(edges, dtype=np.float64).reshape(len(phases), len(parts) - 1)
        self._counts = [np.zeros(len(parts), dtype=np.int64)]  # draws per source before each block
        self._block: tuple[int, np.ndarray] | None = None
        # Validation: the sources' held-out sequences, interleaved (source, index) so every source is measured.
        val = [(s, int(i)) for pair in itertools.zip_longest(*[p.val_ids for p in parts]) for s, i in enumerate(pair)
               if i is not None]
        self.val_ids = np.array(val, dtype=np.int64).reshape(-1, 2)

    @property
    def num_train(self) -> int:
        return sum(part.num_train for part in self.parts)

    def phase_at(self, step: int) -> Phase:
        return [phase for phase in self.phases if phase.step <= step][-1]

    def _choices(self, block: int) -> np.ndarray:
        """The source of each position of a block."""
        if self._block is None or self._block[0] != block:
            positions = block * _BLOCK + np.arange(_BLOCK, dtype=np.int64)
            phase = np.searchsorted(self.starts, positions, side="right") - 1
            draws = np.random.default_rng([self.seed, _MIX_SEED, block]).random(_BLOCK)
            self._block = (block, (draws[:, None] >= self.edges[phase]).sum(axis=1))
        return self._block[1]

    def counts(self, position: int) -> np.ndarray:
        """Draws per source among data positions [0, position)."""
        block, offset = divmod(position, _BLOCK)
        while len(self._counts) <= block:  # extended once per block; a resumed run walks its past blocks here
            done = len(self._counts) - 1
            self._counts.append(self._counts[done] + np.bincount(self._choices(done), minlength=len(self.parts)))
        return self._counts[block] + np.bincount(self._choices(block)[:offset], minlength=len(self.parts))

    def locate(self, position: int) -> tuple[int, int]:
        """(source, sequence index within that source's split) of data position `position`."""
        source = int(self._choices(position // _BLOCK)[position % _BLOCK])
        drawn = int(self.counts(position)[source])
        return source, self.parts[source].train_index(drawn)

    def train_batch(self, position: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        from .data import _stack

        pairs = []
        for offset in range(size):
            source, index = self.locate(position + offset)
            pairs.append(self.parts[source].sequence(index))
        return _stack(pairs)

    def val_batches(self, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
        """As PackedSequences.val_batches, over the interleaved held-out sequences of every source."""
        from .data import _stack

        used = min(len(self.val_ids), max_batches * batch_size) // world * world
        ids = self.val_ids[:used][rank::world]
        for start in range(0, len(ids), batch_size):
            yield _stack([self.parts[s].sequence(int(i)) for s, i in ids[start : start + batch_size]])
