"""Model directories that cannot be loaded: a one-line error naming the file and the problem, through the real
`jetmoe generate` (a subprocess) and the Python `load()` API."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from jetmoe.generation.loading import ModelLoadError, load


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def truncated_weights(folder, marker):
    with open(folder / "model.safetensors", "r+b") as handle:
        handle.truncate(os.path.getsize(folder / "model.safetensors") // 2)
    return folder / "model.safetensors", "not a valid safetensors file"


def llama_config(folder, marker):
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "llama"
    (folder / "config.json").write_text(json.dumps(config))
    return folder / "config.json", "model_type is 'llama', not 'jetmoe'"


def code_running_pickle(folder, marker):
    os.remove(folder / "model.safetensors")
    torch.save({"model.embed_tokens.weight": RunsCode(marker)}, folder / "pytorch_model.bin")
    return folder / "pytorch_model.bin", "refused: the pickle holds more than tensors"


DAMAGES = {f.__name__: f for f in (truncated_weights, llama_config, code_running_pickle)}


@pytest.fixture(params=sorted(DAMAGES))
def damaged(request, toy_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(toy_dir, folder)
    marker = tmp_path / "unpickled"
    path, problem = DAMAGES[request.param](folder, marker)
    return folder, marker, f"{path}: {problem}"


def generate(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "jetmoe.cli", "generate", "Hello", "--max-tokens", "4", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_cli_refuses_with_one_line_naming_the_file(damaged):
    folder, marker, message = damaged
    result = generate("--model", str(folder))
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr  # one line, no traceback
    assert result.stderr.startswith("jetmoe generate: error: ") and message in result.stderr
    assert not marker.exists()


def test_load_api_raises_the_same_error(damaged):
    folder, marker, message = damaged
    with pytest.raises(ModelLoadError) as raised:
        load(folder, dtype="float32")
    assert message in str(raised.value) and "\n" not in str(raised.value)
    assert not marker.exists()


def test_force_model_type_loads_a_jetmoe_model_under_another_name(toy_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(toy_dir, folder)
    llama_config(folder, None)
    model, _, _ = load(folder, dtype="float32", force_model_type=True)
    assert type(model).__name__ == "JetMoeForCausalLM"
    result = generate("--model", str(folder), "--force-model-type", "--seed", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello") and len(result.stdout) > len("Hello\n")
