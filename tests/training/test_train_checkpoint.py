"""Checkpoints: HF-format model, atomic writes, a failed write leaves nothing, broken checkpoints are skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import transformers

import jetmoe
from jetmoe.training.checkpoint import check_checkpoint, checkpoint_root, find_latest
from jetmoe.training.trainer import train
from train_helpers import losses, micro_config, micro_settings, run_jetmoe, subprocess_env, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus, token_cache):
    """A 10-step run saving at steps 5 and 10 (keeping both)."""
    out = tmp_path_factory.mktemp("run")
    summary = train(micro_config(corpus, token_cache, out, max_steps=10, save_every=5, keep_checkpoints=5, plots=True))
    return out, summary


def test_layout_and_hf_format(trained):
    out, summary = trained
    folders = sorted(os.listdir(checkpoint_root(out)))
    assert folders == ["step-00000005", "step-00000010"]
    latest = os.path.join(checkpoint_root(out), "step-00000010")
    assert summary["checkpoint"] == latest and check_checkpoint(latest) is None
    for name in ("config.json", "model.safetensors", "tokenizer.json", "manifest.json", "trainer_state.json",
                 "scheduler.json", "rng-rank0.json", "train_config.yaml", "optimizer"):
        assert os.path.exists(os.path.join(latest, name)), name
    state = json.load(open(os.path.join(latest, "trainer_state.json")))
    assert state["step"] == 10 and state["position"] == 10 * 2  # data position: sequences consumed

    ours = jetmoe.JetMoeForCausalLM.from_pretrained(latest)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(latest)  # transformers' own JetMoe loads it too
    assert type(theirs).__module__.startswith("transformers.models.jetmoe")
    tokenizer = transformers.AutoTokenizer.from_pretrained(latest)
    ids = tokenizer("the lazy dog returns a value", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, rtol=1e-5, atol=1e-5)


def test_metrics_and_plots(trained):
    out, _ = trained
    from jetmoe.training.metrics import read_metrics

    records = read_metrics(str(out))
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 11))
    for key in ("loss", "ce", "aux", "z_loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert key in steps[-1]
    load = steps[-1]["expert_load"]
    assert len(load["moa"]) == len(load["moe"]) == 2  # one row per layer, MoA and MoE
    for row in load["moa"] + load["moe"]:
        assert len(row) == 4 and sum(row) == pytest.approx(1.0, abs=1e-3)
    val = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in val] == [10] and val[0]["val_ppl"] == pytest.approx(2.718281828 ** val[0]["val_loss"])
    assert os.path.getsize(out / "loss.png") > 1000 and os.path.getsize(out / "expert_load.png") > 1000


def test_corrupt_or_incomplete_latest_falls_back(trained, tmp_path):
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    root = checkpoint_root(copy)
    with open(os.path.join(root, "step-00000010", "model.safetensors"), "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00garbage\x00")
    os.makedirs(os.path.join(root, ".tmp-step-00000015"))  # an interrupted write
    messages = []
    found = find_latest(str(copy), log=messages.append)
    assert found is not None and found.step == 5
    text = "\n".join(messages)
    assert "step-00000010 is unusable, file model.safetensors does not match its checksum" in text
    assert "falling back to the previous checkpoint" in text and ".tmp-step-00000015" in text

    os.remove(os.path.join(root, "step-00000005", "manifest.json"))  # now none is usable
    messages.clear()
    assert find_latest(str(copy), log=messages.append) is None
    assert any("incomplete: it has no manifest.json" in m for m in messages)


def test_resume_falls_back_through_the_cli(trained, tmp_path, corpus, token_cache):
    """`jetmoe train --resume` with a truncated latest checkpoint says so and resumes from the previous one."""
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with open(os.path.join(checkpoint_root(copy), "step-00000010", "model.safetensors"), "r+b") as handle:
        handle.truncate(64)
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, out_dir=str(copy), max_steps=10,
                                                                save_every=5, keep_checkpoints=5))
    result = subprocess.run([sys.executable, "-m", "jetmoe.cli", "train", "--config", config, "--resume"],
                            env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr
    assert "step-00000010 is unusable, file model.safetensors has 64 bytes" in result.stdout
    assert "resuming from" in result.stdout and "step-00000005" in result.stdout
    assert check_checkpoint(os.path.join(checkpoint_root(copy), "step-00000010")) is None  # rewritten


FULL_DISK = r"""
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # past the limit, writes fail with EFBIG instead of killing us
resource.setrlimit(resource.RLIMIT_FSIZE, (30_000, 30_000))
from jetmoe.cli import main
sys.exit(main(["train", "--config", sys.argv[1]]))
"""


def test_failed_checkpoint_write_leaves_nothing_half_written(tmp_path, corpus, token_cache):
    """A real write failure (a file-size limit makes the OS refuse the model file) gives a clear error."""
    train(micro_config(corpus, token_cache, tmp_path / "warm", max_steps=1))  # token cache built without the limit
    out = tmp_path / "run"
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, out_dir=str(out), max_steps=3,
                                                                save_every=3))
    result = subprocess.run([sys.executable, "-c", FULL_DISK, config], env=subprocess_env(), capture_output=True,
                            text=True, timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "could not write the checkpoint of step 3" in result.stderr
    assert "The partial checkpoint was removed; earlier checkpoints are intact" in result.stderr
    assert "Traceback" not in result.stderr
    assert os.listdir(checkpoint_root(out)) == []
    assert find_latest(str(out), log=lambda _: None) is None


# ------------------------------------------------------------------ damaged checkpoints (the manifest and the files)

class RunsCode:
    """Unpickling this writes a marker file: resuming must never unpickle what lies in the output folder."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _refresh_manifest(folder) -> None:
    """Give the manifest the damaged files' digests, as someone editing a checkpoint by hand would."""
    from jetmoe.training.checkpoint import _manifest

    with open(os.path.join(folder, "manifest.json"), "w") as handle:
        json.dump(_manifest(str(folder)), handle)


