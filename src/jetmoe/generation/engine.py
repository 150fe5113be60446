"""The generation engine: slots over a preallocated K/V cache, prefill, then one batched decode step at a time.

Life of a request (a `Sequence`):
  add()   prefill its prompt into a free slot (eager: prompt lengths vary) and choose its first token
  step()  one forward over the newest token of every running sequence, each at its own position
          (optionally torch.compile'd), then choose, detokenise, check stop conditions
  finish  the slot is freed at once and the last running sequence moves into it, so the running batch is
          always slots 0..n-1 and the cache is read as a view

A sequence may join between any two steps (continuous batching): `generate()` here and the server's
scheduler both drive the same add/step loop. Greedy decoding gives the tokens `model.generate()` gives.
"""

from __future__ import annotations

import itertools
import time
import warnings
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cache import SlotKVCache
from .detokenizer import StopMatcher, StreamingDetokenizer
from .sampler import BatchSampler, SamplingParams

_ids = itertools.count()
# Decode attends over the cache prefix rounded up to this many positions: few distinct shapes (compile
# reuses its graphs) while reading little more than the rows' real lengths.
VIEW_BUCKET = 64


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (end-of-sequence token or stop string), "length", or "abort"
    prompt_tokens: int
    first_token_time: float | None = None  # time.perf_counter() when the first token was chosen
    finish_time: float | None = None  # ... and when the last one was

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first over the time they took (the decode rate, prefill excluded)."""
        if self.first_token_time is None or self.finish_time is None or self.completion_tokens < 2:
            return None
        return (self.completion_tokens - 1) / max(self.finish_time - self.first_token_time, 1e-9)


class Sequence:
    """One request's state: its tokens, sampler settings and random stream, and its streamed text."""

    def __init__(
        self, prompt_ids: list[int], params: SamplingParams, tokenizer, request_id: str | None = None, device="cpu"
    ):
        self.request_id = request_id or f"seq-{next(_ids)}"
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.output_ids: list[int] = []
        self.text = ""
        self.finish_reason: str | None = None
        self.slot: int | None = None
        self.first_token_time: float | None = None
        self.last_token_time: float | None = None
        self.generator = params.make_generator(device)  # on the logits' device: torch.multinomial needs that
        self._detokenizer = StreamingDetokenizer(tokenizer, prompt_ids, params.skip_special_tokens)
        self._stops = StopMatcher(params.stop)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def cache_len(self) -> int:
        """Tokens whose K/V are in the cache: all but the newest output token."""
        return len(self.prompt_ids) + len(self.output_ids) - 1

    def completion(self) -> Completion:
        return Completion(
            self.text, list(self.output_ids), self.finish_reason or "abort", len(self.prompt_ids),
            self.first_token_time, self.last_token_time,
        )  # fmt: skip

    def _push_text(self, token_id: int) -> str:
        return self._stops.feed(self._detokenizer.push(token_id))

    def _finish(self, reason: str) -> str:
        self.finish_reason = reason
        if self._stops.stopped:
            return ""
        return self._stops.feed(self._detokenizer.flush()) + self._stops.flush()


@dataclass
class StepOutput:
    sequence: Sequence
    token_id: int
    text: str  # newly visible text (may be "")
    finished: bool


def _eos_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
            break
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def _inductor_keeping_mv(graph_module, example_inputs):
    """torch.compile's inductor backend, except that matrix-vector products stay aten calls.

    Inductor rewrites `mv` as a reduction of its own, which reads bf16 weights slower than aten's kernel, and a
    large model's decode step is nearly all such products (docs/performance.md).
    (inductor's caches key on the graph, not on this table: a graph cached by plain inductor is reused as is.)

    `mv` is registered as an explicit fallback (an aten call in the generated code). Left to inductor's implicit
    fallback, an undecomposed op that has a decomposition is an error wherever the environment sets `CI`.
    The registration is harmless to plain inductor, which decomposes `mv` before lowering.
    """
    from torch._inductor import lowering
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    mv = (torch.ops.aten.mv.default, torch.ops.aten.mv.out)
    decompositions = {op: fn for op, fn in select_decomp_table().items() if op not in mv}
    if torch.ops.aten.mv.default not in lowering.lowerings:
        lowering.make_fallback(torch.ops.aten.mv.default, warn=False, get_decomp_fn=lambda: decompositions)
    return compile_fx(graph_module, example_inputs, decompositions=decompositions)


