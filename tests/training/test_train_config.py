"""Run configuration: presets, YAML/TOML files, flag overrides, unknown keys, type checks."""

from __future__ import annotations

import pytest

from jetmoe.cli import build_parser
from jetmoe.training.cli import _overrides
from jetmoe.training.config import PRESETS, build_config, dump_yaml, field_names


def test_presets_resolve_and_build_valid_models():
    from jetmoe import JetMoeConfig

    tiny = build_config("tiny")
    assert tiny.model["hidden_size"] == 128 and tiny.max_steps == PRESETS["tiny"]["max_steps"]
    big = build_config("jetmoe-8b")
    model = JetMoeConfig(**big.model)
    assert (model.hidden_size, model.num_hidden_layers, model.num_key_value_heads, model.kv_channels) == (2048, 24, 16, 128)
    assert (model.intermediate_size, model.num_local_experts, model.num_experts_per_tok) == (5632, 8, 2)
    assert model.num_attention_heads == 32 and model.router_aux_loss_type == "switch"
    assert big.seq_len == 4096 and big.bf16 and big.schedule == "wsd"
    assert "pad_token_id" not in big.model  # nothing of the tiny preset leaks into it


def test_unknown_preset_lists_choices():
    with pytest.raises(ValueError, match="unknown preset 'huge'.*jetmoe-8b.*tiny"):
        build_config("huge")


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\nlr: 3e-4\nmax_steps: 7\nmodel:\n  num_hidden_layers: 3\n  rms_norm_eps: 1e-5\n")
    config = build_config(None, str(path), {"max_steps": 9, "model.hidden_size": 64})
    assert config.lr == pytest.approx(3e-4)  # YAML reads 3e-4 as text: converted by the field's type
    assert config.max_steps == 9
    assert config.model["num_hidden_layers"] == 3 and config.model["hidden_size"] == 64
    assert config.model["rms_norm_eps"] == pytest.approx(1e-5)
    assert config.model["num_local_experts"] == 4  # the rest of the preset's model stays


def test_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text('preset = "tiny"\nbatch_size = 3\ndata = ["a.txt"]\n[model]\nnum_local_experts = 6\n')
    config = build_config(None, str(path))
    assert config.batch_size == 3 and config.data == ["a.txt"] and config.model["num_local_experts"] == 6


def test_unknown_key_lists_the_valid_ones(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("learning_rate: 0.1\n")
    with pytest.raises(ValueError) as info:
        build_config(None, str(path))
    message = str(info.value)
    assert "learning_rate" in message and "valid keys are" in message
    for name in ("lr", "batch_size", "seq_len", "max_steps"):
        assert name in message


def test_unknown_model_key_lists_the_model_fields():
    with pytest.raises(ValueError, match=r"unknown command-line model key\(s\) \['hidden'\].*hidden_size"):
        build_config("tiny", None, {"model.hidden": 8})


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"batch_size": "many"}, "batch_size must be int"),
        ({"schedule": "triangle"}, r"schedule \(--schedule\) must be one of wsd, cosine, constant; got .triangle."),
        ({"lora_target_experts": ["moe_input", "mlp"]}, r"--lora-target-experts\) must be one of moa_query.*got .mlp."),
        ({"lr": -1.0}, "lr must be > 0"),
        ({"val_fraction": 1.0}, r"val_fraction must be in \[0, 1\)"),
        ({"lora": True}, "lora fine-tunes a trained model"),
    ],
)
def test_bad_values_are_named(overrides, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_config("tiny", None, overrides)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_config(None, str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ValueError, match="is not valid"):
        build_config(None, str(bad))
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="must hold a mapping"):
        build_config(None, str(listed))


def test_every_field_is_a_flag_and_set_reaches_any_key():
    args = build_parser().parse_args(
        ["train", "--preset", "tiny", "--lr", "2e-3", "--grad-accum", "4", "--no-progress", "--data", "a", "b",
         "--set", "model.num_hidden_layers=2", "--set", "seed=7"]
    )
    config = build_config(args.preset, args.config, _overrides(args))
    assert config.lr == pytest.approx(2e-3) and config.grad_accum == 4 and config.progress is False
    assert config.data == ["a", "b"] and config.model["num_hidden_layers"] == 2 and config.seed == 7
    help_text = build_parser().parse_args.__self__  # the parser: every config field has a flag
    flags = {action.dest for sub in help_text._subparsers._group_actions for p in sub.choices.values()
             for action in p._actions}
    assert set(field_names()) - {"model"} <= flags


def test_dumped_config_round_trips(tmp_path):
    config = build_config("tiny", None, {"lr": 1e-3, "model.hidden_size": 96})
    path = tmp_path / "again.yaml"
    path.write_text(dump_yaml(config))
    assert build_config(None, str(path)) == config


def test_every_field_has_help_and_a_group():
    import dataclasses

    from jetmoe.training.config import GROUPS, TrainConfig

    for spec in dataclasses.fields(TrainConfig):
        assert isinstance(spec.metadata.get("help"), str) and spec.metadata["help"].strip(), spec.name
        assert spec.metadata.get("group") in GROUPS, spec.name
        choices = spec.metadata.get("choices")
        if choices is not None:  # the default is one of the allowed values
            default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default
            assert all(v in choices for v in default) if isinstance(default, list) else default in choices, spec.name


def test_help_lists_each_flag_with_its_description_default_and_choices(capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["train", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines: compare with single spaces
    from jetmoe.training.config import GROUPS

    positions = [text.index(f"{group} (") for group in GROUPS]
    assert positions == sorted(positions)  # the groups, in their order
    assert "--lr VALUE peak learning rate (default: 0.003)" in text
    assert "--schedule CHOICE learning-rate schedule (wsd: warmup-stable-decay) (default: wsd); one of: wsd, cosine, constant" in text
    assert "--aux-loss-type CHOICE balancing loss (none = the model config's) (default: null); one of: null, reference, switch" in text
    assert "--progress, --no-progress show a progress bar (default: True)" in text
    # Each flag sits in its group: --device under parallelism, --save-every under checkpoints.
    assert positions[3] < text.index("--device CHOICE where") < positions[4] < text.index("--save-every VALUE steps") < positions[5]


@pytest.mark.parametrize("argv, flag, allowed", [
    (["--schedule", "triangle"], "--schedule", "'wsd', 'cosine', 'constant'"),
    (["--lora-target-experts", "moa_query", "mlp"], "--lora-target-experts", "'moa_query', 'moa_output'"),
    (["--device", "tpu"], "--device", "'auto', 'cpu', 'cuda'"),
])
def test_a_value_outside_the_choices_is_a_usage_error(argv, flag, allowed, capsys):
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["train", *argv])
    assert done.value.code == 2
    error = capsys.readouterr().err
    assert f"argument {flag}: invalid choice" in error and allowed in error


def test_list_flags_for_lora_targets_and_mixtures():
    args = build_parser().parse_args(["train", "--lora-target-experts", "--lora-target-modules", "kv_proj", "lm_head",
                                      "--data", "web/:0.7", "code.jsonl:0.3", "--data-phases", "50:web/=0,code.jsonl=1"])
    config = build_config("tiny", None, _overrides(args))
    assert config.lora_target_experts == [] and config.lora_target_modules == ["kv_proj", "lm_head"]
    assert config.data == ["web/:0.7", "code.jsonl:0.3"] and config.data_phases == ["50:web/=0,code.jsonl=1"]
