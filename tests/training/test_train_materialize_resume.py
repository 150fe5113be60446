"""Start-up on the meta device (each process materialises only its shards, with the values of a single-process
start) and resuming with another process count (real torchrun processes, gloo, CPU, SIGKILLed mid-run)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time

import pytest
import torch

from jetmoe import JetMoeConfig, JetMoeForCausalLM
from jetmoe.training import checkpoint as ckpt
from jetmoe.training import materialize as mat
from jetmoe.training.checkpoint import checkpoint_root
from jetmoe.training.distributed import Runtime
from train_helpers import (MICRO_MODEL, jetmoe_command, losses, micro_settings, run_command, subprocess_env,
                           torchrun_command, write_config)

ONE = Runtime(rank=0, world=1, local_rank=0, device=torch.device("cpu"))


def _fresh(config: JetMoeConfig, seed: int = 0) -> torch.nn.Module:
    model = mat.meta_model(config)
    return mat.materialize(model, torch.device("cpu"), mat.RandomInit(seed, model))


def test_random_init_of_any_slice_is_the_slice_of_the_whole(monkeypatch):
    monkeypatch.setattr(mat, "_BLOCK_ELEMENTS", 100)  # many blocks per tensor, so that slices cut through them
    config = JetMoeConfig(**MICRO_MODEL, pad_token_id=5)
    whole = _fresh(config)
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    assert not whole.model.embed_tokens.weight[5].any() and whole.model.embed_tokens.weight[6].any()
    source = mat.RandomInit(0, whole)
    for name, param in whole.named_parameters():
        if param.ndim == 0:
            continue
        for start, stop in ((0, 1), (1, param.shape[0]), (param.shape[0] // 3, param.shape[0] - 1)):
            offset = (start, *([0] * (param.ndim - 1)))
            local = torch.empty((stop - start, *param.shape[1:]))
            source.fill(name, local, tuple(param.shape), offset)
            assert torch.equal(local, param[start:stop]), (name, start, stop)
    other = _fresh(config, seed=1)
    assert not torch.equal(other.model.layers[0].mlp.input_linear.weight, whole.model.layers[0].mlp.input_linear.weight)
    # The scheme follows the model's own initialisation: normal(0, initializer_range), zero biases, unit norms.
    experts = whole.model.layers[0].mlp.input_linear.weight
    assert abs(float(experts.detach().std()) - config.initializer_range) < 0.1 * config.initializer_range
    assert not whole.model.layers[0].mlp.bias.any() and bool((whole.model.norm.weight == 1).all())


def test_hf_weights_written_in_pieces_load_anywhere(tmp_path, monkeypatch):
    config = JetMoeConfig(**MICRO_MODEL)
    model = _fresh(config)
    monkeypatch.setattr(ckpt, "MAX_FILE_BYTES", 20_000)  # several files and an index
    os.makedirs(tmp_path / "hf")
    names = ckpt.save_hf_weights(model, str(tmp_path / "hf"), ONE)
    ckpt._save_model_config(model, str(tmp_path / "hf"))
    assert len(names) > 1 and os.path.exists(tmp_path / "hf" / "model.safetensors.index.json")
    loaded = JetMoeForCausalLM.from_pretrained(str(tmp_path / "hf"))
    sliced = mat.materialize(mat.meta_model(config), torch.device("cpu"), mat.CheckpointSlices(str(tmp_path / "hf")))
    for (name, x), (_, y), (_, z) in zip(model.state_dict().items(), loaded.state_dict().items(),
                                         sliced.state_dict().items()):
        assert torch.equal(x, y) and torch.equal(x, z), name


def test_materialize_takes_only_meta_models():
    with pytest.raises(mat.MaterializeError, match="model.embed_tokens.weight is on cpu"):
        mat.materialize(_fresh(JetMoeConfig(**MICRO_MODEL)), torch.device("cpu"), None)


def test_checkpoint_that_does_not_fit_the_model_is_named(tmp_path):
    model = _fresh(JetMoeConfig(**MICRO_MODEL))
    model.save_pretrained(tmp_path / "hf")
    wider = JetMoeConfig(**dict(MICRO_MODEL, intermediate_size=48))
    with pytest.raises(mat.MaterializeError, match=r"model.layers.0.mlp.input_linear.weight: checkpoint shape "
                                                   r"\(4, 64, 32\) != model shape \(4, 96, 32\)"):
        mat.materialize(mat.meta_model(wider), torch.device("cpu"), mat.CheckpointSlices(str(tmp_path / "hf")))
    deeper = JetMoeConfig(**dict(MICRO_MODEL, num_hidden_layers=3))
    with pytest.raises(mat.MaterializeError, match="has no tensor 'model.layers.2.input_layernorm.weight'"):
        mat.materialize(mat.meta_model(deeper), torch.device("cpu"), mat.CheckpointSlices(str(tmp_path / "hf")))


def test_resume_with_another_model_config_is_an_error(tmp_path, corpus, token_cache):
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=2, save_every=2))
    first = run_command(jetmoe_command("train", "--config", config, "--out-dir", str(tmp_path / "out")))
    assert first.returncode == 0, first.stderr
    again = run_command(jetmoe_command("train", "--config", config, "--out-dir", str(tmp_path / "out"), "--resume",
                                       "--max-steps", "4", "--set", "model.num_hidden_layers=3"))
    assert again.returncode != 0
    assert "its model differs from this run's config in num_hidden_layers 2 (this run: 3)" in again.stderr
    # Another global batch resumes from the same data position, with a warning.
    other = run_command(jetmoe_command("train", "--config", config, "--out-dir", str(tmp_path / "out"), "--resume",
                                       "--max-steps", "3", "--grad-accum", "2"))
    assert other.returncode == 0, other.stderr[-3000:]
    assert "trained with a global batch of 2 sequences (1 processes), this run's is 4" in other.stdout


def _peaks(stdout: str) -> list[float]:
    line = re.search(r"peak host memory per process so far: (.*)", stdout)
    assert line, stdout[-2000:]
    return [float(x) for x in re.findall(r"([\d.]+) MiB", line.group(1))]


def test_two_process_start_holds_half_the_weights_per_process(tmp_path, corpus, token_cache):
    # 60M parameters (229 MiB in fp32): the weights dominate what python, torch and transformers take.
    model = dict(MICRO_MODEL, hidden_size=512, num_hidden_layers=4, kv_channels=64, intermediate_size=1024,
                 num_local_experts=8)
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, model=model, max_steps=1,
                                                                save_every=1, val_every=100))
    weights_mib = sum(p.numel() for p in mat.meta_model(JetMoeConfig(**model)).parameters()) * 4 / 2**20
    single = run_command(jetmoe_command("train", "--config", config, "--out-dir", str(tmp_path / "one"),
                                        "--grad-accum", "2"))
    assert single.returncode == 0, single.stderr[-3000:]
    two = run_command(torchrun_command(2, "train", "--config", config, "--out-dir", str(tmp_path / "two")))
    assert two.returncode == 0, two.stdout[-3000:] + two.stderr[-3000:]
    (one_peak,), two_peaks = _peaks(single.stdout), _peaks(two.stdout)
    print(f"weights {weights_mib:.0f} MiB; peak at start-up: 1 process {one_peak:.0f} MiB, 2 processes {two_peaks} MiB")
    assert len(two_peaks) == 2
    # Each of the two holds half the weights: at least 35% of the weights below the single process.
    assert max(two_peaks) < one_peak - 0.35 * weights_mib, (one_peak, two_peaks, weights_mib)
    # The same initial values: the first loss (before any update) agrees up to the reduction order.
    assert losses(tmp_path / "two")[1] == pytest.approx(losses(tmp_path / "one")[1], rel=1e-5)


def _kill_after_checkpoint(command: list[str], out, step: int) -> None:
    """Start `command`, SIGKILL its whole process group once checkpoint `step` is complete."""
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    marker = os.path.join(checkpoint_root(out), f"step-{step:08d}")
    deadline = time.monotonic() + 200
    try:
        while not os.path.isdir(marker):  # complete checkpoints appear by rename, all at once
            assert process.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


RESUME_STEPS = 16


def _resume_command(config: str, processes: int, out, *extra: str) -> list[str]:
    # The same global batch (4 sequences) either way: 2 processes x 1 micro-batch, or 1 x 2.
    args = ("train", "--config", config, "--out-dir", str(out), "--grad-accum", str(3 - processes), *extra)
    return torchrun_command(processes, *args) if processes > 1 else jetmoe_command(*args)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, corpus, token_cache):
    """(config file, losses of the uninterrupted single-process run): computed once for both directions."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    config = write_config(folder / "run.yaml", micro_settings(corpus, token_cache, max_steps=RESUME_STEPS,
                                                              save_every=4, keep_checkpoints=10, val_every=8))
    whole = run_command(_resume_command(config, 1, folder / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    return config, losses(folder / "whole")


@pytest.mark.parametrize("first, then", [(2, 1), (1, 2)], ids=["2-then-1", "1-then-2"])
def test_sigkilled_run_resumes_with_another_process_count(tmp_path, uninterrupted, first, then):
    config, expected = uninterrupted
    out = tmp_path / "killed"
    _kill_after_checkpoint(_resume_command(config, first, out), out, 8)
    killed_at = max(losses(out))
    assert killed_at < RESUME_STEPS, "the kill came too late to test resuming"
    resumed = run_command(_resume_command(config, then, out, "--resume", "--export-dir", str(tmp_path / "export")))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "global batch" not in resumed.stdout
    got = losses(out)
    assert sorted(got) == list(range(1, RESUME_STEPS + 1))
    worst = max(abs(got[s] - expected[s]) / abs(expected[s]) for s in expected)
    print(f"{first} -> {then} processes: max relative loss difference {worst:.2e}")
    for step in range(1, RESUME_STEPS + 1):  # the same global batch: the same math up to the reduction order
        assert got[step] == pytest.approx(expected[step], rel=1e-4), step
    # The resumed run's checkpoint and export are HF models like any other, whatever the layout that wrote them.
    final = JetMoeForCausalLM.from_pretrained(os.path.join(checkpoint_root(out), f"step-{RESUME_STEPS:08d}"))
    exported = JetMoeForCausalLM.from_pretrained(str(tmp_path / "export"))
    assert final.config.num_hidden_layers == MICRO_MODEL["num_hidden_layers"]
    for (name, x), (_, y) in zip(final.state_dict().items(), exported.state_dict().items()):
        assert torch.equal(x, y), name
