"""JetMoeConfig: the seed's fields and defaults, config.json both ways with transformers' JetMoeConfig, the
original repo's key names, and validation (ValueError naming the field and the value)."""

from __future__ import annotations

import json

import pytest
import transformers
from oracle_pair import TINY

import jetmoe

# Ours adds two options beyond the reference; everything else is the reference's.
EXTRA_FIELDS = {"router_aux_loss_type": "reference", "router_z_loss_coef": 0.1}


def _fields(config) -> dict:
    data = config.to_dict()
    data.pop("transformers_version", None)
    return data


def test_defaults_are_the_seeds():
    ours, oracle = _fields(jetmoe.JetMoeConfig()), _fields(transformers.JetMoeConfig())
    assert {k: ours.pop(k) for k in EXTRA_FIELDS} == EXTRA_FIELDS
    assert ours == oracle
    config = jetmoe.JetMoeConfig()
    assert config.model_type == "jetmoe"
    # JetMoE-4B geometry, spelled out (so the test does not only trust the oracle).
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (32000, 2048, 12)
    assert (config.num_key_value_heads, config.kv_channels, config.intermediate_size) == (16, 128, 5632)
    assert (config.num_local_experts, config.num_experts_per_tok, config.max_position_embeddings) == (8, 2, 4096)
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 10000.0}
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, None)
    assert config.activation_function == "silu" and config.tie_word_embeddings and config.use_cache
    assert (config.rms_norm_eps, config.initializer_range, config.attention_dropout) == (1e-6, 0.01, 0.0)
    assert (config.output_router_logits, config.aux_loss_coef) == (False, 0.01)


def test_derived_head_count_and_head_dim_alias():
    config = jetmoe.JetMoeConfig(num_key_value_heads=4, num_experts_per_tok=3, kv_channels=8)
    assert config.num_attention_heads == 12  # k * Nkv, also written to config.json
    assert config.head_dim == 8
    assert jetmoe.JetMoeConfig(head_dim=32).kv_channels == 32


def test_config_json_matches_the_reference_file(tmp_path):
    jetmoe.JetMoeConfig(**TINY).save_pretrained(tmp_path / "ours")
    transformers.JetMoeConfig(**TINY).save_pretrained(tmp_path / "oracle")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    oracle = json.loads((tmp_path / "oracle" / "config.json").read_text())
    assert {k: ours.pop(k) for k in EXTRA_FIELDS} == EXTRA_FIELDS
    assert ours == oracle
    assert ours["model_type"] == "jetmoe" and ours["num_attention_heads"] == 4


@pytest.mark.parametrize(
    "fields",
    [TINY, dict(TINY, pad_token_id=0, tie_word_embeddings=False, rms_norm_eps=1e-5, output_router_logits=True,
                rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0})],
)
def test_config_json_round_trips_both_ways(tmp_path, fields):
    ours = jetmoe.JetMoeConfig(**fields)
    ours.save_pretrained(tmp_path / "ours")
    read_by_oracle = transformers.JetMoeConfig.from_pretrained(tmp_path / "ours")
    assert _fields(read_by_oracle) == _fields(ours)  # the oracle keeps our two extra fields as attributes

    oracle = transformers.JetMoeConfig(**fields)
    oracle.save_pretrained(tmp_path / "oracle")
    read_by_ours = jetmoe.JetMoeConfig.from_pretrained(tmp_path / "oracle")
    assert _fields(read_by_ours) == _fields(ours)

    # And through a second save by ours: stable.
    read_by_ours.save_pretrained(tmp_path / "again")
    assert _fields(jetmoe.JetMoeConfig.from_pretrained(tmp_path / "again")) == _fields(ours)


def test_legacy_rope_theta_is_folded_in_like_the_reference():
    ours, oracle = jetmoe.JetMoeConfig(rope_theta=500.0), transformers.JetMoeConfig(rope_theta=500.0)
    assert ours.rope_parameters == oracle.rope_parameters == {"rope_type": "default", "rope_theta": 500.0}


ORIGINAL = {"num_layers": 3, "ffn_hidden_size": 40, "moe_num_experts": 6, "moe_top_k": 3}


def test_original_key_names_are_mapped(tmp_path):
    config = jetmoe.JetMoeConfig.from_dict(dict(ORIGINAL, hidden_size=64))
    assert config.num_hidden_layers == 3
    assert config.intermediate_size == 40
    assert config.num_local_experts == 6
    assert config.num_experts_per_tok == 3
    assert config.num_attention_heads == 3 * config.num_key_value_heads
    # The reference silently ignores them (and falls back to its defaults).
    oracle = transformers.JetMoeConfig.from_dict(dict(ORIGINAL, hidden_size=64))
    assert oracle.intermediate_size == 5632
    # Saved under the standard names only.
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert not set(ORIGINAL) & set(saved)
    assert (saved["num_hidden_layers"], saved["intermediate_size"]) == (3, 40)


