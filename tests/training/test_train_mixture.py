"""Data mixtures: weighted sources, phase schedules, validation of the weights, determinism, resuming, and
independence from the number of processes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jetmoe.training.config import build_config
from jetmoe.training.data import PackedSequences, build_token_file, step_positions
from jetmoe.training.mixture import MixedSequences, Phase, parse_mixture
from jetmoe.training.sources import resolve_source
from jetmoe.training.tokenizer import train_bpe
from train_helpers import losses, micro_config


@pytest.fixture(scope="module")
def code_jsonl(tmp_path_factory) -> str:
    """A second source in another format (JSONL), with text unlike the corpus's (digits only)."""
    path = tmp_path_factory.mktemp("code") / "code.jsonl"
    rng = np.random.default_rng(1)
    with open(path, "w") as handle:
        for _ in range(300):
            handle.write(json.dumps({"text": " ".join(str(d) for d in rng.integers(0, 10, 12))}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def parts(tmp_path_factory, corpus, code_jsonl):
    tokenizer = train_bpe(resolve_source([corpus]).texts(), 300)
    cache = str(tmp_path_factory.mktemp("cache"))
    files = [build_token_file(resolve_source([p]), tokenizer, cache, log=lambda _: None) for p in (corpus, code_jsonl)]
    return [PackedSequences(f, 16, val_fraction=0.1, seed=0) for f in files]


def mixed(parts, phases, global_batch=4, seed=0):
    return MixedSequences(parts, ["web", "code"], phases, global_batch, seed)


def test_weights_and_phases_set_the_realised_mixture(parts):
    # 0.7 / 0.3 for steps 0-2499, then 0.2 / 0.8: 4 sequences per step.
    data = mixed(parts, [Phase(0, (0.7, 0.3)), Phase(2500, (1.0, 4.0))])
    first = data.counts(10_000)
    second = data.counts(20_000) - first
    assert first.sum() == second.sum() == 10_000
    assert abs(first[0] / 10_000 - 0.7) < 0.015 and abs(second[0] / 10_000 - 0.2) < 0.015
    # The sequences come from the source the position drew: 'code' sequences are the digit tokens.
    source, index = data.locate(12_345)
    ids, _ = data.train_batch(12_345, 1)
    assert ids[0].tolist() == parts[source].sequence(index)[0].tolist()
    # Every draw of a source takes the next sequence of that source's own order (no repeats within an epoch).
    taken = [data.locate(p) for p in range(400)]
    for s in (0, 1):
        mine = [i for src, i in taken if src == s][: parts[s].num_train]
        assert len(set(mine)) == len(mine)


def test_same_seed_same_batches_and_a_fresh_reader_agrees_at_any_position(parts):
    phases = [Phase(0, (0.5, 0.5)), Phase(100, (0.9, 0.1))]
    walked = mixed(parts, phases)
    for position in range(0, 5000, 4):
        walked.train_batch(position, 4)
    # A resumed run's reader starts at its position, with no history: the same batches.
    for position in (0, 403, 4096, 4999, 9000):
        fresh = mixed(parts, phases)
        for a, b in zip(fresh.train_batch(position, 4), walked.train_batch(position, 4)):
            assert a.tolist() == b.tolist()
    other = mixed(parts, phases, seed=1)
    assert [other.locate(p)[0] for p in range(64)] != [walked.locate(p)[0] for p in range(64)]


def test_batches_do_not_depend_on_the_number_of_processes(parts):
    data = mixed(parts, [Phase(0, (0.6, 0.4)), Phase(3, (0.1, 0.9))], global_batch=4)
    for step in range(6):  # one process x 2 micro-batches of 2, and two processes x 1 micro-batch of 2
        one = [data.train_batch(step_positions(step, 2, 2, 1, 0, m), 2)[0] for m in range(2)]
        two = [data.train_batch(step_positions(step, 2, 1, 2, r, 0), 2)[0] for r in range(2)]
        assert [t.tolist() for t in one] == [t.tolist() for t in two]


def test_validation_measures_every_source(parts):
    data = mixed(parts, [Phase(0, (0.5, 0.5))])
    batches = list(data.val_batches(batch_size=4, max_batches=2))
    assert len(batches) == 2 and len(data.val_ids) == len(parts[0].val_ids) + len(parts[1].val_ids)
    assert set(data.val_ids[:8, 0].tolist()) == {0, 1}


@pytest.mark.parametrize("data, phases, pattern", [
    (["a.txt:0.7", "b.txt"], [], r"give every source a weight .*\['b.txt'\] have none"),
    (["a.txt:0", "b.txt:1"], [], "the weight of 'a.txt' must be a positive number, got 0.0"),
    (["a.txt:-1", "b.txt:1"], [], "the weight of 'a.txt' must be a positive number"),
    (["a.txt:1", "b.txt:1"], ["10:a.txt=1,c.txt=1"], r"\['c.txt'\] is not among the data sources \['a.txt', 'b.txt'\]"),
    (["a.txt:1", "b.txt:1"], ["10:a.txt=1"], r"give every data source a weight .*\['b.txt'\]"),
    (["a.txt:1", "b.txt:1"], ["10:a.txt=0,b.txt=0"], "weights must be >= 0, and not all 0"),
    (["a.txt:1", "b.txt:1"], ["10:a.txt=1,b.txt=1", "5:a.txt=1,b.txt=1"], "step 5 must come after step 10"),
    (["a.txt:1", "b.txt:1"], ["ten:a.txt=1,b.txt=1"], "the step must be an integer"),
    (["a.txt", "b.txt"], ["10:a.txt=1,b.txt=1"], r"give every source a weight"),
])
def test_bad_weights_and_phases_are_named(data, phases, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_config("tiny", None, {"data": data, "data_phases": phases})


def test_mixture_syntax_forms():
    assert parse_mixture(["a", "b"], []) is None  # plain data: one source, as before
    text = parse_mixture(["web/:0.7", "code.jsonl:0.3"], ["100:web/=0.5,code.jsonl=0.5"])
    mapping = parse_mixture([{"web/": 0.7}, {"code.jsonl": 0.3}], [{"step": 100, "weights": {"web/": 0.5, "code.jsonl": 0.5}}])
    assert text == mapping == (["web/", "code.jsonl"], [Phase(0, (0.7, 0.3)), Phase(100, (0.5, 0.5))])


def test_a_missing_source_is_named(tmp_path, corpus, token_cache):
    with pytest.raises(FileNotFoundError, match="data path 'nowhere/' does not exist"):
        from jetmoe.training.trainer import train

        train(micro_config(corpus, token_cache, tmp_path, data=[f"{corpus}:1", "nowhere/:1"]))


def test_mixture_run_resumes_exactly_and_logs_the_mixture(tmp_path, corpus, code_jsonl, token_cache, capsys):
    from jetmoe.training.metrics import read_metrics
    from jetmoe.training.trainer import train

    settings = dict(data=[f"{corpus}:0.7", f"{code_jsonl}:0.3"], data_phases=[f"4:{corpus}=0.1,{code_jsonl}=0.9"],
                    schedule="constant", warmup_steps=0, max_steps=8, save_every=3, val_every=4)
    whole = train(micro_config(corpus, token_cache, tmp_path / "whole", **settings))
    printed = capsys.readouterr().out
    assert f"data mixture from step 4: {corpus} 0.1, {code_jsonl} 0.9" in printed
    assert f"step 3: data mixture now {corpus} 0.1" in printed
    records = [r for r in read_metrics(str(tmp_path / "whole")) if "mixture" in r]
    assert len(records) == 8 and all(sum(r["mixture"].values()) == pytest.approx(1.0) for r in records)
    assert set(whole["mixture"]) == {corpus, code_jsonl}

    train(micro_config(corpus, token_cache, tmp_path / "split", **{**settings, "max_steps": 3}))
    resumed = train(micro_config(corpus, token_cache, tmp_path / "split", **settings), resume=True)
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert sorted(got) == list(range(1, 9)) and resumed["mixture"] != whole["mixture"]  # steps 4-8 only
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=0, abs=1e-6), step
