"""Pipeline parallelism with real `torchrun` processes (gloo, CPU): pp=2 under each schedule and pp=2 x dp=2 give
the one-process losses over 20 steps (the same micro-batches: see training/pipeline.py), their checkpoints load
in transformers and resume; bad layouts are clear errors."""

from __future__ import annotations

import os
import shutil

import pytest

from jetmoe.cli import main as jetmoe_main
from jetmoe.training.checkpoint import checkpoint_root
from jetmoe.training.config import build_config
from jetmoe.training.metrics import read_metrics
from jetmoe.training.pipeline import make_layout, split_layers
from train_helpers import MICRO_MODEL, micro_settings, run_command, run_jetmoe, torchrun_command, write_config

STEPS = 20


def torchrun(processes: int, *args: str) -> str:
    """`torchrun --nproc_per_node N -m jetmoe.cli train ARGS`; returns its stdout."""
    result = run_command(torchrun_command(processes, "train", *args))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def records(out_dir) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(str(out_dir)) if "loss" in r}


def assert_same_run(got: dict, expected: dict) -> float:
    """Every step's loss, and each of its terms, within 1e-4 relative and the same expert load; returns the largest
    relative loss difference."""
    assert sorted(got) == sorted(expected) == list(range(1, STEPS + 1))
    worst = max(abs(got[s]["loss"] - expected[s]["loss"]) / abs(expected[s]["loss"]) for s in expected)
    print(f"largest relative loss difference over {STEPS} steps: {worst:.3g}")
    assert worst <= 1e-4
    for term in ("ce", "aux", "z_loss", "grad_norm"):  # aux_loss_coef is small: check the balancing loss on its own
        for step in expected:
            assert got[step][term] == pytest.approx(expected[step][term], rel=1e-4), (term, step)
    for kind in ("moa", "moe"):
        for a, b in zip(got[STEPS]["expert_load"][kind], expected[STEPS]["expert_load"][kind]):
            assert a == pytest.approx(b, abs=0.02)
    assert expected[STEPS]["loss"] < expected[1]["loss"] - 0.3  # and it learned
    return worst


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, token_cache):
    """One process, micro-batches of one sequence, four per step: the split of every pipeline run below
    (batch_size 2 / microbatches 2 x grad_accum 2, or x 2 replicas)."""
    folder = tmp_path_factory.mktemp("pipeline")
    settings = micro_settings(corpus, token_cache, max_steps=STEPS, save_every=10, val_every=10,
                              model=dict(MICRO_MODEL, num_hidden_layers=4))
    config = write_config(folder / "run.yaml", settings)
    out = folder / "single"
    result = run_jetmoe("train", "--config", config, "--out-dir", str(out), "--batch-size", "1", "--grad-accum", "4",
                         "--val-batches", "4")  # the same validation sequences as 2 batches of 2
    assert result.returncode == 0, result.stderr
    return config, out


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved1f1b", "gpipe"])
def test_pp2_matches_one_process(reference, tmp_path, schedule):
    config, single = reference
    out = tmp_path / schedule
    stdout = torchrun(2, "--config", config, "--out-dir", str(out), "--pp", "2", "--pp-schedule", schedule,
                      "--microbatches", "2", "--grad-accum", "2", "--export-dir", str(tmp_path / "export"))
    assert stdout.count('"step": 20') == 1 and stdout.count("validation loss") == 2  # printed by rank 0 only
    assert_same_run(records(out), records(single))
    validation = [r for r in read_metrics(str(out)) if "val_loss" in r]
    expected = [r for r in read_metrics(str(single)) if "val_loss" in r]
    assert [r["val_tokens"] for r in validation] == [r["val_tokens"] for r in expected]
    for a, b in zip(validation, expected):
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    if schedule != "1f1b":
        return

    # The pp run's export is a whole HF model: transformers loads it, with the weights of the one-process run.
    import torch
    import transformers

    theirs = transformers.JetMoeForCausalLM.from_pretrained(str(tmp_path / "export"))
    ours = transformers.JetMoeForCausalLM.from_pretrained(os.path.join(checkpoint_root(single), "step-00000020"))
    assert theirs.lm_head.weight is theirs.model.embed_tokens.weight  # still tied
    for (name, x), (_, y) in zip(theirs.state_dict().items(), ours.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)

    # Resuming from its step-10 checkpoint redoes steps 11-20 exactly as the uninterrupted run did them.
    whole = records(out)
    shutil.rmtree(os.path.join(checkpoint_root(out), "step-00000020"))
    torchrun(2, "--config", config, "--out-dir", str(out), "--pp", "2", "--microbatches", "2", "--grad-accum", "2",
             "--resume")
    resumed = records(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for step in range(11, STEPS + 1):
        assert resumed[step]["loss"] == pytest.approx(whole[step]["loss"], rel=0, abs=1e-6), step

    # Any other layout: the pp run's step-10 checkpoint resumed by one process, and the one-process run's by pp=2,
    # redo steps 11-20 as the uninterrupted runs did (the same global batch, the same micro-batches).
    shutil.rmtree(os.path.join(checkpoint_root(out), "step-00000020"))
    result = run_jetmoe("train", "--config", config, "--out-dir", str(out), "--batch-size", "1", "--grad-accum", "4",
                        "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    alone = records(out)
    for step in range(11, STEPS + 1):
        assert alone[step]["loss"] == pytest.approx(whole[step]["loss"], rel=1e-4), step
    from_single = tmp_path / "from-single"
    shutil.copytree(single, from_single)
    shutil.rmtree(os.path.join(checkpoint_root(from_single), "step-00000020"))
    torchrun(2, "--config", config, "--out-dir", str(from_single), "--pp", "2", "--microbatches", "2",
             "--grad-accum", "2", "--resume")
    staged, expected = records(from_single), records(single)
    for step in range(11, STEPS + 1):
        assert staged[step]["loss"] == pytest.approx(expected[step]["loss"], rel=1e-4), step


def test_pp2_by_dp2_matches_one_process(reference, tmp_path):
    config, single = reference
    out = tmp_path / "dp2pp2"
    torchrun(4, "--config", config, "--out-dir", str(out), "--pp", "2", "--microbatches", "2")
    assert_same_run(records(out), records(single))
    assert os.path.exists(os.path.join(checkpoint_root(out), "step-00000020", "model.safetensors"))


def test_layouts_that_do_not_fit_are_clear_errors(tmp_path, corpus, token_cache, capsys):
    config = build_config("tiny", None, {"pp": 2})
    assert config.microbatches == 2  # by default as many as stages
    with pytest.raises(ValueError, match="pp 2 does not divide the 3 processes"):
        make_layout(config, world=3, rank=0)
    with pytest.raises(ValueError, match="4 pipeline stages need at least 4 decoder layers, the model has 2"):
        split_layers(2, 4)
    assert [list(r) for r in split_layers(5, 2)] == [[0, 1, 2], [3, 4]]
    layout = make_layout(build_config("tiny", None, {"pp": 2, "pp_schedule": "interleaved1f1b"}), world=4, rank=3)
    assert (layout.dp, layout.dp_rank, layout.pp_rank, layout.stages()) == (2, 1, 1, [1, 3])
    for overrides, message in [
        ({"microbatches": 2}, "microbatches 2 splits a pipeline's batch and needs pp > 1"),
        ({"pp": 2, "batch_size": 3, "microbatches": 2}, "batch_size 3 is not divisible by microbatches 2"),
        ({"pp": 4, "microbatches": 2}, "pp_schedule 1f1b needs microbatches >= pp: got microbatches 2, pp 4"),
        ({"pp": 0}, "pp must be a positive integer"),
        ({"pp": 2, "microbatches": -1}, "microbatches must be a positive integer"),
        ({"pp": 2, "pp_schedule": "zero-bubble"}, r"pp_schedule \(--pp-schedule\) must be one of 1f1b, interleaved1f1b"),
        ({"pp": 2, "ep": 2}, "pipeline and expert parallelism together are not supported"),
        ({"pp": 2, "lora": True, "init_from": str(tmp_path)}, "lora is not supported with pipeline parallelism"),
    ]:
        with pytest.raises(ValueError, match=message):
            build_config("tiny", None, overrides)
    # One process asked for two stages: the error names the problem before any data is read.
    settings = micro_settings(corpus, token_cache, out_dir=str(tmp_path / "out"), pp=2, microbatches=2)
    assert jetmoe_main(["train", "--config", write_config(tmp_path / "run.yaml", settings)]) == 2
    assert "jetmoe train: error: pp 2 does not divide the 1 processes" in capsys.readouterr().err


def test_pp2_switch_objective_matches_one_process(tmp_path, corpus, token_cache):
    """The original JetMoE objective (a switch loss + z-loss per router, summed) across stages: jetmoe-8b's."""
    settings = micro_settings(corpus, token_cache, max_steps=STEPS, save_every=STEPS, val_every=STEPS,
                              aux_loss_type="switch", z_loss_coef=0.01)
    config = write_config(tmp_path / "run.yaml", settings)
    single = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "single"), "--batch-size", "1",
                        "--grad-accum", "2", "--val-batches", "4")
    assert single.returncode == 0, single.stderr
    torchrun(2, "--config", config, "--out-dir", str(tmp_path / "pp2"), "--pp", "2")  # microbatches: 2 by default
    expected = records(tmp_path / "single")
    assert expected[1]["aux"] > 4  # the switch objective's scale (one balance term near 1 per router), not 2.0
    assert_same_run(records(tmp_path / "pp2"), expected)
