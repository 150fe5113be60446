"""Clear errors (NaN loss, sequence too long, batch too big, bad data), `jetmoe eval`, fine-tuning (full and
LoRA), gradient accumulation, activation checkpointing and bf16."""

from __future__ import annotations

import math
import os

import pytest
import torch

from jetmoe import JetMoeForCausalLM
from jetmoe.cli import main as jetmoe_main
from jetmoe.training.checkpoint import checkpoint_root
from jetmoe.training.trainer import train
from train_helpers import losses, micro_config, micro_settings, run_jetmoe, write_config


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory, corpus, token_cache):
    out = tmp_path_factory.mktemp("base")
    summary = train(micro_config(corpus, token_cache, out, max_steps=10))
    return summary["checkpoint"]


def test_nan_loss_is_a_clear_error(tmp_path, corpus, token_cache):
    config = write_config(tmp_path / "run.yaml", micro_settings(corpus, token_cache, out_dir=str(tmp_path / "out"),
                                                                lr=1e30, grad_clip=0.0, warmup_steps=0, max_steps=20))
    result = run_jetmoe("train", "--config", config)
    assert result.returncode == 1
    assert "jetmoe train: error: the loss is nan at step" in result.stderr
    assert "lower lr" in result.stderr and "Traceback" not in result.stderr


def test_sequence_longer_than_the_model_allows(tmp_path, corpus, token_cache):
    with pytest.raises(ValueError, match="seq_len 128 is above the model's max_position_embeddings 64"):
        train(micro_config(corpus, token_cache, tmp_path, seq_len=128))


def test_batch_that_does_not_fit_the_data(tmp_path, corpus, token_cache):
    with pytest.raises(ValueError, match=r"a step needs 4000 sequences .* holds only \d+ sequences"):
        train(micro_config(corpus, token_cache, tmp_path, batch_size=1000, grad_accum=4))


def test_cli_reports_bad_data_without_a_traceback(tmp_path, capsys):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    code = jetmoe_main(["train", "--data", str(bad), "--out-dir", str(tmp_path / "o"), "--cache-dir", str(tmp_path / "c"),
                        "--no-progress"])
    assert code == 2
    assert "jetmoe train: error: data file" in capsys.readouterr().err
    code = jetmoe_main(["train", "--data", str(tmp_path / "absent.txt"), "--out-dir", str(tmp_path / "o")])
    assert code == 2 and "absent.txt' does not exist" in capsys.readouterr().err


def test_eval_prints_perplexity(base_checkpoint, tmp_path, capsys):
    text = tmp_path / "held_out.txt"
    text.write_text("the lazy dog returns a value from the module. " * 20)
    assert jetmoe_main(["eval", "--model", base_checkpoint, "--text", str(text), "--seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("perplexity ")
    value = float(printed.split()[1])
    # Recompute by hand: consecutive 32-token windows, mean cross-entropy over every predicted token.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    model = JetMoeForCausalLM.from_pretrained(base_checkpoint).eval()
    ids = tokenizer(text.read_text(), add_special_tokens=False)["input_ids"]
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids), 32):
            window = torch.tensor([ids[start : start + 32]])
            if window.shape[1] < 2:
                continue
            total += float(model(window, labels=window).loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    assert value == pytest.approx(math.exp(total / count), rel=1e-3)
    assert 1.0 < value < 300.0
    assert jetmoe_main(["eval", "--model", base_checkpoint, "--text", str(tmp_path / "none.txt")]) == 2


def test_full_fine_tuning_starts_from_the_checkpoint(base_checkpoint, tmp_path, corpus, token_cache):
    summary = train(micro_config(corpus, token_cache, tmp_path, init_from=base_checkpoint, max_steps=3, lr=1e-3))
    fresh = losses(tmp_path)
    assert fresh[1] < 5.0  # a fresh micro model starts near ln(300) = 5.7; this one already learned
    assert summary["step"] == 3


def test_lora_fine_tuning(base_checkpoint, tmp_path, corpus, token_cache):
    pytest.importorskip("peft")
    # The default targets: the MoA and MoE expert weights and kv_proj.
    export = tmp_path / "export"
    summary = train(micro_config(corpus, token_cache, tmp_path, init_from=base_checkpoint, lora=True, lora_rank=4,
                                 lr=5e-3, max_steps=6, save_every=3, keep_checkpoints=3, export_dir=str(export)))
    final = summary["checkpoint"]
    assert os.path.exists(os.path.join(final, "adapter", "adapter_model.safetensors"))
    assert os.path.exists(os.path.join(final, "adapter", "adapter_config.json"))
    base = JetMoeForCausalLM.from_pretrained(base_checkpoint)
    merged = JetMoeForCausalLM.from_pretrained(final)  # the merged model loads as a plain checkpoint
    changed = {name for name, p in merged.state_dict().items() if not torch.equal(p, base.state_dict()[name])}
    targets = ("experts.input_linear", "experts.output_linear", "mlp.input_linear", "mlp.output_linear", "kv_proj")
    assert {t for t in targets for name in changed if t in name} == set(targets)  # every target moved
    assert all(any(t in name for t in targets) for name in changed)  # and nothing else

    # The adapter loads in peft on our model, and the merged weights compute what base + adapter computes.
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(JetMoeForCausalLM.from_pretrained(base_checkpoint), os.path.join(final, "adapter"))
    ids = torch.randint(4, 200, (1, 16))
    with torch.no_grad():
        expected = adapted(ids).logits
        assert (expected - base(ids).logits).abs().max() > 1e-3  # the adapter changed the outputs
        torch.testing.assert_close(merged(ids).logits, expected, rtol=1e-4, atol=1e-5)
        # The export is the merged model: transformers' own JetMoeForCausalLM loads it and agrees.
        import transformers

        theirs = transformers.AutoModelForCausalLM.from_pretrained(str(export))
        assert type(theirs).__module__.startswith("transformers.models.jetmoe")
        torch.testing.assert_close(theirs(ids).logits, expected, rtol=1e-4, atol=1e-5)

    # Resuming a LoRA run restores the adapter and continues.
    resumed = train(micro_config(corpus, token_cache, tmp_path, init_from=base_checkpoint, lora=True, lora_rank=4,
                                 lr=5e-3, max_steps=8, save_every=3, keep_checkpoints=3), resume=True)
    assert resumed["step"] == 8 and sorted(losses(tmp_path)) == list(range(1, 9))


def test_grad_accumulation_and_activation_checkpointing_keep_the_losses(tmp_path, corpus, token_cache):
    # The balancing loss is a statistic of each micro-batch (as in the distributed test, the same micro-batches
    # give the same loss); the cross-entropy gradient is the same however the global batch is split.
    one = micro_config(corpus, token_cache, tmp_path / "one", batch_size=4, max_steps=5, aux_loss_coef=0.0)
    split = micro_config(corpus, token_cache, tmp_path / "split", batch_size=2, grad_accum=2, max_steps=5,
                         gradient_checkpointing=True, aux_loss_coef=0.0)
    train(one)
    train(split)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "split")
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5)


