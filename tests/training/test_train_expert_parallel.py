"""Expert parallelism (`--ep`) with real torchrun processes on gloo (CPU): the same global batch gives the
single-process losses, router statistics and weights; its checkpoints resume in one process and export
a whole model that transformers loads; layouts that cannot be built are clear errors. The dispatch itself is
checked in two forked processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from jetmoe.training.checkpoint import checkpoint_root
from train_helpers import losses, micro_settings, run_command, run_jetmoe, torchrun_command, write_config


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node NPROC -m jetmoe.cli train ARGS` in its own process group (killed whole on a hang)."""
    return run_command(torchrun_command(nproc, "train", *args))


def expert_loads(out_dir) -> dict[int, dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    return {r["step"]: r["expert_load"] for r in records if "expert_load" in r}


def assert_same_run(one, two, steps, first: int = 1) -> None:
    assert sorted(two) == list(range(1, steps + 1))
    for step in range(first, steps + 1):
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_ep2_matches_one_process_and_checkpoints_hold_every_expert(tmp_path, corpus, token_cache):
    steps = 20
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=steps, save_every=10,
                                                                val_every=10))
    # One process: micro-batches of 2, accumulated twice. ep=2: one micro-batch of 2 each, experts split in two.
    single = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "single"), "--grad-accum", "2")
    assert single.returncode == 0, single.stderr
    export = tmp_path / "export"
    run = torchrun(2, "--config", config, "--out-dir", str(tmp_path / "ep"), "--ep", "2", "--export-dir", str(export))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    one, two = losses(tmp_path / "single"), losses(tmp_path / "ep")
    assert_same_run(one, two, steps)
    assert one[steps] < one[1] - 0.5  # and it did learn
    # Routing runs on each token's home process: the per-router expert shares are the single process's.
    loads_one, loads_two = expert_loads(tmp_path / "single"), expert_loads(tmp_path / "ep")
    for step in (1, steps):
        for kind in ("moa", "moe"):
            for a, b in zip(loads_one[step][kind], loads_two[step][kind]):
                assert b == pytest.approx(a, abs=1e-3), (step, kind)

    # The export is a whole model (every expert) that transformers' own JetMoE class loads.
    import torch
    import transformers

    from jetmoe import JetMoeForCausalLM

    ours = JetMoeForCausalLM.from_pretrained(os.path.join(checkpoint_root(tmp_path / "single"), "step-00000020"))
    theirs = transformers.JetMoeForCausalLM.from_pretrained(str(export))
    expected = ours.state_dict()
    got = theirs.state_dict()
    assert set(got) == set(expected)
    assert got["model.layers.0.mlp.input_linear.weight"].shape[0] == ours.config.num_local_experts
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-3, atol=1e-5, msg=name)

    # Its step-10 checkpoint resumes in one process (the sharded expert optimizer state is resharded).
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "ep", resumed)
    shutil.rmtree(os.path.join(checkpoint_root(resumed), "step-00000020"))
    again = run_jetmoe("train", "--config", config, "--out-dir", str(resumed), "--grad-accum", "2", "--resume")
    assert again.returncode == 0, again.stderr
    assert_same_run(two, losses(resumed), steps, first=11)


def test_ep2_inside_dp4_sums_the_expert_gradients_of_both_holders(tmp_path, corpus, token_cache):
    # 4 processes as a 2 x 2 mesh: each expert lives on two processes, whose gradients are summed.
    steps = 8
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=steps, save_every=steps,
                                                                val_every=steps))
    single = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "single"), "--grad-accum", "4")
    assert single.returncode == 0, single.stderr
    run = torchrun(4, "--config", config, "--out-dir", str(tmp_path / "ep"), "--ep", "2")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert_same_run(losses(tmp_path / "single"), losses(tmp_path / "ep"), steps)


def test_ep_that_does_not_divide_the_processes_is_an_error(tmp_path, corpus, token_cache):
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, max_steps=2))
    result = run_jetmoe("train", "--config", config, "--out-dir", str(tmp_path / "out"), "--ep", "2")
    assert result.returncode != 0
    assert "ep 2 does not divide the number of processes 1" in result.stderr, result.stderr[-2000:]


def test_ep_that_does_not_divide_the_experts_is_an_error(tmp_path, corpus, token_cache):
    from jetmoe.training.trainer import train
    from train_helpers import MICRO_MODEL, micro_config

    config = micro_config(corpus, token_cache, tmp_path, max_steps=2, ep=2,
                          model=dict(MICRO_MODEL, num_local_experts=3))
    with pytest.raises(ValueError, match="ep 2 does not divide num_local_experts 3"):
        train(config)


def test_ep_must_be_a_positive_integer(tmp_path, corpus, token_cache):
    from train_helpers import micro_config

    with pytest.raises(ValueError, match="ep must be a positive integer"):
        micro_config(corpus, token_cache, tmp_path, ep=0)


def _dispatch_worker(rank: int, world: int, init_file: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from jetmoe.modeling.experts import ParallelExperts, tokens_to_grouped
    from jetmoe.modeling.routing import make_plan
    from jetmoe.training.expert_parallel import ExpertParallelExperts

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        reference = ParallelExperts(4, 8, 6)
        torch.nn.init.normal_(reference.weight)
        sharded = ExpertParallelExperts(reference, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",)))
        generator = torch.Generator().manual_seed(1 + rank)
        x = torch.randn(6, 8, generator=generator)
        logits = torch.randn(6, 4, generator=generator)
        logits[:, 2:] -= 100  # every token picks experts 0 and 1: process 1 (experts 2, 3) receives no rows
        for tokens, few in ((6, False), (6, False), (2, True)):  # a sorted plan (skewed, then not), a few-token one
            plan = make_plan(logits[:tokens], 2, torch.float32, few_tokens=few)
            logits = torch.randn(6, 4, generator=generator)
            rows = tokens_to_grouped(x[:tokens], plan)
            mine, theirs = rows.clone().requires_grad_(), rows.clone().requires_grad_()
            upstream = torch.randn(rows.shape[0], 6, generator=generator)
            expected, got = reference(theirs, plan), sharded(mine, plan)
            torch.testing.assert_close(got, expected)
            (expected * upstream).sum().backward()
            (got * upstream).sum().backward()
            torch.testing.assert_close(mine.grad, theirs.grad)
            total = reference.weight.grad.clone()
            dist.all_reduce(total)  # the sharded experts' gradients hold every process's rows
            torch.testing.assert_close(sharded.weight.grad.to_local(), total.chunk(world)[rank])
            reference.weight.grad = sharded.weight.grad = None
    finally:
        dist.destroy_process_group()


def test_dispatch_matches_the_unsharded_experts_with_an_idle_process(tmp_path):
    import torch.multiprocessing as mp

    import jetmoe.training.expert_parallel  # noqa: F401  imported once here: forked processes start at once

    mp.start_processes(_dispatch_worker, args=(2, str(tmp_path / "rendezvous")), nprocs=2, join=True,
                       start_method="fork")
