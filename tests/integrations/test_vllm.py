"""JetMoE on vLLM (jetmoe.integrations.vllm) against transformers' JetMoeForCausalLM (the oracle) and jetmoe.

Runs where vLLM is installed (`make test-vllm`: the .venv-vllm environment); skips elsewhere. Engines start in
this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, one at a time through one parametrised module fixture).
test_vllm_server.py covers vLLM's usual multi-process path: `vllm serve` and tensor parallelism.
"""

import gc
import os
import sys
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm")
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # engines in this process: one less process start each

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import jetmoe  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from vllm_helpers import (  # noqa: E402
    BF16_TIE,
    LOGPROB_ATOL,
    NEW_TOKENS,
    PROMPTS,
    close,
    engine,
    greedy,
    make_checkpoints,
    oracle,
)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("vllm-checkpoints"))


CASES = [("top2of8", "float32"), ("top3of6", "float32"), ("top2of8", "bfloat16")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{n}-{d}" for n, d in CASES])
def case(request, checkpoints):
    """One vLLM engine at a time: (name, dtype, path, config, llm, vLLM outputs of PROMPTS)."""
    name, dtype = request.param
    path, config = checkpoints[name]
    llm = engine(path, dtype, enforce_eager=True)
    params = vllm.SamplingParams(temperature=0, max_tokens=NEW_TOKENS[dtype], logprobs=0, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    yield name, dtype, path, config, llm, outputs
    close(llm)


def test_greedy_tokens_equal_transformers_and_jetmoe(case):
    name, dtype, path, config, _, outputs = case
    if dtype != "float32":
        pytest.skip("bf16: test_bf16_greedy_tokens_are_the_oracles_choices")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    oracle_tokens, oracle_logits = greedy(oracle(path, config, torch.float32), tokenizer, NEW_TOKENS[dtype])
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(path, config=config, dtype=torch.float32).eval()
    jetmoe_tokens, _ = greedy(ours, tokenizer, NEW_TOKENS[dtype])
    vllm_tokens = [list(o.outputs[0].token_ids) for o in outputs]
    assert all(len(t) == NEW_TOKENS[dtype] for t in vllm_tokens)
    assert vllm_tokens == oracle_tokens
    assert vllm_tokens == jetmoe_tokens
    worst = 0.0
    for row, output in enumerate(outputs):
        reference = torch.log_softmax(oracle_logits[row], dim=-1)
        for step, (token, logprobs) in enumerate(zip(vllm_tokens[row], output.outputs[0].logprobs)):
            worst = max(worst, abs(logprobs[token].logprob - reference[step, token].item()))
    print(f"{name} fp32: max |vLLM logprob - transformers logprob| = {worst:.2e}")
    assert worst < LOGPROB_ATOL


def _first_difference(a, b):
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def test_bf16_greedy_tokens_are_the_oracles_choices(case):
    """bf16 logits of these random models tie exactly (top-2 gap 0) at some steps, and a tie goes to whichever
    value rounding favours: transformers and jetmoe themselves part there. So each of vLLM's tokens is checked
    against the oracle run on vLLM's own sequence (teacher forcing): it must be the oracle's argmax or within
    BF16_TIE of it. Exact agreement with transformers' and jetmoe's generate() is measured too, and must hold at
    least until one of them meets such a tie."""
    name, dtype, path, config, _, outputs = case
    if dtype != "bfloat16":
        pytest.skip("fp32: test_greedy_tokens_equal_transformers_and_jetmoe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    reference = oracle(path, config, torch.bfloat16)
    oracle_tokens, _ = greedy(reference, tokenizer, NEW_TOKENS[dtype])
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(path, config=config, dtype=torch.bfloat16).eval()
    jetmoe_tokens, _ = greedy(ours, tokenizer, NEW_TOKENS[dtype])
    worst = 0.0
    for row, output in enumerate(outputs):
        tokens = list(output.outputs[0].token_ids)
        assert len(tokens) == NEW_TOKENS[dtype]
        prompt = tokenizer(PROMPTS[row]).input_ids
        with torch.no_grad():
            logits = reference(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()
        chosen = logits.gather(1, torch.tensor(tokens)[:, None])[:, 0]
        gaps = logits.max(dim=1).values - chosen
        worst = max(worst, gaps.max().item())
        agree = _first_difference(tokens, oracle_tokens[row]), _first_difference(tokens, jetmoe_tokens[row])
        print(f"{name} bf16 prompt {row}: equal to transformers / jetmoe for the first {agree} of {len(tokens)} tokens")
        # Up to where the generate() runs part from vLLM's sequence, the oracle saw the same tokens: a
        # difference there must be a tie in the oracle's logits too.
        for step in range(min(agree)):
            assert gaps[step] <= BF16_TIE
        if min(agree) < len(tokens):
            step = min(agree)
            top2 = logits[step].topk(2).values
            assert top2[0] - top2[1] <= BF16_TIE, f"prompt {row} step {step}: not a tie, {top2.tolist()}"
    print(f"{name} bf16: largest (oracle max logit - oracle logit of vLLM's token) = {worst:.3g}")
    assert worst <= BF16_TIE


def test_top_logprobs_of_a_prompt_match_transformers(case):
    """All top-5 logprobs of the first generated position (the prompt's prefill), not just the chosen token."""
    name, dtype, path, config, llm, _ = case
    if dtype != "float32":
        pytest.skip("fp32 tolerance")
    prompt = PROMPTS[1]
    output = llm.generate([prompt], vllm.SamplingParams(temperature=0, max_tokens=1, logprobs=5), use_tqdm=False)
    ids = transformers.AutoTokenizer.from_pretrained(path)(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        reference = torch.log_softmax(oracle(path, config, torch.float32)(ids).logits[0, -1], dim=-1)
    top = output[0].outputs[0].logprobs[0]
    assert set(top) >= set(reference.topk(5).indices.tolist())
    for token, logprob in top.items():
        assert abs(logprob.logprob - reference[token].item()) < LOGPROB_ATOL


def test_engine_uses_the_plugin_model(case):
    _, _, _, config, llm, _ = case

    def describe(model):
        attn = model.model.layers[0].self_attention.attn
        moe = type(model.model.layers[0].mlp.experts).__name__
        return type(model).__module__, attn.num_heads, attn.num_kv_heads, moe

    (module, heads, kv_heads, moe), = llm.apply_model(describe)
    assert module == "jetmoe.integrations.vllm"
    # Query heads are kv heads x top-k; the cache holds only the real K/V heads.
    assert (heads, kv_heads) == (config.num_key_value_heads * config.num_experts_per_tok, config.num_key_value_heads)
    assert moe == "MoERunner"


def _broken_checkpoint(source: Path, target: Path) -> Path:
    target.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (target / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    del tensors["model.layers.1.mlp.bias"]
    tensors["model.layers.0.self_attention.experts.input_linear.weight"] = tensors[
        "model.layers.0.self_attention.experts.input_linear.weight"
    ][:, :-1].contiguous()
    save_file(tensors, target / "model.safetensors")
    return target


def test_checkpoint_with_a_missing_and_a_misshaped_tensor_is_an_error_naming_both(checkpoints, tmp_path):
    path = _broken_checkpoint(checkpoints["top2of8"][0], tmp_path / "broken")
    with pytest.raises(Exception) as error:
        engine(path, "float32", enforce_eager=True)
    message = str(error.value)
    for cause in (error.value.__cause__, error.value.__context__):
        message += str(cause)
    assert "model.layers.1.mlp.bias: missing from the checkpoint" in message
    assert "model.layers.0.self_attention.experts.input_linear.weight: checkpoint shape (8, 127, 64)" in message
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()
