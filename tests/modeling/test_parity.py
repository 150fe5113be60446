"""Forward and backward parity with transformers' JetMoe (the oracle): same weights, fp32, eager and sdpa.

Every parameter is random and non-zero (biases and norm weights too), 2 layers, 4 and 6 experts. Tolerances
are the issue's: 2e-5 absolute for logits, hidden states, loss, aux_loss and router logits; 1e-4 for gradients.
With padding only the non-pad positions are compared (the pad positions' values are unspecified).
"""

from __future__ import annotations

import pytest
import torch
from oracle_pair import ATOL, GRAD_ATOL, TINY, assert_close, build_pair, max_diff, padding_mask, random_ids

BATCH, LENGTH = 3, 7
LENGTHS = [7, 4, 2]  # real tokens per row when padded


def _inputs(padding: str):
    ids = random_ids(BATCH, LENGTH)
    if padding == "none":
        return ids, None
    mask = padding_mask(LENGTHS, LENGTH, padding)
    return ids.masked_fill(mask == 0, 0), mask


def _labels(ids, mask):
    return ids if mask is None else ids.masked_fill(mask == 0, -100)


def _real(mask, batch=BATCH, length=LENGTH):
    """Boolean [B, T] of the positions to compare."""
    return torch.ones(batch, length, dtype=torch.bool) if mask is None else mask.bool()


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_causal_lm_outputs_match_oracle(geometry, attn_implementation, padding):
    ours, oracle = build_pair(geometry, attn_implementation)
    ids, mask = _inputs(padding)
    kwargs = dict(
        input_ids=ids,
        attention_mask=mask,
        labels=_labels(ids, mask),
        output_router_logits=True,
        output_hidden_states=True,
    )
    with torch.no_grad():
        got, want = ours(**kwargs), oracle(**kwargs)
    real = _real(mask)
    tag = f"[{attn_implementation}, E={geometry['num_local_experts']}, {padding} padding]"

    assert_close(got.logits[real], want.logits[real], what=f"logits {tag}")
    assert torch.isfinite(got.logits).all()  # pad positions too: a NaN there would poison masked losses
    assert_close(got.loss, want.loss, what=f"loss {tag}")
    assert_close(got.aux_loss, want.aux_loss, what=f"aux_loss {tag}")
    assert got.aux_loss.shape == () and got.aux_loss.dtype == torch.float32

    num_layers = geometry["num_hidden_layers"]
    assert len(got.router_logits) == len(want.router_logits) == 2 * num_layers  # MoA and MoE per layer
    for i, (g, w) in enumerate(zip(got.router_logits, want.router_logits)):
        assert g.dtype == torch.float32 and g.shape == (BATCH * LENGTH, geometry["num_local_experts"])
        assert_close(g[real.reshape(-1)], w[real.reshape(-1)], what=f"router_logits[{i}] {tag}")

    assert len(got.hidden_states) == len(want.hidden_states) == num_layers + 1
    for i, (g, w) in enumerate(zip(got.hidden_states, want.hidden_states)):
        assert_close(g[real], w[real], what=f"hidden_states[{i}] {tag}")


CONFIG_VARIANTS = {
    # Only the final norm reads rms_norm_eps (the per-layer norms keep 1e-6): a large eps makes that visible.
    "rms_norm_eps": dict(rms_norm_eps=0.5),
    "gelu": dict(activation_function="gelu_new"),
    "rope_theta": dict(rope_parameters={"rope_type": "default", "rope_theta": 37.0}),
    "rope_linear": dict(rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 1e4}),
    "rope_dynamic_long": dict(
        max_position_embeddings=6, rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}
    ),
    "dropout_in_eval": dict(attention_dropout=0.3),
    "untied": dict(tie_word_embeddings=False),
    "k_equals_e": dict(num_local_experts=3, num_experts_per_tok=3),
    "single_expert": dict(num_local_experts=1, num_experts_per_tok=1),
}


