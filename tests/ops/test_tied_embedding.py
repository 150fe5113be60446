"""ops/tied_embedding: the tied embedding's gradient added into the head's, against autograd's own sum of the two."""

from __future__ import annotations

import pytest
import torch

import jetmoe
from oracle_pair import TINY, random_ids, randomize_

PAD = 3


def _model(dtype=torch.float32, **overrides):
    model = jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**dict(TINY, pad_token_id=PAD, **overrides)))
    randomize_(model)
    return model.to(dtype).train()


def _ids():
    ids = random_ids(2, 12)
    ids[0, :4] = PAD  # the padding row gets no gradient from the embedding, but does from the head
    return ids


def _plain(model, monkeypatch):
    """The same model through autograd's own sum (nn.Embedding and nn.Linear)."""
    monkeypatch.setattr(type(model), "_tie_gradients", lambda self, input_ids: None)


def _weight_grad(model, loss_of):
    model.zero_grad(set_to_none=True)
    loss_of(model).backward()
    return model.lm_head.weight.grad.clone()


def _lm_loss(model):
    ids = _ids()
    return model(input_ids=ids, labels=ids, output_router_logits=True).loss


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_equals_autograds_sum_of_head_and_embedding(dtype, monkeypatch):
    model = _model(dtype)
    ids = _ids()
    logits = model(input_ids=ids).logits
    assert type(logits.grad_fn).__name__ == "_HeadBackward"
    shared = _weight_grad(model, _lm_loss)
    assert shared.layout == torch.strided
    _plain(model, monkeypatch)
    assert type(model(input_ids=ids).logits.grad_fn).__name__ != "_HeadBackward"
    plain = _weight_grad(model, _lm_loss)
    # the same sums in another order: fp32 to a few roundings, bf16 to one rounding of the largest entries
    tolerance = dict(rtol=1e-5, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-2, atol=2e-3)
    torch.testing.assert_close(shared, plain, **tolerance)
    assert shared[PAD].abs().max() > 0  # the head's part of the padding row is there


def test_another_use_of_the_weight_is_summed_too(monkeypatch):
    """A penalty on the weight adds a third gradient term between the head's and the embedding's."""

    def penalised(m):
        return _lm_loss(m) + 1e-2 * m.lm_head.weight.square().sum()

    model = _model()
    shared = _weight_grad(model, penalised)
    assert shared.layout == torch.strided
    _plain(model, monkeypatch)
    torch.testing.assert_close(shared, _weight_grad(model, penalised), rtol=1e-5, atol=1e-7)


def test_gradients_accumulate_over_two_backward_passes(monkeypatch):
    model = _model()
    model.zero_grad(set_to_none=True)
    _lm_loss(model).backward()
    _lm_loss(model).backward()
    shared = model.lm_head.weight.grad.clone()
    _plain(model, monkeypatch)
    model.zero_grad(set_to_none=True)
    _lm_loss(model).backward()
    _lm_loss(model).backward()
    torch.testing.assert_close(shared, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_a_backward_that_misses_the_head_gets_the_embeddings_own_gradient(monkeypatch):
    """The head's backward runs in one backward pass that never reaches the embedding; a later pass reaches
    the embedding without the head: its gradient must be dense (an optimizer cannot take a sparse one)."""
    model = _model()
    ids = _ids()

    def through_hidden_states(m):
        out = m(input_ids=ids, output_hidden_states=True)
        torch.autograd.grad(out.logits.square().sum(), out.hidden_states[-1], retain_graph=True)  # head only
        return out.hidden_states[1].square().sum()  # embedding and first layer only

    shared = _weight_grad(model, through_hidden_states)
    assert shared.layout == torch.strided
    _plain(model, monkeypatch)
    plain = _weight_grad(model, through_hidden_states)
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-7)


def test_taken_only_where_both_ends_are_plain_and_share_the_weight():
    ids = _ids()
    model = _model()
    assert model._tie_gradients(ids) is not None
    assert model._tie_gradients(None) is None  # inputs_embeds: no embedding lookup
    with torch.no_grad():
        assert model._tie_gradients(ids) is None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert model._tie_gradients(ids) is None  # the head would multiply by a cast copy of the weight
    handle = model.lm_head.register_forward_hook(lambda module, args, out: None)
    assert model._tie_gradients(ids) is None  # going around the module's forward would skip the hook
    handle.remove()
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda module, args: None)
    assert model._tie_gradients(ids) is None
    handle.remove()
    model.lm_head.weight.requires_grad_(False)
    assert model._tie_gradients(ids) is None
    assert _model(tie_word_embeddings=False)._tie_gradients(ids) is None


def test_second_derivatives_take_autograds_own_sum(monkeypatch):
    """Under create_graph the embedding's backward leaves the head's gradient alone (no in-place add into a
    tensor of the double-backward graph): a gradient penalty gives autograd's values."""

    def penalty(m):
        (grad,) = torch.autograd.grad(_lm_loss(m), m.lm_head.weight, create_graph=True)
        return grad.square().sum()

    model = _model()
    model.config._attn_implementation = "eager"  # SDPA's fp32 flash kernel has no second derivative
    shared = _weight_grad(model, penalty)
    _plain(model, monkeypatch)
    torch.testing.assert_close(shared, _weight_grad(model, penalty), rtol=1e-5, atol=1e-7)
