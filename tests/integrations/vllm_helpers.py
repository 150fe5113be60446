"""Helpers of the vLLM tests: random checkpoints, engines, and the transformers oracle. Import after vLLM is known
to be installed (the tests' pytest.importorskip)."""

import gc
import json
import sys
from pathlib import Path

import torch
import transformers
import vllm

import jetmoe

sys.path.insert(0, str(Path(__file__).parents[1] / "generation"))
from toy_checkpoint import build_toy_checkpoint  # noqa: E402

# vLLM's CPU attention takes head sizes from 32 up; 64 keeps the expert projections' rows 16-byte aligned.
GEOMETRIES = {
    "top2of8": dict(kv_channels=64, num_local_experts=8, num_experts_per_tok=2, seed=0),
    "top3of6": dict(kv_channels=64, num_local_experts=6, num_experts_per_tok=3, intermediate_size=80, seed=1),
}
# Different lengths, so the oracle's batch is left-padded.
PROMPTS = [
    "The Python language",
    "Hello world, hello model, hello tokens and bytes. A mixture of experts routes every token",
    "A",
]
NEW_TOKENS = {"float32": 64, "bfloat16": 32}
LOGPROB_ATOL = 2e-4  # fp32
# Two bf16 steps of a logit between 4 and 8 (these models' largest logits): what counts as a tie in bf16.
BF16_TIE = 0.0625
# The original JetMoE key names, which jetmoe's config reads and transformers' ignores.
ORIGINAL_KEYS = {
    "num_hidden_layers": "num_layers",
    "intermediate_size": "ffn_hidden_size",
    "num_local_experts": "moe_num_experts",
    "num_experts_per_tok": "moe_top_k",
}
KV_CACHE_BYTES = 64 << 20
MAX_MODEL_LEN = 256


def engine(path, dtype, **kwargs):
    return vllm.LLM(
        model=str(path),
        dtype=dtype,
        seed=0,
        max_model_len=MAX_MODEL_LEN,
        max_num_seqs=8,
        kv_cache_memory_bytes=KV_CACHE_BYTES,
        **kwargs,
    )


def close(llm):
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


def make_checkpoints(root: Path) -> dict:
    """name -> (directory, the config with standard keys). top3of6's config.json uses the original key names."""
    out = {}
    for name, fields in GEOMETRIES.items():
        path = build_toy_checkpoint(root / name, **fields)
        config = jetmoe.JetMoeConfig.from_pretrained(path)
        if name == "top3of6":
            raw = json.loads((path / "config.json").read_text())
            for standard, original in ORIGINAL_KEYS.items():
                raw[original] = raw.pop(standard)
            (path / "config.json").write_text(json.dumps(raw, indent=2))
        out[name] = (path, config)
    return out


def oracle(path, config, dtype):
    fields = {k: v for k, v in config.to_dict().items() if k not in ("router_aux_loss_type", "router_z_loss_coef")}
    oracle_config = transformers.JetMoeConfig(**{k: v for k, v in fields.items() if k != "model_type"})
    return transformers.JetMoeForCausalLM.from_pretrained(path, config=oracle_config, dtype=dtype).eval()


def greedy(model, tokenizer, new_tokens):
    """Greedy continuations of PROMPTS as one left-padded batch: (token lists, raw logits per step [B, V])."""
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    model.generation_config.eos_token_id = None  # exactly new_tokens each, as vLLM's ignore_eos
    with torch.no_grad():
        out = model.generate(
            **batch,
            max_new_tokens=new_tokens,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = out.sequences[:, batch.input_ids.shape[1]:].tolist()
    return tokens, torch.stack(out.logits, 1).float()
