"""Fast generation: a slot K/V cache engine with continuous batching, sampling, streaming text, int8 weights.

from jetmoe.generation import Engine, SamplingParams, load
model, tokenizer, _ = load("path/to/checkpoint")          # or load() for the bundled tiny model
engine = Engine(model, tokenizer, max_batch=8)
print(engine.generate(["The Python language"], SamplingParams(max_tokens=32, temperature=0))[0].text)
"""

from .cache import SlotKVCache
from .chat import chat_prompt_ids
from .detokenizer import StopMatcher, StreamingDetokenizer
from .engine import Completion, Engine, Sequence, StepOutput
from .loading import load, load_model
from .quantize import load_quantized, quantize_model, save_quantized
from .sampler import SamplingParams

__all__ = [
    "Completion",
    "Engine",
    "SamplingParams",
    "Sequence",
    "SlotKVCache",
    "StepOutput",
    "StopMatcher",
    "StreamingDetokenizer",
    "chat_prompt_ids",
    "load",
    "load_model",
    "load_quantized",
    "quantize_model",
    "save_quantized",
]
