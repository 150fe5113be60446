"""The backend seam (modeling/backends): one place chooses the backend, the model reaches its kernels only
through it, and every backend gives the reference's values."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from oracle_pair import GRAD_ATOL, TINY, WIDE, assert_close, build_pair, padding_mask, random_ids

from jetmoe.modeling import backends
from jetmoe.modeling.backends import Backend, BackendError, backend_for, register_backend, selected_backend, use_backend


def test_each_device_type_has_its_default_backend():
    with use_backend(None):
        assert backend_for(torch.zeros(1)).name == "cpu"
        assert selected_backend("cpu") == "cpu"
        assert selected_backend("meta") == "torch"  # a device without a fast backend: the reference
    with use_backend("torch"):
        assert backend_for(torch.zeros(1)).name == "torch"
    assert backends.DEVICE_DEFAULTS["cuda"] == "cuda"


def test_a_bad_backend_choice_is_an_error_naming_it():
    with pytest.raises(BackendError, match=r"unknown jetmoe backend 'nope'; registered: .*cpu.*torch"):
        with use_backend("nope"):
            pass
    with use_backend("cuda"), pytest.raises(BackendError, match="'cuda' does not run on cpu tensors"):
        backend_for(torch.zeros(1))
    with pytest.raises(BackendError, match="must be a jetmoe Backend"):
        register_backend(object())


def test_the_environment_variable_chooses_the_backend():
    script = "import torch, jetmoe; from jetmoe.modeling.backends import selected_backend; print(selected_backend('cpu'))"
    for name in ("torch", "cpu"):
        env = {**os.environ, "JETMOE_BACKEND": name}
        out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == name
    env = {**os.environ, "JETMOE_BACKEND": "nope"}
    failed = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "unknown jetmoe backend 'nope'" in failed.stderr


class _Recording(Backend):
    """The reference backend, counting the operations the model asks of it."""

    name = "recording"

    def __init__(self):
        self.calls: dict[str, int] = {}
        for op in ("rms_norm", "rotary", "silu_glu", "expert_linear", "expert_glu", "expert_combine", "combine",
                   "attention", "decoder_layer", "decoder_stack"):  # fmt: skip
            setattr(self, op, self._counted(op, getattr(super(), op)))

    def _counted(self, op, method):
        def call(*args, **kwargs):
            self.calls[op] = self.calls.get(op, 0) + 1
            return method(*args, **kwargs)

        return call


@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["top2of4", "top3of6"])
def test_the_model_reaches_its_operations_only_through_the_backend(geometry):
    """A registered backend serves every operation of a forward (prompt and cached decoding), and the model's
    values are then that backend's: the same as the reference backend's, bit for bit."""
    model, _ = build_pair(geometry)
    ids = random_ids(2, 6)
    recording = register_backend(_Recording())
    with torch.no_grad(), use_backend("recording"):
        out = model(ids, use_cache=True)
        step = model(ids[:, :1], cache=out.past_key_values)
    layers = geometry["num_hidden_layers"]
    assert recording.calls["decoder_stack"] == 2 and recording.calls["decoder_layer"] == 2 * layers
    assert recording.calls["rms_norm"] == 2 * (2 * layers + 1)  # two norms a layer and the final one, twice
    assert recording.calls["rotary"] == 2 * 2 * layers  # queries and keys
    assert recording.calls["attention"] == 2 * layers
    assert recording.calls["expert_glu"] == 2 * layers  # the MoE's input experts
    assert recording.calls["expert_combine"] == recording.calls["combine"] == 2 * 2 * layers  # MoA and MoE outputs
    assert recording.calls["expert_linear"] == 2 * 4 * layers  # MoA map and reduce, MoE in and out
    with torch.no_grad(), use_backend("torch"):
        reference = model(ids, use_cache=True)
        reference_step = model(ids[:, :1], cache=reference.past_key_values)
    assert torch.equal(out.logits, reference.logits) and torch.equal(step.logits, reference_step.logits)


@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["top2of4", "top3of6"])
def test_the_reference_backend_matches_the_oracle_and_the_cpu_backend(geometry):
    """The PyTorch reference backend gives transformers' logits, loss and gradients (fp32), with padding."""
    model, oracle = build_pair(geometry)
    ids, mask = random_ids(2, 7), padding_mask([7, 4], 7, "right")  # (left padding leaves rows attending nowhere)
    labels = ids.masked_fill(mask == 0, -100)
    expected = oracle(ids, attention_mask=mask, labels=labels)
    expected.loss.backward()
    aux = {}
    for name in ("torch", "cpu"):
        model.zero_grad()
        with use_backend(name):
            out = model(ids, attention_mask=mask, labels=labels)
            out.loss.backward()
            aux[name] = model(ids, attention_mask=mask, output_router_logits=True).aux_loss
        assert_close(out.logits, expected.logits, what=f"{name} logits")
        assert_close(out.loss, expected.loss, what=f"{name} loss")
        ours = dict(model.named_parameters())
        for key, param in oracle.named_parameters():
            assert_close(ours[key].grad, param.grad, atol=GRAD_ATOL, what=f"{name} grad {key}")
    assert_close(aux["torch"], aux["cpu"], what="balancing loss")


def test_greedy_generation_is_the_same_on_every_backend():
    model, _ = build_pair(TINY)
    ids = random_ids(1, 5)
    sequences = {}
    for name in ("torch", "cpu"):
        with use_backend(name):
            sequences[name] = model.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(sequences["torch"], sequences["cpu"])


def test_only_the_cpu_backend_offers_whole_decoder_steps():
    assert Backend().decoder_stack(None, None, None, None, None, True) is None
    model, _ = build_pair(TINY)
    layer, x = model.model.layers[0], torch.zeros(1, 1, TINY["hidden_size"])
    assert Backend().decoder_layer(layer, x, None, None, None, False) is None
