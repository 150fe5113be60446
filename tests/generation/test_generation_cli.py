"""`jetmoe generate`, `jetmoe chat`, `jetmoe quantize`: in process through jetmoe.cli.main, and once as the
installed console script."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
from toy_checkpoint import load_toy

from jetmoe.cli import main
from jetmoe.generation import Engine, SamplingParams


def greedy_text(toy_dir, tokenizer, prompt, max_tokens):
    engine = Engine(load_toy(toy_dir), tokenizer)
    return engine.generate([prompt], SamplingParams(max_tokens=max_tokens, temperature=0))[0].text


def test_generate_streams_the_greedy_completion(toy_dir, toy_tokenizer, capsys):
    code = main(
        [
            "generate",
            "The Python language",
            "--model",
            str(toy_dir),
            "--dtype",
            "float32",
            "--temperature",
            "0",
            "--max-tokens",
            "12",
        ]
    )
    assert code == 0
    expected = "The Python language" + greedy_text(toy_dir, toy_tokenizer, "The Python language", 12) + "\n"
    assert capsys.readouterr().out == expected


@pytest.mark.parametrize("stream", [True, False])
def test_generate_stats_report_the_tokens_and_memory(toy_dir, toy_tokenizer, capsys, stream):
    args = ["generate", "Hello", "--model", str(toy_dir), "--temperature", "0", "--max-tokens", "5", "--stats"]
    assert main(args + ([] if stream else ["--no-stream"])) == 0
    err = capsys.readouterr().err
    prompt_tokens = len(Engine(load_toy(toy_dir), toy_tokenizer).encode("Hello"))
    assert f"{prompt_tokens} prompt + 5 generated tokens in" in err, err
    assert "tok/s" in err and "tok/s after the first token" in err
    assert "[stats] backend cpu;" in err  # which backend ran
    if sys.platform.startswith("linux"):
        assert "GiB own" in err and "GiB mapped files" in err


def test_generate_several_prompts_as_a_batch(toy_dir, capsys):
    assert main(["generate", "Hello", "A mixture", "--model", str(toy_dir), "--max-tokens", "4", "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hello") and "\nA mixture" in out


def test_chat_reads_turns_from_stdin(toy_dir, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello there\n/reset\nsecond turn\n/exit\nnever read\n"))
    code = main(["chat", "--model", str(toy_dir), "--max-tokens", "6", "--temperature", "0", "--dtype", "float32"])
    assert code == 0
    replies = capsys.readouterr().out.split("\n")
    assert len([r for r in replies if r]) <= 2 and len(replies) == 3  # two replies, each ended by a newline


def test_quantize_then_generate_from_the_int8_checkpoint(toy_dir, tmp_path, capsys):
    assert main(["quantize", "--model", str(toy_dir), "--out", str(tmp_path / "q")]) == 0
    assert (tmp_path / "q" / "quantization.json").is_file()
    assert main(["generate", "Hello", "--model", str(tmp_path / "q"), "--max-tokens", "5", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("Hello")


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/dir"], "not a model directory"),
        (["--top-p", "1.5"], "top_p"),
        (["--max-tokens", "0"], "max_tokens"),
    ],
)
def test_generate_bad_arguments_exit_2_with_a_message(toy_dir, capsys, args, message):
    full = ["generate", "x", "--model", str(toy_dir), *args] if "--model" not in args else ["generate", "x", *args]
    assert main(full) == 2
    assert message in capsys.readouterr().err


def test_console_script(toy_dir):
    script = shutil.which("jetmoe", path=str(__import__("pathlib").Path(sys.executable).parent))
    assert script, "the jetmoe console script is not installed next to this python"
    result = subprocess.run(
        [script, "generate", "Hello world", "--model", str(toy_dir), "--max-tokens", "8", "--seed", "0"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Hello world") and len(result.stdout) > len("Hello world\n")
