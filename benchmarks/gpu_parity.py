"""CUDA check: ours against transformers' JetMoe on the GPU, same weights, fp32 and bf16, forward and backward.

Runs the paths that exist only on CUDA (grouped_mm in bf16, the Triton kernels for fp32) at a small geometry and
prints the largest differences. Not a test (CI has no GPU); run it on a GPU machine:
    python benchmarks/gpu_parity.py
"""

from __future__ import annotations

import torch
import transformers

import jetmoe

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
GEOMETRY = dict(
    vocab_size=512, hidden_size=256, num_hidden_layers=2, num_key_value_heads=4, kv_channels=32,
    intermediate_size=384, num_local_experts=8, num_experts_per_tok=2,
)


def main() -> None:
    torch.manual_seed(0)
    torch.backends.cuda.matmul.allow_tf32 = False
    reference = transformers.JetMoeForCausalLM(transformers.JetMoeConfig(**GEOMETRY, attn_implementation="sdpa"))
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.normal_(1.0 if "norm" in name else 0.0, 0.3 if p.dim() == 1 else 0.05)
    ours = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**GEOMETRY, attn_implementation="sdpa"))
    ours.load_state_dict(reference.state_dict())
    ids = torch.randint(0, GEOMETRY["vocab_size"], (4, 64), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    for dtype in (torch.float32, torch.bfloat16):
        ref, mine = reference.to(DEVICE, dtype).train(), ours.to(DEVICE, dtype).train()
        for model in (ref, mine):
            model.zero_grad()
        a = ref(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        b = mine(ids, attention_mask=mask, labels=ids, output_router_logits=True)
        a.loss.backward()
        b.loss.backward()
        keep = mask.bool()
        grads = dict(ref.named_parameters())
        grad_err = max((p.grad.float() - grads[n].grad.float()).abs().max().item() for n, p in mine.named_parameters())
        print(
            f"{dtype}: logits max|diff| {(a.logits - b.logits)[keep].abs().max().item():.2e}, "
            f"loss {abs(a.loss.item() - b.loss.item()):.2e}, grads {grad_err:.2e}"
        )
        generated_ref = ref.eval().generate(ids[:2, :8], max_new_tokens=8, do_sample=False)
        generated_ours = mine.eval().generate(ids[:2, :8], max_new_tokens=8, do_sample=False)
        print(f"{dtype}: greedy generate identical: {torch.equal(generated_ref, generated_ours)}")


if __name__ == "__main__":
    main()
