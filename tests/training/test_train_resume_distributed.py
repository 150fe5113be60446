"""Real processes: a `jetmoe train` killed with SIGKILL and resumed matches an uninterrupted run exactly; a
`torchrun --nproc_per_node 2` FSDP2 run (gloo, CPU) matches one process with the same global batch."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from jetmoe.training.checkpoint import checkpoint_root
from train_helpers import (jetmoe_command, losses, micro_settings, run_command, run_jetmoe, subprocess_env,
                           torchrun_command, write_config)


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, corpus, token_cache):
    steps = 30
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=steps, save_every=5,
                                                                keep_checkpoints=10, val_every=10))
    whole = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr

    out = tmp_path / "killed"
    command = jetmoe_command("train", "--config", config, "--out-dir", str(out))
    process = subprocess.Popen(command, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    marker = os.path.join(checkpoint_root(out), "step-00000010")
    deadline = time.monotonic() + 200
    while not os.path.isdir(marker):  # complete checkpoints appear by rename, all at once
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    killed_at = max(losses(out))
    assert killed_at < steps, "the kill came too late to test resuming"

    resumed = run_jetmoe("train", "--config", config, "--out-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout
    expected, got = losses(tmp_path / "whole"), losses(out)
    assert sorted(got) == list(range(1, steps + 1))  # steps logged after the checkpoint by the killed run were redone
    for step in range(1, steps + 1):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step


def torchrun_train(*args: str) -> str:
    """`torchrun --nproc_per_node 2 -m jetmoe.cli train ARGS`; returns its stdout."""
    result = run_command(torchrun_command(2, "train", *args))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_torchrun_fsdp2_matches_one_process(tmp_path, corpus, token_cache):
    steps = 20
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=steps, save_every=steps,
                                                                val_every=10))
    # One process: micro-batches of 2, accumulated twice. Two processes: one micro-batch of 2 each.
    single = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "single"), "--grad-accum", "2")
    assert single.returncode == 0, single.stderr
    stdout = torchrun_train("--config", config, "--out-dir", str(tmp_path / "fsdp"))
    assert stdout.count('"step": 20') == 1 and stdout.count("validation loss") == 2  # printed by rank 0 only
    one, two = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(one) == sorted(two) == list(range(1, steps + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    assert one[steps] < one[1] - 0.5  # and it did learn

    # The FSDP2 checkpoint is a plain HF model, identical to the single-process one up to float rounding.
    import torch

    from jetmoe import JetMoeForCausalLM

    a = JetMoeForCausalLM.from_pretrained(os.path.join(checkpoint_root(tmp_path / "single"), "step-00000020"))
    b = JetMoeForCausalLM.from_pretrained(os.path.join(checkpoint_root(tmp_path / "fsdp"), "step-00000020"))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(x, y, rtol=1e-3, atol=1e-5, msg=name)


def test_torchrun_fsdp2_lora_matches_one_process(tmp_path, corpus, token_cache):
    pytest.importorskip("peft")
    from jetmoe.training.trainer import train
    from train_helpers import micro_config

    base = train(micro_config(corpus, token_cache, tmp_path / "base", max_steps=3))["checkpoint"]
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=6, save_every=6,
                                                                init_from=base, lora=True, lr=0.005))
    single = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "single"), "--grad-accum", "2")
    assert single.returncode == 0, single.stderr
    torchrun_train("--config", config, "--out-dir", str(tmp_path / "fsdp"))
    one, two = losses(tmp_path / "single"), losses(tmp_path / "fsdp")
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    # The expert adapters (peft's parametrization of the FSDP2-sharded [E, out, in] weights) trained as in one process.
    import torch
    from safetensors.torch import load_file

    adapters = [load_file(os.path.join(checkpoint_root(tmp_path / run), "step-00000006", "adapter",
                                       "adapter_model.safetensors")) for run in ("single", "fsdp")]
    expert_b = [name for name in adapters[0] if "mlp.input_linear.lora_B" in name or "experts.output_linear.lora_B" in name]
    assert len(expert_b) == 4 and all(adapters[1][name].abs().max() > 0 for name in expert_b)  # B starts at zero
    for name, tensor in adapters[0].items():
        torch.testing.assert_close(adapters[1][name], tensor, rtol=1e-3, atol=1e-5, msg=name)