# Guards dynamo keeps on the compiled decode step. By default it re-checks the whole model before every call
# (each module's hooks, attributes and parameters), a large part of a small model's step; these keep a small
# fraction of that cost (docs/performance.md). Kept: the guards on tensors that are not parameters
# (the step's inputs and the K/V cache: their shapes decide the graph), the relations between their dynamic
# sizes (the shape environment's guard: a step traced with as many running rows as the cache has slots shares
# one size between the two, and must not run a smaller batch), and the global state (grad mode and the like).
# Dropped: the guards on the model's modules, parameters and code. The engine owns its model in eval mode
# for its lifetime; parameters are read afresh at every call (so in-place weight updates are seen), but a model
# whose modules are changed or swapped after the engine compiled needs a new engine. Each engine keeps its own
# compiled entries (`isolate_recompiles`), so another engine's graph, for another model, is never reused.
_KEPT_GUARDS = frozenset(
    ("SHAPE_ENV", "GRAD_MODE", "GLOBAL_STATE", "DEFAULT_DEVICE", "DETERMINISTIC_ALGORITHMS", "TORCH_FUNCTION_STATE")
)


def _decode_step_guards(entries) -> list[bool]:
    return [
        (entry.guard_type == "TENSOR_MATCH" and not isinstance(entry.value, torch.nn.Parameter))
        or entry.guard_type in _KEPT_GUARDS
        for entry in entries
    ]


