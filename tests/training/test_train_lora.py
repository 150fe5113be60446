"""LoRA on the experts: peft's target_parameters on the [E, out, in] MoA and MoE expert weights, with kv_proj.

A micro model with random weights and random (non-zero) adapter factors: which parameters train, how many,
where the gradients go, and that the merged state (checkpoint.merge_lora_state) computes what the adapted
model computes. The end-to-end run (checkpoint, peft and transformers loading) is in test_train_errors_finetune.
"""

from __future__ import annotations

import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.training.checkpoint import merge_lora_state
from jetmoe.training.config import LORA_EXPERTS, build_config
from train_helpers import MICRO_MODEL

pytest.importorskip("peft")

EXPERT_MODULES = {"moa_query": "self_attention.experts.input_linear", "moa_output": "self_attention.experts.output_linear",
                  "moe_input": "mlp.input_linear", "moe_output": "mlp.output_linear"}


def adapted(rank: int = 4, experts=tuple(LORA_EXPERTS), modules=("kv_proj",), seed: int = 0):
    """(base model copy, peft model, scaling) with the adapter's factors all random (B is zero at peft's init)."""
    from jetmoe.training.trainer import _add_lora

    torch.manual_seed(seed)
    base = JetMoeForCausalLM(JetMoeConfig(**MICRO_MODEL)).eval()
    reference = JetMoeForCausalLM(JetMoeConfig(**MICRO_MODEL)).eval()
    reference.load_state_dict(base.state_dict())
    config = build_config("tiny", None, {"lora": True, "init_from": "unused", "lora_rank": rank, "lora_alpha": 8.0,
                                         "lora_target_experts": list(experts), "lora_target_modules": list(modules)})
    model, scaling = _add_lora(base, config, None)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.normal_(0, 0.2)
    return reference, model, scaling


def expected_count(model: JetMoeForCausalLM, rank: int, experts, modules) -> int:
    """E * r * (in + out) per expert weight [E, out, in]; r * (in + out) per dense [out, in]."""
    total = 0
    for layer in model.model.layers:
        for name in experts:
            e, out, inp = layer.get_submodule(EXPERT_MODULES[name]).weight.shape
            total += e * rank * (inp + out)
        for name in modules:
            out, inp = layer.self_attention.get_submodule(name).weight.shape
            total += rank * (inp + out)
    return total


@pytest.mark.parametrize("experts, modules", [
    (tuple(LORA_EXPERTS), ("kv_proj",)),  # the default
    (("moe_input",), ()),
    (("moa_query", "moa_output"), ("kv_proj",)),
    ((), ("kv_proj",)),
])
def test_trainable_parameters_are_the_adapter_and_match_the_formula(experts, modules):
    reference, model, _ = adapted(rank=3, experts=experts, modules=modules)
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    assert sum(p.numel() for p in trainable.values()) == expected_count(reference, 3, experts, modules)
    wrapped = {name.split(".lora_")[0].split("layers.")[1].split(".", 1)[1] for name in trainable}
    assert wrapped == {EXPERT_MODULES[n] for n in experts} | {f"self_attention.{m}" for m in modules}


def test_gradients_reach_only_the_adapter():
    _, model, _ = adapted()
    model.train()
    ids = torch.randint(4, 290, (2, 24))
    model(input_ids=ids, labels=ids).loss.backward()
    for name, parameter in model.named_parameters():
        if ".lora_" in name:  # every factor of every target gets a gradient through the grouped products
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
        else:
            assert parameter.grad is None, name


def test_merged_state_computes_what_the_adapted_model_computes():
    reference, model, scaling = adapted()
    ids = torch.randint(4, 290, (2, 24))
    with torch.no_grad():
        base_logits = reference(input_ids=ids).logits
        adapted_logits = model(input_ids=ids).logits
        assert (adapted_logits - base_logits).abs().max() > 1e-2  # the adapter does change the outputs
        merged = JetMoeForCausalLM(JetMoeConfig(**MICRO_MODEL)).eval()
        merged.load_state_dict(merge_lora_state(model.state_dict(), scaling))
        difference = (merged(input_ids=ids).logits - adapted_logits).abs().max().item()
        assert difference < 1e-5
        # Our merge and peft's agree weight for weight (the same reading of peft's factor layout).
        ours = merged.state_dict()
        for name, tensor in model.merge_and_unload().state_dict().items():
            torch.testing.assert_close(ours[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
            if any(part in name for part in ("input_linear", "output_linear", "kv_proj")):
                assert not torch.equal(tensor, reference.state_dict()[name]), name  # each target was adapted


def test_expert_dropout_and_empty_targets_are_refused():
    with pytest.raises(ValueError, match="peft applies no dropout to expert weights"):
        build_config("tiny", None, {"lora": True, "init_from": "x", "lora_dropout": 0.1})
    build_config("tiny", None, {"lora": True, "init_from": "x", "lora_dropout": 0.1, "lora_target_experts": []})
    with pytest.raises(ValueError, match="lora: no targets"):
        build_config("tiny", None, {"lora": True, "init_from": "x", "lora_target_experts": [], "lora_target_modules": []})
