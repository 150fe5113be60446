"""Checkpoint interop with transformers' JetMoeForCausalLM: safetensors, sharded, tied and untied embeddings."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from oracle_pair import assert_close, build_pair, random_ids
from safetensors import safe_open

import jetmoe


def _saved_keys(directory) -> dict[str, tuple]:
    """Every tensor in the directory's safetensors files -> shape (a key in two files would be lost: checked)."""
    keys = {}
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            for key in f.keys():
                assert key not in keys, f"{key} saved twice"
                keys[key] = tuple(f.get_slice(key).get_shape())
    return keys


def _same_logits(a, b, what):
    ids = random_ids(2, 6)
    with torch.no_grad():
        return assert_close(a(ids).logits, b(ids).logits, atol=0, what=what)


def _same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("tie", [True, False])
def test_transformers_checkpoint_loads_in_ours(tmp_path, tie):
    _, oracle = build_pair(tie_word_embeddings=tie)
    oracle.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    assert isinstance(ours, jetmoe.JetMoeForCausalLM) and isinstance(ours.config, jetmoe.JetMoeConfig)
    _same_state(ours, oracle)
    _same_logits(ours, oracle, f"ours loaded from transformers (tie={tie})")
    tied = ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    assert tied == tie
    # Tensors read in their saved dtype come from the mapped file at its offsets; ours are 64-byte aligned
    # private copies (vector loads that straddle cache lines slowed decoding by 13%).
    misaligned = [name for name, t in (*ours.named_parameters(), *ours.named_buffers()) if t.data_ptr() % 64]
    assert not misaligned, misaligned
    mapped = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, align_cpu_weights=False)
    assert any(t.data_ptr() % 64 for t in mapped.parameters())  # the file's own offsets: what alignment fixed
    _same_state(mapped, ours)


def test_large_weights_load_onto_huge_page_memory(tmp_path):
    """from_pretrained gives tensors of 2 MiB or more private copies on huge-page memory (jetmoe.cpu_memory)."""
    from jetmoe import cpu_memory

    if not cpu_memory.huge_pages_supported():
        pytest.skip("MADV_HUGEPAGE is Linux-only")
    _, oracle = build_pair(vocab_size=8192)  # embedding 8192 x 64 fp32: 2 MiB
    oracle.save_pretrained(tmp_path)
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    large = [name for name, t in ours.named_parameters() if t.numel() * t.element_size() >= 2 << 20]
    assert large == ["model.embed_tokens.weight"]
    assert cpu_memory.on_huge_pages(ours.model.embed_tokens.weight)
    assert ours.config.tie_word_embeddings and ours.lm_head.weight is ours.model.embed_tokens.weight
    _same_state(ours, oracle)
    _same_logits(ours, oracle, "ours on huge pages")


def test_weights_stay_mapped_when_their_copies_would_not_fit(tmp_path, monkeypatch):
    from jetmoe import cpu_memory
    from jetmoe.modeling import loading as loading_module

    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    mapped = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, align_cpu_weights=False)
    size = sum(t.numel() * t.element_size() for t in mapped.state_dict().values())
    if cpu_memory.file_backed_bytes(mapped) is None:
        pytest.skip("/proc/self/maps is unreadable here")
    assert 0 < cpu_memory.file_backed_bytes(mapped) <= size  # views of the mapped file
    copied = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    assert cpu_memory.file_backed_bytes(copied) == 0  # every tensor a private copy: no mapping referenced

    warnings = []
    monkeypatch.setattr(loading_module.logger, "warning", lambda message, *a, **k: warnings.append(message))
    monkeypatch.setattr(cpu_memory, "available_memory_bytes", lambda: 512 << 20)  # less than the headroom
    kept = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    assert cpu_memory.file_backed_bytes(kept) > 0
    assert len(warnings) == 1 and "keeping the weights mapped" in warnings[0] and "GiB" in warnings[0]
    _same_state(kept, oracle)


