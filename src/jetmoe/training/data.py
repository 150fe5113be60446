"""Tokenise once into memory-mapped token files, pack fixed-length sequences, split, and order them.

Token files live in a cache folder keyed by the data's and the tokenizer's fingerprints, so a second run on
the same data reuses them; they are written to a temporary name and renamed when complete, and read as
numpy memmaps, so a corpus larger than RAM is fine.

Packing: every document is followed by the eos token (the separator), documents are concatenated into one
stream, and the stream is cut into sequences of `seq_len` tokens. Conversations carry a loss mask (prompt
tokens 0), stored beside the tokens; a masked token's label is -100.

Splitting and order: a fixed permutation (independent of the run seed, so runs with different seeds see the
same validation set) holds out `val_fraction` of the sequences. Training visits the rest epoch by epoch, in
an order drawn from (seed, epoch). The data position of a run is one integer, the number of sequences already
consumed, which is what a checkpoint stores.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import numpy as np
import torch

from .objective import IGNORE_INDEX
from .sources import Source
from .tokenizer import adds_bos, encode_conversation, encode_documents, fingerprint

_SPLIT_SEED = 20240404  # fixed: the validation set does not move when the run seed does
_BATCH_DOCS = 64  # documents tokenised per call (the fast tokenizer parallelises within a call)


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser("~"), ".cache", "jetmoe", "tokens")


@dataclass
class TokenFile:
    """A tokenised corpus on disk: tokens (uint16/uint32) and, for conversations, a 0/1 loss mask."""

    path: str
    tokens: np.memmap
    mask: np.memmap | None
    documents: int

    @classmethod
    def open(cls, path: str) -> TokenFile:
        with open(os.path.join(path, "meta.json")) as handle:
            meta = json.load(handle)
        tokens = np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r")
        mask = np.memmap(os.path.join(path, "mask.bin"), dtype=np.uint8, mode="r") if meta["masked"] else None
        if len(tokens) != meta["tokens"] or (mask is not None and len(mask) != meta["tokens"]):
            raise ValueError(f"token file {path!r} is truncated ({len(tokens)} of {meta['tokens']} tokens); delete it")
        return cls(path=path, tokens=tokens, mask=mask, documents=meta["documents"])


def token_file_path(cache_dir: str, source: Source, tokenizer) -> str:
    return os.path.join(cache_dir, f"{source.fingerprint()}-{fingerprint(tokenizer)}")


def build_token_file(source: Source, tokenizer, cache_dir: str, log=print) -> TokenFile:
    """The token file for (source, tokenizer): reused when present, else written once."""
    path = token_file_path(cache_dir, source, tokenizer)
    if os.path.exists(os.path.join(path, "meta.json")):
        return TokenFile.open(path)
    os.makedirs(cache_dir, exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.uint32
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if adds_bos(tokenizer) else []
    count = documents = 0
    masked = source.data_format == "chat"
    log(f"tokenising {source.data_format} data into {path}")
    with open(os.path.join(partial, "tokens.bin"), "wb") as tok_out, open(os.path.join(partial, "mask.bin"), "wb") as mask_out:

        def write(ids: list[int], mask: list[int] | None) -> None:
            nonlocal count
            tok_out.write(np.asarray(ids, dtype=dtype).tobytes())
            if masked:
                mask_out.write(np.asarray(mask, dtype=np.uint8).tobytes())
            count += len(ids)

        pending: list[str] = []
        starts_document = True

        def flush_documents() -> None:
            nonlocal documents, starts_document
            for text, ids in zip(pending, encode_documents(tokenizer, pending)):
                ends = getattr(text, "last", True)
                ids = (bos if starts_document else []) + ids + ([eos] if ends else [])
                write(ids, None)
                documents += ends
                starts_document = ends
            pending.clear()

        for example in source.examples():
            if isinstance(example, str):
                pending.append(example)
                if len(pending) >= _BATCH_DOCS:
                    flush_documents()
            else:
                ids, mask = encode_conversation(tokenizer, example)
                if not ids or ids[-1] != eos:  # the separator; templates that end turns with eos have it already
                    ids, mask = ids + [eos], mask + [1]
                write(ids, mask)
                documents += 1
        flush_documents()
    if count == 0:
        shutil.rmtree(partial, ignore_errors=True)
        raise ValueError("the data holds no tokens")
    with open(os.path.join(partial, "meta.json"), "w") as handle:
        json.dump({"tokens": count, "documents": documents, "dtype": np.dtype(dtype).name, "masked": masked}, handle)
    if not masked:
        os.remove(os.path.join(partial, "mask.bin"))
    try:
        os.rename(partial, path)
    except OSError:  # another process finished the same file first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
    log(f"tokenised {documents} documents into {count} tokens")
    return TokenFile.open(path)


class PackedSequences:
    """Fixed-length sequences over a token file, split into train and validation, with a deterministic order."""

    def __init__(self, token_file: TokenFile, seq_len: int, val_fraction: float, seed: int):
        self.file = token_file
        self.seq_len = seq_len
        self.seed = seed
        total = len(token_file.tokens) // seq_len
        if total < 2 and val_fraction > 0 or total < 1:
            raise ValueError(
                f"the data holds {len(token_file.tokens)} tokens: not enough for "
                f"{'two sequences' if val_fraction > 0 else 'one sequence'} of seq_len={seq_len}; "
                "add data or shorten seq_len"
            )
        order = np.random.default_rng(_SPLIT_SEED).permutation(total)
        n_val = int(round(val_fraction * total))
        n_val = max(1, n_val) if val_fraction > 0 else 0
        self.val_ids = np.sort(order[:n_val])
        self.train_ids = np.sort(order[n_val:])
        self._epoch_cache: tuple[int, np.ndarray] | None = None

    @property
    def num_train(self) -> int:
        return len(self.train_ids)

    def sequence(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels) of packed sequence `index` (labels -100 where the loss is masked)."""
        start = index * self.seq_len
        ids = np.asarray(self.file.tokens[start : start + self.seq_len], dtype=np.int64)
        labels = ids.copy()
        if self.file.mask is not None:
            labels[np.asarray(self.file.mask[start : start + self.seq_len]) == 0] = IGNORE_INDEX
        return ids, labels

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._epoch_cache = (epoch, self.train_ids[rng.permutation(len(self.train_ids))])
        return self._epoch_cache[1]

    def train_index(self, position: int) -> int:
        """The sequence at data position `position` (counting sequences consumed since the run started)."""
        epoch, offset = divmod(position, self.num_train)
        return int(self._epoch_order(epoch)[offset])

    def train_batch(self, position: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _stack([self.sequence(self.train_index(position + i)) for i in range(size)])

    def val_batches(self, batch_size: int, max_batches: int, rank: int = 0, world: int = 1):
        """This process's share of the validation sequences used: the first max_batches * batch_size (whatever the
        number of processes, so the perplexity does not depend on it), cut to a multiple of the process count
        so that every process runs the same number of forward passes (FSDP gathers weights collectively)."""
        used = min(len(self.val_ids), max_batches * batch_size) // world * world
        ids = self.val_ids[:used][rank::world]
        for start in range(0, len(ids), batch_size):
            yield _stack([self.sequence(int(i)) for i in ids[start : start + batch_size]])


def _stack(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.from_numpy(np.stack([p[0] for p in pairs]))
    labels = torch.from_numpy(np.stack([p[1] for p in pairs]))
    return ids, labels


def step_positions(step: int, batch_size: int, grad_accum: int, world: int, rank: int, micro: int) -> int:
    """First data position of micro-batch `micro` of process `rank` at optimizer step `step`.

    Each step consumes batch_size * grad_accum * world sequences; the same global batch is split the same way
    whatever the number of processes (micro-batch r * grad_accum + m), so 1 process x 2 micro-batches and
    2 processes x 1 micro-batch see the same micro-batches.
    """
    global_batch = batch_size * grad_accum * world
    return step * global_batch + (rank * grad_accum + micro) * batch_size


def prepare_tokenizer(config, source: Source, out_dir: str, cache_dir: str, is_main: bool, barrier, log=print):
    """The run's tokenizer: given, the fine-tuned checkpoint's, the run's own (resume), or a BPE trained here.

    A trained BPE is cached by (data, vocab size) and saved into `out_dir/tokenizer` (and so into checkpoints).
    """
    from .tokenizer import load_tokenizer, train_bpe

    own = os.path.join(out_dir, "tokenizer")
    if config.tokenizer:
        return load_tokenizer(config.tokenizer)
    if config.init_from and os.path.exists(os.path.join(config.init_from, "tokenizer_config.json")):
        return load_tokenizer(config.init_from)
    if os.path.exists(os.path.join(own, "tokenizer_config.json")):
        return load_tokenizer(own)
    vocab_size = int(config.model.get("vocab_size", 32000))
    cached = os.path.join(cache_dir, f"bpe-{source.fingerprint()}-{vocab_size}")
    if is_main and not os.path.exists(os.path.join(cached, "tokenizer_config.json")):
        log(f"training a byte-level BPE tokenizer (vocab {vocab_size}) on the data")
        tokenizer = train_bpe(source.texts(), vocab_size)
        partial = f"{cached}.partial-{os.getpid()}"
        tokenizer.save_pretrained(partial)
        try:
            os.rename(partial, cached)
        except OSError:
            shutil.rmtree(partial, ignore_errors=True)
    barrier()
    tokenizer = load_tokenizer(cached)
    if is_main:
        tokenizer.save_pretrained(own)
    return tokenizer


def prepare_data(config, out_dir: str, is_main: bool = True, barrier=lambda: None, log=print, global_batch: int = 1):
    """(tokenizer, PackedSequences or MixedSequences) for a run; the main process tokenises, the others wait and
    reuse. `global_batch` (sequences per step) places a mixture's phase changes."""
    from .mixture import MixedSequences, SourceMix, describe, parse_mixture
    from .sources import resolve_source

    mixture = parse_mixture(list(config.data), list(config.data_phases))
    if mixture is None:
        sources = [resolve_source(list(config.data), config.data_format, config.text_field)]
    else:
        sources = [resolve_source([path], config.data_format, config.text_field) for path in mixture[0]]
    cache_dir = config.cache_dir or default_cache_dir()
    tokenizer = prepare_tokenizer(config, sources[0] if mixture is None else SourceMix(sources), out_dir, cache_dir,
                                  is_main, barrier, log)
    if is_main:
        for source in sources:
            build_token_file(source, tokenizer, cache_dir, log)
    barrier()
    parts = []
    for source, name in zip(sources, mixture[0] if mixture else ["data"]):
        token_file = TokenFile.open(token_file_path(cache_dir, source, tokenizer))
        try:
            parts.append(PackedSequences(token_file, config.seq_len, config.val_fraction, config.seed))
        except ValueError as error:
            raise ValueError(f"data source {name!r}: {error}" if mixture else str(error)) from None
    if mixture is None:
        return tokenizer, parts[0]
    paths, phases = mixture
    for phase in phases:
        log(f"data mixture from step {phase.step}: {describe(paths, phase.weights)}")
    return tokenizer, MixedSequences(parts, paths, phases, global_batch, config.seed)