@pytest.mark.parametrize("variant", list(CONFIG_VARIANTS))
def test_config_variants_match_oracle(variant):
    ours, oracle = build_pair(**CONFIG_VARIANTS[variant])
    ids = random_ids(2, 9)
    with torch.no_grad():
        got = ours(ids, labels=ids, output_router_logits=True)
        want = oracle(ids, labels=ids, output_router_logits=True)
    assert_close(got.logits, want.logits, what=f"logits [{variant}]")
    assert_close(got.loss, want.loss, what=f"loss [{variant}]")


def test_loss_includes_aux_loss_only_when_router_logits_requested():
    ours, oracle = build_pair()
    ids = random_ids(2, 7)
    with torch.no_grad():
        plain = ours(ids, labels=ids)
        with_aux = ours(ids, labels=ids, output_router_logits=True)
        want = oracle(ids, labels=ids)
    assert plain.aux_loss is None and plain.router_logits is None
    assert_close(plain.loss, want.loss, what="loss without router logits")
    expected = plain.loss + ours.config.aux_loss_coef * with_aux.aux_loss
    assert_close(with_aux.loss, expected, atol=1e-6, what="CE + coef * aux")


def test_aux_loss_without_labels_and_in_eval_like_the_reference():
    ours, oracle = build_pair(output_router_logits=True)  # opted in through the config
    ids = random_ids(2, 5)
    with torch.no_grad():
        got, want = ours(ids), oracle(ids)
    assert got.loss is None and want.loss is None
    assert_close(got.aux_loss, want.aux_loss, what="aux_loss from config flag, no labels")


@pytest.mark.parametrize("padding", ["none", "left"])
def test_base_model_matches_oracle(attn_implementation, padding):
    ours, oracle = build_pair(attn_implementation=attn_implementation, head="base")
    ids, mask = _inputs(padding)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_router_logits=True)
        want = oracle(ids, attention_mask=mask, output_router_logits=True)
    real = _real(mask)
    assert_close(got.last_hidden_state[real], want.last_hidden_state[real], what="last_hidden_state")
    assert len(got.router_logits) == len(want.router_logits)
    assert got.cache is not None and got.cache.get_seq_length() == LENGTH


def test_inputs_embeds_match_input_ids(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(2, 6)
    embeds = ours.get_input_embeddings()(ids)
    with torch.no_grad():
        from_ids = ours(ids).logits
        got = ours(inputs_embeds=embeds).logits
        want = oracle(inputs_embeds=embeds).logits
    assert_close(got, want, what="logits from inputs_embeds")
    assert torch.equal(got, from_ids)


def test_explicit_position_ids_match_oracle():
    ours, oracle = build_pair()
    ids = random_ids(2, 6)
    positions = torch.tensor([[3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 4, 5]])
    with torch.no_grad():
        got = ours(ids, position_ids=positions).logits
        want = oracle(ids, position_ids=positions).logits
    assert_close(got, want, what="logits with explicit position_ids")


@pytest.mark.parametrize("padding", ["none", "left"])
def test_output_attentions_eager_equal_oracle(padding):
    ours, oracle = build_pair(attn_implementation="eager")
    ids, mask = _inputs(padding)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, output_attentions=True)
        want = oracle(ids, attention_mask=mask, output_attentions=True)
    heads = TINY["num_experts_per_tok"] * TINY["num_key_value_heads"]
    assert len(got.attentions) == len(want.attentions) == TINY["num_hidden_layers"]
    real = _real(mask)
    for i, (g, w) in enumerate(zip(got.attentions, want.attentions)):
        assert g.shape == w.shape == (BATCH, heads, LENGTH, LENGTH)
        # Rows of real query tokens (a fully masked pad row's distribution is unspecified).
        assert_close(g.permute(0, 2, 1, 3)[real], w.permute(0, 2, 1, 3)[real], what=f"attentions[{i}] {padding}")