def _write(folder, name, data: bytes, refresh: bool = True) -> None:
    with open(os.path.join(folder, name), "wb") as handle:
        handle.write(data)
    if refresh:
        _refresh_manifest(folder)


def _truncate(folder, name, size: int, refresh: bool) -> None:
    with open(os.path.join(folder, name), "r+b") as handle:
        handle.truncate(size)
    if refresh:
        _refresh_manifest(folder)


DAMAGES = {
    "manifest-not-utf8": (lambda f, m: _write(f, "manifest.json", b'{"model.safetensors\x84": 1}', refresh=False),
                          "manifest.json is not UTF-8 text"),
    "manifest-a-list": (lambda f, m: _write(f, "manifest.json", b"[]", refresh=False),
                        "corrupt manifest.json (a JSON list, not an object of files)"),
    "manifest-entry-a-number": (lambda f, m: _write(f, "manifest.json", b'{"model.safetensors": 5}', refresh=False),
                                "the entry of 'model.safetensors' is not"),
    "manifest-empty-and-weights-truncated": (
        lambda f, m: (_truncate(f, "model.safetensors", 64, refresh=False), _write(f, "manifest.json", b"{}", False)),
        "manifest.json does not list"),
    "file-missing-from-the-manifest": (
        lambda f, m: (os.remove(os.path.join(f, "scheduler.json")), _refresh_manifest(f)),
        "file scheduler.json is missing (the manifest does not list it)"),
    "weights-truncated-digest-updated": (lambda f, m: _truncate(f, "model.safetensors", 1000, refresh=True),
                                         "file model.safetensors is not a valid safetensors file"),
    "scheduler-garbage-digest-updated": (lambda f, m: _write(f, "scheduler.json", b"\x80\x04garbage"),
                                         "scheduler.json is not UTF-8 text"),
    "scheduler-a-pickle": (lambda f, m: _write(f, "scheduler.json", _pickled(m)), "scheduler.json is not UTF-8 text"),
    "rng-a-pickle": (lambda f, m: _write(f, "rng-rank0.json", _pickled(m)), "rng-rank0.json is not UTF-8 text"),
    "legacy-scheduler-pickle-runs-code": (
        lambda f, m: (os.remove(os.path.join(f, "scheduler.json")), _write(f, "scheduler.pt", _pickled(m))),
        "scheduler.pt does not load as plain data (UnpicklingError"),
    "rng-wrong-states": (lambda f, m: _write(f, "rng-rank0.json", b'{"torch": "AAAA", "numpy": [], "python": []}'),
                         "rng-rank0.json does not hold valid RNG states"),
    "trainer-state-of-another-step": (
        lambda f, m: _write(f, "trainer_state.json", json.dumps({"step": 7, "position": 14}).encode()),
        "trainer_state.json says step 7, the folder is step 10"),
}


def _pickled(marker) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"state": RunsCode(marker)}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_checkpoint_is_skipped_with_the_reason(trained, tmp_path, damage):
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    folder = os.path.join(checkpoint_root(copy), "step-00000010")
    marker = tmp_path / "unpickled"
    apply, reason = DAMAGES[damage]
    apply(folder, marker)
    assert reason in check_checkpoint(folder)
    messages = []
    found = find_latest(str(copy), log=messages.append)
    assert found is not None and found.step == 5
    assert reason in "\n".join(messages) and "falling back to the previous checkpoint" in "\n".join(messages)
    assert not marker.exists()


