"""The serving engines answer every row as ``early_exit_forward`` on that row alone, however rows interleave.

Reference: each text run alone (batch 1, no padding) through ``early_exit_forward``. The
continuous engine mixes rows of many requests in each layer call, pads per call and moves rule
state (PABEE counters, BEEM scores) with its rows; labels and exit layers must be equal and
logits equal up to float noise, for random arrival orders, request sizes, max rows per call,
slot counts and age bounds (in layer calls).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from mmexit_testing import run_interleaved
from serve_helpers import random_texts, tiny_model, tiny_tokenizer

from mmexit.calibration.beem import BEEMCalibration
from mmexit.calibration.pcee import PCEECalibration
from mmexit.calibration.statistics import ExitStatistics
from mmexit.data.examples import TextExample
from mmexit.exits.beem import BEEMRule
from mmexit.exits.confidence import EntropyRule, MaxProbRule
from mmexit.exits.patience import PatienceRule
from mmexit.exits.pcee import PCEERule
from mmexit.inference.encoded_rows import pad_rows
from mmexit.inference.encoder import early_exit_forward
from mmexit.serve.batcher import text_batch_engine
from mmexit.serve.engine import ContinuousEngine, EngineFull, EngineStopped
from mmexit.serve.text_rows import encode_rows

MAX_LENGTH = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_model()
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    texts = random_texts(90, seed=3)
    pairs = [TextExample(t, None, 0) for t in texts[:75]] + [TextExample(a, b, 0) for a, b in
                                                             zip(texts[75:], random_texts(15, seed=4, longest=8))]
    rows = encode_rows(tokenizer, pairs, MAX_LENGTH)
    return model, rows


@pytest.fixture(scope="module")
def calibration_rows(tmp_path_factory):
    """Rows to fit BEEM / PCEE thresholds on: texts that none of the tested rows has."""
    tokenizer = tiny_tokenizer(tmp_path_factory.mktemp("vocab"))
    tested = set(random_texts(90, seed=3))
    texts = [text for text in random_texts(120, seed=5) if text not in tested][:80]
    return encode_rows(tokenizer, [TextExample(t, None, 0) for t in texts], MAX_LENGTH)


def calibrated_rules(model, rows) -> dict:
    """Rules at points where rows leave at several exits; BEEM and PCEE calibrated on other rows.

    Calibration puts thresholds exactly on calibration rows' scores, so the tested rows must be
    different ones: a row sitting on its own threshold flips with float noise (batched vs alone)."""
    batch = pad_rows(rows)
    with torch.inference_mode():
        logits = model.forward_exits(**batch)  # [M, N, C]
    flip = torch.Generator().manual_seed(0)
    labels = logits[-1].argmax(-1) ^ (torch.rand(len(rows), generator=flip) < 0.2).long()
    stats = ExitStatistics.from_logits(logits, labels, model.exit_layers)
    beem = BEEMRule(0.0)
    BEEMCalibration().fit(beem, stats)
    pcee = PCEERule(0.7, num_bins=4, min_bin_count=2)
    PCEECalibration().fit(pcee, stats)
    return {"maxprob": MaxProbRule(0.9), "entropy": EntropyRule(0.3), "patience": PatienceRule(2),
            "beem": beem.with_threshold(0.1), "pcee": pcee}


def alone(model, rule, rows) -> list[tuple[torch.Tensor, int]]:
    out = []
    for row in rows:
        ids, types = row.input_ids[None], None if row.token_type_ids is None else row.token_type_ids[None]
        result = early_exit_forward(model, rule, ids, torch.ones_like(ids), types)
        out.append((result.logits[0].float(), int(result.layers_used[0])))
    return out


@pytest.mark.parametrize("rule_name", ["maxprob", "entropy", "patience", "beem", "pcee"])
def test_continuous_engine_equals_each_row_alone(setup, calibration_rows, rule_name):
    model, rows = setup
    rule = calibrated_rules(model, calibration_rows)[rule_name]
    reference = alone(model, rule, rows)
    layers = [layer for _, layer in reference]
    assert len(set(layers)) >= 2, f"{rule_name}: the test needs rows leaving at different exits, got {layers}"
    rng = random.Random(rule_name)
    mixed = 0
    for trial in range(4):
        max_batch = 16 if trial == 0 else rng.choice([1, 3, 8, 16])
        engine = ContinuousEngine(model, rule, MAX_LENGTH, max_batch=max_batch,
                                  slots=max_batch * rng.choice([1, 2, 4, 8]), max_wait_calls=rng.choice([0, 2, None]),
                                  group_lengths=trial != 1)
        calls: list[tuple[int, int]] = []
        engine.on_call = lambda layer, count: calls.append((layer, count))
        if trial:
            engine.start()
        answers = run_interleaved(engine, rows, rng, started=trial != 0)
        assert engine.stop(drain=True, timeout=10)
        for position, (output, (logits, layer)) in enumerate(zip(answers, reference)):
            assert output.exit_layer == layer, f"{rule_name} trial {trial} row {position}"
            assert int(output.logits.argmax()) == int(logits.argmax())
            torch.testing.assert_close(output.logits.softmax(-1), logits.softmax(-1), atol=1e-5, rtol=0)
            torch.testing.assert_close(output.logits, logits, atol=1e-4, rtol=1e-4)
        assert all(count <= max_batch for _, count in calls)
        mixed += max(count for layer, count in calls if layer > 0) > 5  # rows of several requests shared a call
        assert engine.depth == 0 and engine.core.pool.free_count == engine.slots
    assert mixed >= 1


@pytest.mark.parametrize("family", ["roberta", "mpnet"])
def test_other_families_equal_alone(setup, family):
    """RoBERTa (position ids from the padding) and MPNet (relative position bias per call) pad exactly too."""
    _, rows = setup
    model = tiny_model(family=family)
    rule = MaxProbRule(0.9)
    reference = alone(model, rule, rows)
    engine = ContinuousEngine(model, rule, MAX_LENGTH, max_batch=8, pad_id=1 if family == "roberta" else 0)
    answers = run_interleaved(engine, rows, random.Random(family), started=False)
    engine.stop()
    assert [a.exit_layer for a in answers] == [layer for _, layer in reference]
    for output, (logits, _) in zip(answers, reference):
        torch.testing.assert_close(output.logits, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("full", [False, True])
def test_batch_engines_equal_alone(setup, full):
    model, rows = setup
    rule = PatienceRule(2)
    engine = text_batch_engine(model, rule, MAX_LENGTH, full=full, max_batch=8, max_wait_ms=2.0).start()
    answers = run_interleaved(engine, rows, random.Random(1))
    engine.stop()
    for output, row in zip(answers, rows):
        if full:
            ids = row.input_ids[None]
            expected = model.forward_full(ids, torch.ones_like(ids), row.token_type_ids[None])[0]
            assert output.exit_layer == model.num_layers
        else:
            (expected, layer), = alone(model, rule, [row])
            assert output.exit_layer == layer
        torch.testing.assert_close(output.logits, expected.float(), atol=1e-4, rtol=1e-4)


def test_queue_bound_cancel_drain_and_stop(setup):
    model, rows = setup
    engine = ContinuousEngine(model, MaxProbRule(0.9), MAX_LENGTH, max_batch=4, max_queue=5)
    first = engine.submit(rows[:3])  # not started yet: the rows wait
    with pytest.raises(EngineFull, match="queue full"):
        engine.submit(rows[3:6])
    cancelled = engine.submit(rows[3:5])
    assert engine.depth == 5 and cancelled.cancel()
    engine.start()
    assert len(first.result(timeout=10)) == 3
    assert engine.stop(drain=True, timeout=10)
    assert engine.depth == 0
    with pytest.raises(EngineStopped):
        engine.submit(rows[:1])
    with pytest.raises(ValueError, match="tokens"):
        ContinuousEngine(model, MaxProbRule(0.9), 4).submit(rows[:1])


class FlakyRule(MaxProbRule):
    """Raises on its first decision: the requests in flight fail, the engine keeps serving."""

    calls = 0

    def decide(self, view, state):
        FlakyRule.calls += 1
        if FlakyRule.calls == 1:
            raise RuntimeError("boom")
        return super().decide(view, state)


def test_a_failing_call_fails_its_requests_and_the_engine_goes_on(setup):
    model, rows = setup
    engine = ContinuousEngine(model, FlakyRule(0.9), MAX_LENGTH, max_batch=4).start()
    bad = engine.submit(rows[:2])
    with pytest.raises(RuntimeError, match="boom"):
        bad.result(timeout=10)
    good = engine.submit(rows[2:6]).result(timeout=10)
    assert len(good) == 4 and engine.depth == 0 and engine.core.pool.free_count == engine.slots
    engine.stop()


def test_stop_without_drain_fails_waiting_requests(setup):
    model, rows = setup
    engine = ContinuousEngine(model, MaxProbRule(0.9), MAX_LENGTH, max_batch=2)
    waiting = engine.submit(rows[:4])
    engine.stop(drain=False, timeout=5)
    with pytest.raises(EngineStopped):
        waiting.result(timeout=1)


def test_length_grouping_pads_less_and_answers_the_same(setup):
    """With rows waiting, calls group rows of similar length: fewer padded tokens, identical answers."""
    model, rows = setup
    rule = MaxProbRule(0.9)
    answers, efficiency = {}, {}
    for group in (False, True):
        engine = ContinuousEngine(model, rule, MAX_LENGTH, max_batch=8, group_lengths=group)
        futures = [engine.submit([row]) for row in rows]  # all queued before the start
        engine.start()
        answers[group] = [future.result(timeout=30)[0] for future in futures]
        engine.stop()
        tokens = engine.core.runner.tokens
        efficiency[group] = tokens[0] / tokens[1]
    assert efficiency[True] > efficiency[False] + 0.05, efficiency
    assert [a.exit_layer for a in answers[True]] == [a.exit_layer for a in answers[False]]
    for grouped, fifo in zip(answers[True], answers[False]):
        torch.testing.assert_close(grouped.logits, fifo.logits, atol=1e-4, rtol=1e-4)


def test_load_shedding_by_seconds_of_queued_work(setup):
    """Past ``max_queue_wait`` seconds of work at the measured capacity, submit refuses at once."""
    model, rows = setup
    engine = ContinuousEngine(model, MaxProbRule(0.9), MAX_LENGTH, max_queue=100, max_queue_wait=0.5)
    assert engine.capacity is None
    engine._account(2.0, 20)  # as if 20 rows were answered in 2 busy seconds: 10 rows/s
    assert engine.capacity == pytest.approx(10.0)
    engine.submit(rows[:3])  # 0.3 s of work
    with pytest.raises(EngineFull, match=r"about 0.6 s of work queued \(3 rows at 10 rows/s; limit 0.5 s\)") as full:
        engine.submit(rows[3:6])
    assert full.value.retry_after == 1
    engine.stop(drain=False)