def test_bf16_autocast_trains(tmp_path, corpus, token_cache):
    summary = train(micro_config(corpus, token_cache, tmp_path, bf16=True, max_steps=6))
    values = losses(tmp_path)
    assert all(math.isfinite(v) for v in values.values()) and values[6] < values[1]
    state = JetMoeForCausalLM.from_pretrained(summary["checkpoint"]).state_dict()
    assert all(t.dtype == torch.float32 for t in state.values())  # master weights stay fp32


def test_resume_without_checkpoints_is_an_error_unless_told_to_start(tmp_path, corpus, token_cache, capsys):
    from jetmoe.training.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="--resume: there is no checkpoint under .*--resume-or-start"):
        train(micro_config(corpus, token_cache, tmp_path, max_steps=2), resume=True)
    summary = train(micro_config(corpus, token_cache, tmp_path, max_steps=2), resume=True, start_if_none=True)
    assert summary["step"] == 2 and "starting from scratch" in capsys.readouterr().out
    assert os.listdir(checkpoint_root(tmp_path)) == ["step-00000002"]


def test_given_hf_tokenizer_sets_the_vocabulary(tmp_path, corpus, token_cache):
    from jetmoe.assets import TINY_MODEL_DIR

    summary = train(micro_config(corpus, token_cache, tmp_path, tokenizer=TINY_MODEL_DIR, max_steps=2,
                                 **{"model.max_position_embeddings": 64}))
    model = JetMoeForCausalLM.from_pretrained(summary["checkpoint"])
    assert model.config.vocab_size == 2048  # the tokenizer's size, not the micro preset's 300
    assert os.path.exists(os.path.join(summary["checkpoint"], "tokenizer.json"))


def test_chat_fine_tuning_counts_only_assistant_tokens(base_checkpoint, tmp_path, token_cache):
    import json

    from transformers import AutoTokenizer

    from jetmoe.training.metrics import read_metrics
    from jetmoe.training.sources import resolve_source
    from jetmoe.training.tokenizer import encode_conversation

    records = [{"prompt": f"what does function {i} return", "completion": f"it returns value {i}"} for i in range(40)]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    summary = train(micro_config(str(data), token_cache, tmp_path / "out", init_from=base_checkpoint, max_steps=3,
                                 val_fraction=0.0, lr=1e-3))
    assert summary["step"] == 3 and math.isfinite(summary["loss"])
    tokenizer = AutoTokenizer.from_pretrained(base_checkpoint)
    examples = list(resolve_source([str(data)]).examples())
    masks = [encode_conversation(tokenizer, e)[1] for e in examples]
    trained_share = sum(map(sum, masks)) / sum(map(len, masks))
    assert 0.1 < trained_share < 0.7  # the prompts, tags and user turns are left out of the loss
    assert all(r["loss"] > 0 for r in read_metrics(str(tmp_path / "out")) if "loss" in r)


def test_switch_objective_and_coefficients_are_recorded(tmp_path, corpus, token_cache):
    from jetmoe.training.metrics import read_metrics

    summary = train(micro_config(corpus, token_cache, tmp_path, aux_loss_type="switch", aux_loss_coef=0.02,
                                 z_loss_coef=0.001, max_steps=2))
    config = JetMoeForCausalLM.from_pretrained(summary["checkpoint"]).config
    assert (config.router_aux_loss_type, config.aux_loss_coef, config.router_z_loss_coef) == ("switch", 0.02, 0.001)
    last = [r for r in read_metrics(str(tmp_path)) if "loss" in r][-1]
    # The switch loss is per router (1 when balanced, more when not) summed over the 4 routers (2 layers x MoA,
    # MoE), where the reference loss averages them (k = 2 when balanced).
    assert 4.0 <= last["aux"] < 6.0 and last["z_loss"] > 0
    assert last["loss"] == pytest.approx(last["ce"] + 0.02 * last["aux"])
