"""The benchmark script's cost model (the denominators of its MFU and roofline figures), an end-to-end run of
`benchmarks/bench_model.py --quick`, `benchmarks/gemv_bandwidth.py` on small shapes and `benchmarks/kernels_ab.py` on
the tiny config. No timing is asserted:
timings are the benchmark's business."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import jetmoe

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
sys.path.insert(0, BENCHMARKS)

from cost_model import Geometry  # noqa: E402
from oracle_pair import TINY, WIDE  # noqa: E402

EXPERT_WEIGHTS = ("experts.input_linear", "experts.output_linear", "mlp.input_linear", "mlp.output_linear")


def _model(geometry: dict, **overrides) -> jetmoe.JetMoeForCausalLM:
    return jetmoe.JetMoeForCausalLM(jetmoe.JetMoeConfig(**geometry, **overrides))


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["tiny", "wide"])
def test_total_params_match_the_model(geometry, tied):
    model = _model(geometry, tie_word_embeddings=tied)
    assert Geometry.of(model.config).total_params() == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["tiny", "wide"])
def test_active_matmul_params_count_k_experts_and_every_dense_matmul(geometry):
    """Counted from the model: every 2-D+ weight except the embedding, experts scaled by k/E, plus lm_head."""
    model = _model(geometry, tie_word_embeddings=False)
    config = model.config
    expected = 0.0
    for name, param in model.named_parameters():
        if param.dim() < 2 or "embed_tokens" in name:
            continue  # norms and biases do no matmul; the embedding is a lookup
        share = config.num_experts_per_tok / config.num_local_experts if any(w in name for w in EXPERT_WEIGHTS) else 1
        expected += param.numel() * share
    assert Geometry.of(config).active_matmul_params() == pytest.approx(expected)


@pytest.mark.parametrize("geometry", [TINY, WIDE], ids=["tiny", "wide"])
def test_decode_bytes_at_batch_one_are_the_weights_one_token_reads(geometry):
    """Every parameter, experts scaled by k/E; the (tied) embedding matrix once as lm_head plus one row."""
    model = _model(geometry)
    config = model.config
    params = config.hidden_size  # the embedding row
    for name, param in model.named_parameters():
        share = config.num_experts_per_tok / config.num_local_experts if any(w in name for w in EXPERT_WEIGHTS) else 1
        params += param.numel() * share
    assert Geometry.of(config).decode_weight_bytes(1, 2) == pytest.approx(2 * params)


def test_expected_experts_touched():
    geometry = Geometry.of(jetmoe.JetMoeConfig(**TINY))  # E=4, k=2
    assert geometry.expected_experts_touched(1) == pytest.approx(2)
    assert geometry.expected_experts_touched(2) == pytest.approx(4 * (1 - 0.25))
    assert geometry.expected_experts_touched(1000) == pytest.approx(4)


def test_attention_flops_sum_the_causal_triangle():
    config = jetmoe.JetMoeConfig(**TINY)
    geometry = Geometry.of(config)
    seq_len = 37
    heads = config.num_experts_per_tok * config.num_key_value_heads
    # Position t attends t+1 keys: QK^T and PV each cost 2 * D FLOPs per key and head.
    total = sum(2 * 2 * config.kv_channels * heads * (t + 1) for t in range(seq_len)) * config.num_hidden_layers
    assert geometry.attention_flops_per_token(seq_len) * seq_len == pytest.approx(total)
    assert geometry.train_flops_per_token(seq_len) == pytest.approx(3 * geometry.forward_flops_per_token(seq_len))


def _bench(*args, **kwargs):
    return subprocess.run([sys.executable, os.path.join(BENCHMARKS, "bench_model.py"), *args], capture_output=True,
                          text=True, **kwargs)


def test_unknown_names_are_refused():
    done = _bench("--configs", "small,huge", "--quick")
    assert done.returncode == 2
    assert "huge" in done.stderr


def test_quick_run_end_to_end(tmp_path):
    out = tmp_path / "results.md"
    done = _bench("--quick", "--dtypes", "fp32", "--repeats", "1", "--out", str(out), timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "QUICK CHECK" in text and "--quick" in text
    for measure in ("prefill tok/s", "train tok/s", "decode1 tok/s", "decode8 tok/s", "train peak MiB"):
        rows = [line for line in text.splitlines() if line.startswith(f"| tiny | fp32 | {measure} |")]
        assert len(rows) == 1, measure
        cells = [cell.strip() for cell in rows[0].strip("|").split("|")]
        reference, ours, ratio = float(cells[3]), float(cells[4]), float(cells[5].rstrip("x"))
        assert reference > 0 and ours > 0
        assert ratio == pytest.approx(ours / reference, rel=0.05)  # the table rounds to 3 digits


def _gemv_bandwidth(*args: str) -> subprocess.CompletedProcess:
    script = os.path.join(BENCHMARKS, "gemv_bandwidth.py")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=300)


def test_gemv_bandwidth_runs_on_small_shapes_and_refuses_bad_ones():
    done = _gemv_bandwidth("--rows", "64", "--cols", "64", "--matrices", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    names = [row.split("|")[1].strip() for row in rows]
    assert {"bf16 torch.mv", "fp32 torch.mv", "fp32 F.linear, 8 rows"} <= set(names), names
    from jetmoe.ops import native

    if native.available():
        assert {"fp32 jetmoe.ops.native", "fp32 jetmoe.ops.native, 8 rows", "int8 jetmoe.ops.native"} <= set(names)
    refused = _gemv_bandwidth("--cols", "48")
    assert refused.returncode == 2 and "multiple of 32" in refused.stderr


def test_kernels_ab_swaps_two_builds_in_one_engine():
    from jetmoe.ops import native

    if not native.available():
        pytest.skip("jetmoe's C kernels do not run here")
    sources = os.path.dirname(native.__file__)  # the same sources on both sides: the script's plumbing, not a speed
    script = os.path.join(BENCHMARKS, "kernels_ab.py")
    done = subprocess.run(
        [sys.executable, script, sources, sources, "--config", "tiny", "--rounds", "2", "--steps", "2"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"kernels at {native.level()}" in done.stdout
    assert "ms of it in the layers' C call" in done.stdout and "before / after, median of the rounds" in done.stdout
    missing = subprocess.run([sys.executable, script, "no-such-revision", sources, "--config", "tiny"],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert missing.returncode != 0 and "neither a directory of the kernel sources nor a git revision" in missing.stderr