class Engine:
    """Runs many sequences through one model. Not thread-safe: one thread drives add/step/cancel."""

    def __init__(self, model, tokenizer, max_batch: int = 8, max_len: int | None = None, compile: bool = False):
        config = model.config
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.max_len = int(max_len or config.max_position_embeddings)
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")
        embeddings = model.get_input_embeddings().weight
        self.device = embeddings.device
        self.cache = SlotKVCache(config, max_batch, self.max_len, embeddings.dtype, self.device)
        self.sampler = BatchSampler(config.vocab_size, max_batch, self.device)
        self.eos_ids = _eos_ids(model, tokenizer)
        self.running: list[Sequence] = []
        self.compiled = compile
        self._decode = self._compile_decode() if compile else self._decode_eager
        self._decode_checked = not compile
        self.last_completion: Completion | None = None  # of the latest stream()

    # ---- requests -------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt)["input_ids"]
        return list(prompt)

    def make_sequence(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None) -> Sequence:
        """Validate a prompt against the context and the vocabulary; the sequence is not started yet."""
        ids = self.encode(prompt)
        if not ids:
            raise ValueError("the prompt is empty (no tokens)")
        if len(ids) >= self.max_len:
            raise ValueError(f"the prompt has {len(ids)} tokens; the context holds {self.max_len} (prompt + output)")
        vocab = self.model.config.vocab_size
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary of size {vocab}")
        return Sequence(ids, params, self.tokenizer, request_id, self.device)

    @property
    def free_slots(self) -> int:
        return self.max_batch - len(self.running)

    @torch.no_grad()
    def add(self, sequence: Sequence) -> StepOutput:
        """Prefill `sequence` into a free slot and choose its first token."""
        if not self.free_slots:
            raise RuntimeError("no free slot: wait for a running sequence to finish")
        slot, length = len(self.running), len(sequence.prompt_ids)
        ids = torch.tensor([sequence.prompt_ids], device=self.device)
        positions = torch.arange(length, device=self.device)
        causal = (positions[None, :] <= positions[:, None])[None, None]
        self.cache.begin_prefill(slot, length)
        logits = self.model(
            input_ids=ids,
            position_ids=positions[None],
            attention_mask=causal,
            past_key_values=self.cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[:, -1]
        sequence.slot = slot
        self.running.append(sequence)
        self.sampler.reset_slot(slot, sequence.prompt_ids)
        token = self.sampler.choose(logits, [sequence.params], [sequence.generator], first_slot=slot)[0]
        output = self._accept(sequence, token)
        if output.finished:
            self._release(sequence)
        return output

    @torch.no_grad()
    def step(self) -> list[StepOutput]:
        """One decode step for every running sequence; finished ones leave the batch."""
        if not self.running:
            return []
        running = list(self.running)
        positions = torch.tensor([s.cache_len for s in running], device=self.device)
        view_len = min(-(-(max(s.cache_len for s in running) + 1) // VIEW_BUCKET) * VIEW_BUCKET, self.max_len)
        mask = (torch.arange(view_len, device=self.device)[None, :] <= positions[:, None])[:, None, None, :]
        ids = torch.tensor([[s.output_ids[-1]] for s in running], device=self.device)
        self.cache.begin_decode(positions, mask)
        logits = self._decode_once(ids, positions, mask)
        tokens = self.sampler.choose(logits, [s.params for s in running], [s.generator for s in running])
        outputs = [self._accept(s, t) for s, t in zip(running, tokens)]
        for output in outputs:
            if output.finished:
                self._release(output.sequence)
        return outputs

    def _decode_once(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self._decode_checked:
            return self._decode(ids, positions, mask)
        # The first compiled call traces the model. If tracing fails (an op without a compile path for this
        # dtype, say), decode eagerly instead: same results, and nothing was written yet.
        self._decode_checked = True
        try:
            return self._decode(ids, positions, mask)
        except Exception as error:  # noqa: BLE001 - any tracing failure means "cannot compile here"
            warnings.warn(f"torch.compile of the decode step failed; decoding eagerly ({type(error).__name__}: "
                          f"{str(error).splitlines()[0] if str(error) else ''})", stacklevel=2)  # fmt: skip
            self._decode, self.compiled = self._decode_eager, False
            return self._decode(ids, positions, mask)

    def _compile_decode(self):
        """The decode step through torch.compile. The routers read their few experts to the host (few-token
        routing plans, no sort); with `capture_scalar_outputs` dynamo traces those reads as symbolic ints
        instead of breaking the graph, which is faster (docs/performance.md)."""
        compiled = torch.compile(
            self._decode_eager,
            dynamic=True,
            backend=_inductor_keeping_mv,
            options={"guard_filter_fn": _decode_step_guards},
            isolate_recompiles=True,  # this engine's own compiled entries: never another model's graph
        )

        def decode(ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            # Set and restored by hand: `config.patch` costs far more per call (docs/performance.md).
            config, before = torch._dynamo.config, torch._dynamo.config.capture_scalar_outputs
            config.capture_scalar_outputs = True
            try:
                return compiled(ids, positions, mask)
            finally:
                config.capture_scalar_outputs = before

        return decode

    def _decode_eager(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not torch.compiler.is_compiling():  # the model's whole step in one backend call, where it has one
            logits = self.model.decode_logits(ids, positions[:, None], mask, self.cache)
            if logits is not None:
                return logits
        out = self.model(
            input_ids=ids,
            position_ids=positions[:, None],
            attention_mask=mask,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.logits[:, -1]

    def cancel(self, sequence: Sequence) -> None:
        """Stop a sequence now (e.g. its client went away); its slot is free for the next add()."""
        if sequence.finished:
            return
        sequence.finish_reason = "abort"
        if sequence.slot is not None:
            self._release(sequence)

    # ---- bookkeeping ----------------------------------------------------------------------------------
    def _accept(self, sequence: Sequence, token: int) -> StepOutput:
        params = sequence.params
        sequence.output_ids.append(token)
        sequence.last_token_time = time.perf_counter()
        if sequence.first_token_time is None:
            sequence.first_token_time = sequence.last_token_time
        if params.uses_penalties:  # the history is read for penalties only (two indexed writes a token otherwise)
            self.sampler.record(sequence.slot, token)
        reason = None
        if (token in self.eos_ids and not params.ignore_eos) or token in params.stop_token_ids:
            reason = "stop"
            text = ""  # the end token itself never shows
        else:
            text = sequence._push_text(token)
            if sequence._stops.stopped:
                reason = "stop"
        if reason is None and len(sequence.output_ids) >= params.max_tokens:
            reason = "length"
        if reason is None and len(sequence.prompt_ids) + len(sequence.output_ids) >= self.max_len:
            reason = "length"  # the context is full
        if reason is not None:
            text += sequence._finish(reason)
        sequence.text += text
        return StepOutput(sequence, token, text, reason is not None)

    def _release(self, sequence: Sequence) -> None:
        slot, last = sequence.slot, self.running[-1]
        if last is not sequence:
            self.cache.move(last.slot, slot, last.cache_len)
            self.sampler.move(last.slot, slot)
            last.slot = slot
            self.running[slot] = last
        self.running.pop()
        sequence.slot = None

    # ---- convenience drivers --------------------------------------------------------------------------
    def generate(
        self, prompts: list[str | list[int]] | str, params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Complete every prompt; more prompts than slots queue and join the batch as slots free up."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        params = params if params is not None else SamplingParams()
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        if len(all_params) != len(prompts):
            raise ValueError(f"got {len(all_params)} SamplingParams for {len(prompts)} prompts")
        sequences = [self.make_sequence(p, sp) for p, sp in zip(prompts, all_params)]
        waiting = deque(sequences)
        while waiting or any(not s.finished for s in sequences):
            while waiting and self.free_slots:
                self.add(waiting.popleft())
            self.step()
        return [s.completion() for s in sequences]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Text pieces of one completion as they are decoded (the sequence ends when the iterator does)."""
        sequence = self.make_sequence(prompt, params or SamplingParams())
        try:
            output = self.add(sequence)
            if output.text:
                yield output.text
            while not sequence.finished:
                for output in self.step():
                    if output.sequence is sequence and output.text:
                        yield output.text
        finally:
            self.cancel(sequence)
        self.last_completion = sequence.completion()