def test_returned_attentions_are_on_the_path_to_the_output(attn_implementation):
    """output_attentions=True returns the probabilities the output is computed from: retain_grad() on them
    gets the oracle's gradient (not None, as a copy made after the output would). The oracle's eager attention
    (its sdpa returns no probabilities) against ours under either backend."""
    ours, oracle = build_pair(attn_implementation=attn_implementation)[0], build_pair(attn_implementation="eager")[1]
    ids, mask = _inputs("left")
    real = _real(mask)
    grads = []
    for model in (ours, oracle):
        out = model(ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
        for tensor in (*out.attentions, out.hidden_states[0]):
            tensor.retain_grad()
        out.logits[real].sum().backward()
        assert all(a.grad is not None for a in out.attentions), type(model).__module__
        grads.append([a.grad.permute(0, 2, 1, 3)[real] for a in out.attentions])
    for i, (g, w) in enumerate(zip(*grads)):
        scale = w.abs().max()  # gradients in the hundreds here: compare relative to the largest
        assert scale > 0
        assert_close(g / scale, w / scale, atol=1e-5, what=f"gradient of attentions[{i}] / its largest")


def test_return_dict_false_gives_the_oracle_tuple(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(2, 5)
    kwargs = dict(labels=ids, output_router_logits=True, return_dict=False, use_cache=False)
    with torch.no_grad():
        got, want = ours(ids, **kwargs), oracle(ids, **kwargs)
    assert isinstance(got, tuple) and len(got) == len(want) == 4  # loss, aux_loss, logits, router_logits
    assert_close(got[0], want[0], what="tuple loss")
    assert_close(got[1], want[1], what="tuple aux_loss")
    assert_close(got[2], want[2], what="tuple logits")
    assert all(max_diff(g, w) <= ATOL for g, w in zip(got[3], want[3]))

    base_ours, base_oracle = build_pair(attn_implementation=attn_implementation, head="base")
    with torch.no_grad():
        got = base_ours(ids, return_dict=False, use_cache=False)
        want = base_oracle(ids, return_dict=False, use_cache=False)
    assert isinstance(got, tuple) and len(got) == len(want) == 1
    assert_close(got[0], want[0], what="base model tuple")


@pytest.mark.parametrize("keep", [1, 3, torch.tensor([0, 4, 5]), torch.tensor([6])])
def test_logits_to_keep(keep):
    ours, oracle = build_pair()
    ids = random_ids(2, 7)
    with torch.no_grad():
        full = ours(ids).logits
        got = ours(ids, logits_to_keep=keep).logits
        want = oracle(ids, logits_to_keep=keep).logits
    assert_close(got, want, what=f"logits_to_keep={keep}")
    positions = list(range(7 - keep, 7)) if isinstance(keep, int) else keep.tolist()
    assert_close(got, full[:, positions], atol=1e-5, what="kept logits vs all logits")  # matmul shape, not math


def test_hidden_states_are_embeddings_layers_and_final_norm():
    ours, _ = build_pair()
    ids = random_ids(1, 5)
    with torch.no_grad():
        out = ours(ids, output_hidden_states=True)
    assert len(out.hidden_states) == TINY["num_hidden_layers"] + 1
    assert torch.equal(out.hidden_states[0], ours.model.embed_tokens(ids))
    # The last entry is the final normed state, the one the head reads (the same product: no autograd).
    with torch.no_grad():
        assert torch.equal(ours.lm_head(out.hidden_states[-1]), out.logits)


@pytest.mark.parametrize("padding", ["none", "left"])
def test_gradients_of_every_parameter_match_oracle(geometry, attn_implementation, padding):
    ours, oracle = build_pair(geometry, attn_implementation)
    ours.train()
    oracle.train()
    ids, mask = _inputs(padding)
    kwargs = dict(input_ids=ids, attention_mask=mask, labels=_labels(ids, mask), output_router_logits=True)
    ours(**kwargs).loss.backward()
    oracle(**kwargs).loss.backward()

    theirs = dict(oracle.named_parameters())
    names = [name for name, _ in ours.named_parameters()]
    assert sorted(names) == sorted(theirs)  # the same parameters (tied lm_head listed once)
    worst, worst_name = 0.0, None
    for name, param in ours.named_parameters():
        assert param.grad is not None, f"{name} got no gradient"
        assert theirs[name].grad is not None
        diff = max_diff(param.grad, theirs[name].grad)
        if diff >= worst:
            worst, worst_name = diff, name
    print(f"PARITY gradients [{attn_implementation}, {padding}]: max abs diff {worst:.3e} ({worst_name})")
    assert worst <= GRAD_ATOL, f"gradient of {worst_name} differs by {worst:.3e}"
    # Non-trivial: every parameter, biases and norm weights included, really receives gradient.
    assert all(param.grad.abs().max() > 0 for param in ours.parameters())


# ---------------------------------------------------------------------------------------------------------
# Sequence classification: logits, pooling (pad_token_id rules as in the reference), loss.

PAD = 0


def _seq_cls_pair(attn_implementation="sdpa", **overrides):
    fields = dict(num_labels=3, pad_token_id=PAD)
    fields.update(overrides)
    return build_pair(attn_implementation=attn_implementation, head="seq_cls", **fields)


@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_sequence_classification_matches_oracle(attn_implementation, padding):
    ours, oracle = _seq_cls_pair(attn_implementation)
    ids, mask = _inputs(padding)
    labels = torch.tensor([0, 2, 1])
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, labels=labels)
        want = oracle(ids, attention_mask=mask, labels=labels)
    assert got.logits.shape == (BATCH, 3)
    assert_close(got.logits, want.logits, what=f"seq-cls logits [{padding}]")
    assert_close(got.loss, want.loss, what=f"seq-cls loss [{padding}]")


def test_sequence_classification_pools_the_rightmost_non_pad_token():
    ours, _ = _seq_cls_pair()
    ids = random_ids(3, 6)
    ids[0, 4:] = PAD  # right padded: pool position 3
    ids[1, :2] = PAD  # left padded: pool position 5
    ids[2, :] = PAD  # all padding: pool position 0, as in the reference
    with torch.no_grad():
        pooled = ours(ids).logits
        every_position = ours.score(ours.model(ids).last_hidden_state)
    assert torch.equal(pooled, every_position[torch.arange(3), torch.tensor([3, 5, 0])])


@pytest.mark.parametrize("batch", [1, 2])
def test_sequence_classification_without_pad_token(batch):
    ours, oracle = _seq_cls_pair(pad_token_id=None)
    ids = random_ids(batch, 5)
    if batch > 1:
        with pytest.raises(ValueError, match="pad"):
            ours(ids)
        with pytest.raises(ValueError):
            oracle(ids)
        return
    with torch.no_grad():
        got, want = ours(ids).logits, oracle(ids).logits
        last = ours.score(ours.model(ids).last_hidden_state)[:, -1]
    assert_close(got, want, what="seq-cls logits, pad_token_id None, batch 1")
    assert torch.equal(got, last)


def test_sequence_classification_with_inputs_embeds_pools_last_and_warns(caplog):
    ours, oracle = _seq_cls_pair()
    ids = random_ids(2, 5)
    embeds = ours.get_input_embeddings()(ids)
    with torch.no_grad(), caplog.at_level("WARNING"):
        got = ours(inputs_embeds=embeds).logits
        want = oracle(inputs_embeds=embeds).logits
        last = ours.score(ours.model(inputs_embeds=embeds).last_hidden_state)[:, -1]
    assert_close(got, want, what="seq-cls logits from inputs_embeds")
    assert torch.equal(got, last)
    # (warning_once: this is the only test that triggers it.)
    assert any(r.name.startswith("jetmoe") and "inputs_embeds" in r.getMessage() for r in caplog.records)


def test_sequence_classification_gradients_match_oracle():
    ours, oracle = _seq_cls_pair()
    ids = random_ids(3, 6)
    ids[1, :2] = PAD
    labels = torch.tensor([0, 1, 2])
    ours.train()
    oracle.train()
    ours(ids, labels=labels).loss.backward()
    oracle(ids, labels=labels).loss.backward()
    theirs = dict(oracle.named_parameters())
    worst = max(max_diff(p.grad, theirs[name].grad) for name, p in ours.named_parameters())
    print(f"PARITY seq-cls gradients: max abs diff {worst:.3e}")
    assert worst <= GRAD_ATOL


@pytest.mark.parametrize("problem", ["regression", "multi_label_classification"])
def test_sequence_classification_losses_match_oracle(problem):
    ours, oracle = _seq_cls_pair(problem_type=problem, num_labels=2)
    ids = random_ids(2, 5)
    labels = torch.tensor([[0.5, -1.0], [2.0, 0.0]]) if problem == "regression" else torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    with torch.no_grad():
        got, want = ours(ids, labels=labels), oracle(ids, labels=labels)
    assert_close(got.loss, want.loss, what=f"seq-cls {problem} loss")


# ---------------------------------------------------------------------------------------------------------
# bf16


def test_bf16_runs_and_stays_close_to_fp32(attn_implementation):
    ours, oracle = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(2, 12)
    with torch.no_grad():
        reference = ours(ids).logits
        oracle_bf16 = oracle.to(torch.bfloat16)(ids).logits.float()
    ours.to(torch.bfloat16).train()
    out = ours(ids, labels=ids, output_router_logits=True)
    assert out.logits.dtype == torch.bfloat16
    assert all(r.dtype == torch.float32 for r in out.router_logits)  # router logits stay fp32
    assert torch.isfinite(out.loss) and torch.isfinite(out.aux_loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all()
               for p in ours.parameters())

    logits = out.logits.detach().float()
    scale = reference.abs().max().item()
    error = max_diff(logits, reference)
    oracle_error = max_diff(oracle_bf16, reference)
    print(f"PARITY bf16 vs fp32 [{attn_implementation}]: ours {error:.3e}, oracle {oracle_error:.3e}, "
          f"ours vs oracle bf16 {max_diff(logits, oracle_bf16):.3e} (logit scale {scale:.1f})")
    assert error <= 0.03 * scale
    assert (logits - reference).abs().mean() <= 0.005 * scale
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.9
    assert error <= 1.5 * oracle_error + 1e-3  # no worse than the reference's own bf16 rounding


def test_attention_dropout_is_active_in_training_only(attn_implementation):
    """Dropout masks cannot match the oracle's draw for draw (the heads are laid out differently), so this
    checks the behaviour: off in eval, on in training, a fresh mask per call."""
    ours, _ = build_pair(attn_implementation=attn_implementation, attention_dropout=0.5)
    plain, _ = build_pair(attn_implementation=attn_implementation)
    ids = random_ids(2, 6)
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, plain(ids).logits)
        ours.train()
        torch.manual_seed(0)
        first = ours(ids).logits
        second = ours(ids).logits
        torch.manual_seed(0)
        again = ours(ids).logits
    assert not torch.allclose(first, plain(ids).logits) and not torch.allclose(first, second)
    assert torch.equal(first, again)


def test_loss_with_num_items_in_batch_and_a_custom_loss_function():
    """The trainer-style sum / num_items_in_batch loss equals the oracle's; a loss set on the model is used."""
    ours, oracle = build_pair()
    ids = random_ids(2, 6)
    labels = ids.clone()
    labels[0, :2] = -100
    items = torch.tensor(7)
    got = ours(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    want = oracle(input_ids=ids, labels=labels, num_items_in_batch=items).loss
    assert_close(got, want, what="loss with num_items_in_batch")

    ours.loss_function = lambda logits, labels, vocab_size, num_items_in_batch=None: logits.float().mean() * 0 + 42.0
    assert ours(input_ids=ids, labels=labels).loss.item() == 42.0