def test_published_jetmoe_8b_config_json_reads_with_its_geometry(tmp_path):
    """The key set the hub's jetmoe-8b config.json shows (reference-semantics.md section 7)."""
    published = {
        "model_type": "jetmoe", "hidden_size": 2048, "num_layers": 24, "num_attention_heads": 32,
        "num_key_value_heads": 16, "kv_channels": 128, "ffn_hidden_size": 5632, "moe_num_experts": 8,
        "moe_top_k": 2, "vocab_size": 32000, "max_position_embeddings": 4096, "activation_function": "silu",
        "glu": True, "bias": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    config = jetmoe.JetMoeConfig.from_pretrained(tmp_path)
    assert config.num_hidden_layers == 24  # the reference would build 12 layers here
    assert (config.intermediate_size, config.num_local_experts, config.num_experts_per_tok) == (5632, 8, 2)
    assert config.rms_norm_eps == 1e-5 and config.rope_parameters["rope_theta"] == 10000.0
    assert config.num_attention_heads == 32


def test_standard_key_wins_over_original_when_set():
    config = jetmoe.JetMoeConfig(num_hidden_layers=4, num_layers=24, intermediate_size=100, ffn_hidden_size=40)
    assert (config.num_hidden_layers, config.intermediate_size) == (4, 100)


def test_original_key_wins_over_a_default_written_beside_it_by_the_reference(tmp_path):
    """A file re-saved by the reference carries the original key and the (wrong) default standard one."""
    oracle = transformers.JetMoeConfig.from_dict(dict(ORIGINAL, hidden_size=64))
    oracle.save_pretrained(tmp_path)
    config = jetmoe.JetMoeConfig.from_pretrained(tmp_path)
    assert (config.num_hidden_layers, config.intermediate_size, config.num_local_experts) == (3, 40, 6)


def test_a_model_builds_from_original_keys():
    config = jetmoe.JetMoeConfig.from_dict(
        dict(ORIGINAL, hidden_size=32, num_key_value_heads=2, kv_channels=8, vocab_size=50)
    )
    model = jetmoe.JetMoeForCausalLM(config)
    assert len(model.model.layers) == 3
    assert model.model.layers[0].mlp.input_linear.weight.shape == (6, 80, 32)


# ---------------------------------------------------------------------------------------------------------
# Validation: ValueError naming the field and the bad value.

INVALID = [
    (dict(num_experts_per_tok=5, num_local_experts=4), "num_experts_per_tok", "5"),
    (dict(hidden_size=0), "hidden_size", "0"),
    (dict(vocab_size=-3), "vocab_size", "-3"),
    (dict(num_hidden_layers=2.5), "num_hidden_layers", "2.5"),
    (dict(num_key_value_heads=0), "num_key_value_heads", "0"),
    (dict(kv_channels=-16), "kv_channels", "-16"),
    (dict(kv_channels=15), "kv_channels", "15"),
    (dict(intermediate_size=None), "intermediate_size", "None"),
    (dict(num_local_experts=0), "num_local_experts", "0"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok", "0"),
    (dict(max_position_embeddings=0), "max_position_embeddings", "0"),
    (dict(hidden_size=True), "hidden_size", "True"),
    (dict(activation_function="nope"), "activation_function", "nope"),
    (dict(activation_function=None), "activation_function", "None"),
    (dict(rope_parameters={"rope_type": "bogus", "rope_theta": 1e4}), "rope_type", "bogus"),
    (dict(rope_parameters={"rope_type": "default", "rope_theta": -1.0}), "rope_theta", "-1.0"),
    (dict(rope_theta=0.0), "rope_theta", "0.0"),
    (dict(rope_theta="abc"), "rope_theta", "abc"),
    (dict(rope_parameters="x"), "rope_parameters", "x"),
    (dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4}), "rope_parameters", "factor"),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2.0, "rope_theta": 1e4}), "factor", "-2.0"),
    (dict(rms_norm_eps=0.0), "rms_norm_eps", "0.0"),
    (dict(rms_norm_eps=None), "rms_norm_eps", "None"),
    (dict(initializer_range=-1.0), "initializer_range", "-1.0"),
    (dict(attention_dropout=1.0), "attention_dropout", "1.0"),
    (dict(attention_dropout=None), "attention_dropout", "None"),
    (dict(aux_loss_coef=-1.0), "aux_loss_coef", "-1.0"),
    (dict(aux_loss_coef=None), "aux_loss_coef", "None"),
    (dict(router_z_loss_coef=-1.0), "router_z_loss_coef", "-1.0"),
    (dict(router_aux_loss_type="x"), "router_aux_loss_type", "x"),
]


@pytest.mark.parametrize("fields,field,value", INVALID, ids=[f"{f}={v}" for _, f, v in INVALID])
def test_invalid_values_raise_value_error_naming_field_and_value(fields, field, value):
    with pytest.raises(ValueError) as error:
        jetmoe.JetMoeConfig(**fields)
    message = str(error.value)
    assert field in message and value in message, message


def test_invalid_config_json_is_refused_on_load(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(dict(TINY, model_type="jetmoe", num_experts_per_tok=9)))
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        jetmoe.JetMoeConfig.from_pretrained(tmp_path)


@pytest.mark.parametrize(
    "rope",
    [
        {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4},
        {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4},
        {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4, "original_max_position_embeddings": 1024},
    ],
)
def test_valid_rope_types_are_accepted(rope):
    assert jetmoe.JetMoeConfig(rope_parameters=dict(rope)).rope_parameters["rope_type"] == rope["rope_type"]