def test_checkpoint_that_fails_to_load_falls_back_and_resumes_exactly(trained, tmp_path, corpus, token_cache, capsys):
    """A checkpoint whose files all check out but whose optimizer state does not load is skipped at load time;
    the run resumes from the previous one, reproduces the original losses and keeps the skipped folder."""
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    folder = os.path.join(checkpoint_root(copy), "step-00000010")
    shard = next(name for name in os.listdir(os.path.join(folder, "optimizer")) if name.endswith(".distcp"))
    _truncate(folder, os.path.join("optimizer", shard), 100, refresh=True)
    assert check_checkpoint(folder) is None  # only loading finds this damage
    capsys.readouterr()
    config = micro_config(corpus, token_cache, copy, max_steps=10, save_every=5, keep_checkpoints=5)
    summary = train(config, resume=True)
    printed = capsys.readouterr().out
    assert "step-00000010 is unusable, optimizer/ does not load" in printed
    assert f"resuming from {os.path.join(checkpoint_root(copy), 'step-00000005')}" in printed
    assert summary["step"] == 10
    expected, got = losses(out), losses(copy)
    for step in range(6, 11):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
    assert sorted(os.listdir(checkpoint_root(copy))) == ["step-00000005", "step-00000010", "step-00000010.replaced"]


def test_resume_with_every_checkpoint_damaged(trained, tmp_path, corpus, token_cache):
    """--resume stops with an error listing what it found and deletes nothing; --resume-or-start starts from
    scratch and moves the damaged checkpoints aside instead of replacing them."""
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    root = checkpoint_root(copy)
    DAMAGES["manifest-not-utf8"][0](os.path.join(root, "step-00000005"), None)
    DAMAGES["scheduler-garbage-digest-updated"][0](os.path.join(root, "step-00000010"), None)
    before = {name: sorted(os.listdir(os.path.join(root, name))) for name in os.listdir(root)}
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, out_dir=str(copy), max_steps=10,
                                                                save_every=5, keep_checkpoints=1))
    result = run_jetmoe("train", "--config", config, "--resume")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "--resume found no usable checkpoint under" in result.stderr
    assert "step-00000010 (scheduler.json is not UTF-8 text" in result.stderr
    assert "step-00000005 (manifest.json is not UTF-8 text" in result.stderr
    assert "--resume-or-start" in result.stderr
    assert {name: sorted(os.listdir(os.path.join(root, name))) for name in os.listdir(root)} == before

    result = run_jetmoe("train", "--config", config, "--resume-or-start")
    assert result.returncode == 0, result.stderr
    assert "starting from scratch" in result.stdout
    assert sorted(os.listdir(root)) == ["step-00000005.replaced", "step-00000010", "step-00000010.replaced"]
    assert check_checkpoint(os.path.join(root, "step-00000010")) is None
    for name in ("step-00000005.replaced", "step-00000010.replaced"):  # kept whole, as they were
        assert sorted(os.listdir(os.path.join(root, name))) == before[name.removesuffix(".replaced")]


def _to_legacy_format(folder) -> None:
    """Rewrite a checkpoint's scheduler and RNG states as jetmoe 0.1.0 wrote them: torch.save pickles."""
    import base64

    import numpy as np

    scheduler = json.load(open(os.path.join(folder, "scheduler.json")))
    rng = json.load(open(os.path.join(folder, "rng-rank0.json")))
    kind, key, pos, has_gauss, cached = rng["numpy"]
    version, internal, gauss_next = rng["python"]
    legacy_rng = {"torch": torch.frombuffer(bytearray(base64.b64decode(rng["torch"])), dtype=torch.uint8),
                  "numpy": (kind, np.array(key, dtype=np.uint32), pos, has_gauss, cached),
                  "python": (version, tuple(internal), gauss_next)}
    torch.save(scheduler, os.path.join(folder, "scheduler.pt"))
    torch.save(legacy_rng, os.path.join(folder, "rng-rank0.pt"))
    os.remove(os.path.join(folder, "scheduler.json"))
    os.remove(os.path.join(folder, "rng-rank0.json"))
    _refresh_manifest(folder)


def test_checkpoint_of_the_pickle_format_resumes_exactly(trained, tmp_path, corpus, token_cache):
    """Checkpoints written before the JSON states (scheduler.pt, rng-rank0.pt) load with weights_only=True."""
    import shutil

    out, _ = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shutil.rmtree(os.path.join(checkpoint_root(copy), "step-00000010"))
    folder = os.path.join(checkpoint_root(copy), "step-00000005")
    _to_legacy_format(folder)
    assert check_checkpoint(folder) is None
    train(micro_config(corpus, token_cache, copy, max_steps=10, save_every=5, keep_checkpoints=5), resume=True)
    expected, got = losses(out), losses(copy)
    for step in range(6, 11):
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