@pytest.mark.parametrize("tie", [True, False])
def test_our_checkpoint_loads_in_transformers(tmp_path, tie):
    ours, _ = build_pair(tie_word_embeddings=tie)
    ours.save_pretrained(tmp_path)
    saved = _saved_keys(tmp_path)
    # Tied embeddings are saved once (under the embedding's name); untied, both are saved.
    assert "model.embed_tokens.weight" in saved
    assert ("lm_head.weight" in saved) == (not tie)
    assert len(saved) == len(ours.state_dict()) - (1 if tie else 0)
    oracle = transformers.JetMoeForCausalLM.from_pretrained(tmp_path)
    assert type(oracle).__module__.startswith("transformers.")
    _same_state(ours, oracle)
    _same_logits(ours, oracle, f"transformers loaded from ours (tie={tie})")
    if not tie:
        assert not torch.equal(oracle.lm_head.weight, oracle.model.embed_tokens.weight)


def test_same_file_layout_as_transformers(tmp_path):
    ours, oracle = build_pair()
    ours.save_pretrained(tmp_path / "ours")
    oracle.save_pretrained(tmp_path / "oracle")
    assert _saved_keys(tmp_path / "ours") == _saved_keys(tmp_path / "oracle")


@pytest.mark.parametrize("direction", ["transformers->ours", "ours->transformers"])
def test_sharded_checkpoints_load_both_ways(tmp_path, direction):
    ours, oracle = build_pair(tie_word_embeddings=False)
    writer, reader = (oracle, jetmoe.JetMoeForCausalLM) if direction == "transformers->ours" else (
        ours, transformers.JetMoeForCausalLM)
    writer.save_pretrained(tmp_path, max_shard_size="100KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 3
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(_saved_keys(tmp_path)) == set(writer.state_dict())
    loaded = reader.from_pretrained(tmp_path)
    _same_state(loaded, writer)
    _same_logits(loaded, writer, f"sharded {direction}")


def test_load_in_bf16(tmp_path):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert torch.equal(ours.model.embed_tokens.weight, oracle.model.embed_tokens.weight.to(torch.bfloat16))


def test_base_model_and_classifier_load_from_a_causal_lm_checkpoint(tmp_path):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    base = jetmoe.JetMoeModel.from_pretrained(tmp_path)
    assert torch.equal(base.norm.weight, oracle.model.norm.weight)
    # The classification head is new (not in a causal-LM checkpoint): allowed, and only that.
    classifier, info = jetmoe.JetMoeForSequenceClassification.from_pretrained(
        tmp_path, num_labels=3, pad_token_id=0, output_loading_info=True
    )
    assert set(info["missing_keys"]) == {"score.weight"}
    assert torch.equal(classifier.model.layers[1].mlp.bias, oracle.model.layers[1].mlp.bias)


@pytest.fixture
def restored_auto_registry():
    """Registration is process-global: undo it, so later tests in this worker get transformers' own classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    autos = (transformers.AutoModel, transformers.AutoModelForCausalLM, transformers.AutoModelForSequenceClassification)
    saved = [dict(CONFIG_MAPPING._extra_content)] + [dict(a._model_mapping._extra_content) for a in autos]
    yield
    for mapping, content in zip([CONFIG_MAPPING] + [a._model_mapping for a in autos], saved):
        mapping._extra_content.clear()
        mapping._extra_content.update(content)


def test_auto_classes_build_ours_after_registration(tmp_path, restored_auto_registry):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    jetmoe.register_with_transformers()
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(model, jetmoe.JetMoeForCausalLM)
    _same_logits(model, oracle, "AutoModelForCausalLM after register_with_transformers")
    assert isinstance(transformers.AutoModel.from_pretrained(tmp_path), jetmoe.JetMoeModel)


def test_auto_registry_is_restored_after_the_registration_test(tmp_path):
    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    assert type(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)) is transformers.JetMoeForCausalLM


def _loading_report(cls, directory, **kwargs):
    model, info = cls.from_pretrained(directory, output_loading_info=True, **kwargs)
    return model, {key: sorted(map(str, value)) for key, value in info.items() if key != "error_msgs"}


def test_base_model_checkpoint_loads_into_the_causal_lm_with_tied_embeddings(tmp_path):
    """A JetMoeModel checkpoint holds no lm_head; tied to the embedding, nothing is missing."""
    _, oracle = build_pair()
    oracle.base_model.save_pretrained(tmp_path)
    assert not any(key.startswith(("lm_head", "model.")) for key in _saved_keys(tmp_path))
    ours = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)  # no error, no report needed
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    _same_state(ours, oracle)
    _same_logits(ours, oracle, "ours from a base-model checkpoint")
    _, report = _loading_report(jetmoe.JetMoeForCausalLM, tmp_path)
    assert report == _loading_report(transformers.JetMoeForCausalLM, tmp_path)[1]
    assert report["missing_keys"] == [] and report["unexpected_keys"] == []


def test_missing_untied_head_is_an_error_unless_the_report_is_asked_for(tmp_path):
    _, oracle = build_pair(tie_word_embeddings=False)
    oracle.base_model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"lm_head.weight: missing from the checkpoint \(model shape \(128, 64\)\)"):
        jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path)
    ours, report = _loading_report(jetmoe.JetMoeForCausalLM, tmp_path)  # transformers' convention: reported
    assert report == _loading_report(transformers.JetMoeForCausalLM, tmp_path)[1]
    assert report["missing_keys"] == ["lm_head.weight"]
    assert torch.equal(ours.model.norm.weight, oracle.model.norm.weight)


@pytest.mark.parametrize("head", ["causal_lm", "base", "seq_cls"])
@pytest.mark.parametrize("tie", [True, False])
def test_loading_report_of_a_checkpoint_without_any_model_weight_is_transformers(tmp_path, head, tie):
    """Every weight missing, one unknown tensor: the same report as transformers' (tied pairs included), and
    without the report asked for, an error that names the missing weights."""
    from safetensors.torch import save_file

    ours, oracle = build_pair(head=head, tie_word_embeddings=tie, num_labels=3, pad_token_id=0)
    oracle.save_pretrained(tmp_path)
    save_file({"tensor": torch.tensor([1, 2])}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    _, report = _loading_report(type(ours), tmp_path)
    assert report == _loading_report(type(oracle), tmp_path)[1]
    assert report["unexpected_keys"] == ["tensor"] and len(report["missing_keys"]) >= 20
    with pytest.raises(ValueError, match="norm.weight: missing from the checkpoint"):
        type(ours).from_pretrained(tmp_path)


def test_ignore_mismatched_sizes_starts_those_tensors_fresh_and_reports_them(tmp_path):
    from safetensors.torch import load_file, save_file

    _, oracle = build_pair()
    oracle.save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    key = "model.layers.0.self_attention.kv_proj.weight"
    tensors[key] = torch.zeros(60, 64)
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="ignore_mismatched_sizes=True"):
        jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)  # the report is no waiver
    loaded = jetmoe.JetMoeForCausalLM.from_pretrained(tmp_path, ignore_mismatched_sizes=True)  # no report needed
    assert loaded.model.layers[0].self_attention.kv_proj.weight.shape == (64, 64)
    ours, report = _loading_report(jetmoe.JetMoeForCausalLM, tmp_path, ignore_mismatched_sizes=True)
    assert report == _loading_report(transformers.JetMoeForCausalLM, tmp_path, ignore_mismatched_sizes=True)[1]
    assert report["mismatched_keys"] == [str((key, torch.Size([60, 64]), torch.Size([64, 64])))]
    fresh = ours.model.layers[0].self_attention.kv_proj.weight
    assert fresh.shape == (64, 64) and fresh.abs().sum() > 0  # re-initialised, not the zeros
    kept = ours.model.layers[1].self_attention.kv_proj.weight
    assert torch.equal(kept, oracle.model.layers[1].self_attention.kv_proj.weight)
