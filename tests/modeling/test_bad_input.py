"""Bad input gets a clear error naming the problem (the reference crashes or silently computes garbage)."""

from __future__ import annotations

import logging

import pytest
import torch
from oracle_pair import assert_close, build_pair, random_ids
from safetensors.torch import load_file, save_file

import jetmoe

VOCAB = 128


@pytest.fixture(scope="module")
def model():
    return build_pair()[0]


@pytest.mark.parametrize("bad_id", [VOCAB, VOCAB + 1000, -1])
@pytest.mark.parametrize("head", ["causal_lm", "base", "seq_cls"])
def test_out_of_vocab_ids_name_the_id_and_vocab_size(head, bad_id):
    model = build_pair(head=head, pad_token_id=0, num_labels=2)[0]
    ids = random_ids(2, 5)
    ids[1, 3] = bad_id
    with pytest.raises(ValueError) as error:
        model(ids)
    message = str(error.value)
    assert str(bad_id) in message and str(VOCAB) in message, message


def test_out_of_vocab_ids_in_generate(model):
    ids = random_ids(1, 4)
    ids[0, 0] = VOCAB
    with pytest.raises(ValueError, match=f"{VOCAB}.*{VOCAB}"):
        model.generate(ids, max_new_tokens=2)


def test_both_or_neither_of_input_ids_and_inputs_embeds(model):
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="input_ids.*inputs_embeds"):
        model(ids, inputs_embeds=model.get_input_embeddings()(ids))
    with pytest.raises(ValueError, match="input_ids.*inputs_embeds"):
        model()
    with pytest.raises(ValueError, match="input_ids.*inputs_embeds"):
        model(attention_mask=torch.ones(2, 5, dtype=torch.long))


@pytest.mark.parametrize(
    "shape",
    [(2, 4), (2, 6), (3, 5), (1, 5), (5,), (2, 5, 5), (2, 1, 4, 5), (3, 1, 5, 5), (2, 1, 5, 3)],
    ids=str,
)
def test_attention_mask_of_wrong_shape(model, shape):
    with pytest.raises(ValueError, match="attention_mask") as error:
        model(random_ids(2, 5), attention_mask=torch.ones(shape, dtype=torch.long))
    assert str(list(shape)) in str(error.value) or str(shape) in str(error.value)


def test_attention_mask_must_cover_the_cache(model):
    ids = random_ids(2, 6)
    with torch.no_grad():
        prefix = model(ids[:, :4], attention_mask=torch.ones(2, 4, dtype=torch.long))
        with pytest.raises(ValueError, match=r"\[2, 6\]"):
            model(ids[:, 4:], attention_mask=torch.ones(2, 2, dtype=torch.long), cache=prefix.cache)


def test_malformed_input_ids_and_embeds(model):
    ids = random_ids(2, 5)
    with pytest.raises(ValueError, match="input_ids"):
        model(ids[0])  # 1-D
    with pytest.raises(ValueError, match="dtype"):
        model(ids.float())
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="Cache"):
        model(ids, past_key_values=((torch.zeros(1), torch.zeros(1)),))


def _corrupt_checkpoint(directory, edit) -> None:
    path = directory / "model.safetensors"
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("cls", [jetmoe.JetMoeForCausalLM, jetmoe.JetMoeModel])
def test_checkpoint_with_missing_tensor_names_the_key(tmp_path, cls):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    _corrupt_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.mlp.bias"))
    with pytest.raises(ValueError) as error:
        cls.from_pretrained(tmp_path)
    message = str(error.value)
    assert "layers.1.mlp.bias" in message and "missing" in message and "(64,)" in message, message


def test_checkpoint_with_mis_shaped_tensor_names_the_key_and_both_shapes(tmp_path):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)

    def reshape(tensors):
        tensors["model.layers.0.self_attention.kv_proj.weight"] = torch.zeros(60, 64)
        tensors["model.layers.1.mlp.output_linear.weight"] = torch.zeros(3, 64, 96)

    _corrupt_checkpoint(tmp_path, reshape)
    with pytest.raises(ValueError) as error:
        jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    message = str(error.value)
    assert "model.layers.0.self_attention.kv_proj.weight" in message, message
    assert "(60, 64)" in message and "(64, 64)" in message, message
    assert "model.layers.1.mlp.output_linear.weight" in message and "(3, 64, 96)" in message and "(4, 64, 96)" in message


def test_checkpoint_of_another_geometry_is_refused(tmp_path):
    """config.json says one thing, the tensors another: every mismatching key is reported."""
    _, oracle = build_pair(intermediate_size=48)
    oracle.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mlp.input_linear.weight.*\\(4, 96, 64\\).*\\(4, 192, 64\\)"):
        jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, intermediate_size=96)


def test_sequence_longer_than_max_position_embeddings_warns_once(caplog):
    # A max length no other test uses: warning_once is per process and per message.
    model = build_pair(max_position_embeddings=11)[0]
    with caplog.at_level(logging.WARNING, logger="jetmoe"):
        with torch.no_grad():
            model(random_ids(1, 11))  # exactly the maximum: fine
            assert not [r for r in caplog.records if "max_position_embeddings" in r.getMessage()]
            model(random_ids(2, 13))
            model(random_ids(1, 14))
            model.generate(random_ids(1, 9), max_new_tokens=6, eos_token_id=None)  # crosses it step by step
    warnings = [r for r in caplog.records if r.name.startswith("jetmoe") and "max_position_embeddings" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "11" in warnings[0].getMessage()


def test_vocabulary_bound_follows_resize_token_embeddings():
    ours, oracle = build_pair()
    ids = torch.tensor([[150, 199, 3]])
    for model in (ours, oracle):
        model.resize_token_embeddings(200, mean_resizing=False)
    with torch.no_grad():
        ours.model.embed_tokens.weight.copy_(oracle.model.embed_tokens.weight)  # the new rows are random
        assert_close(ours(ids).logits, oracle(ids).logits, what="logits after resize_token_embeddings")
    with pytest.raises(ValueError, match="200.*200"):
        ours(torch.tensor([[200]]))
