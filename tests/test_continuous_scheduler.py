"""The continuous-batching scheduler (``mmexit.inference.scheduler``), slot pool and core on fake rows:
scores, the age bound in layer calls, admission before layer-0 calls, same-layer filling, max_call."""

from __future__ import annotations

import random

import pytest
import torch

from mmexit.inference.continuous_core import ContinuousCore
from mmexit.inference.scheduler import Outcome, Scheduler, SchedulerSettings
from mmexit.inference.slot_pool import SlotPool, SlotTensors


@pytest.mark.parametrize("catch_up, expected", [(0.0, 2), (1.0, 1)])
def test_scores(catch_up, expected):
    """Score = waiting rows x layer weight (+ catch_up x rows one layer deeper): with 2 rows at layer 1
    and 3 at layer 2 of 4, depth_bias 1, layer 2 scores 3 x 5/3 = 5; layer 1 scores 2 x 4/3 = 2.67
    alone, 5.67 with the 3 rows it would join."""
    scheduler = Scheduler(4, SchedulerSettings(depth_bias=1.0, catch_up=catch_up))
    scheduler.add(1, [0, 1])
    scheduler.add(2, [2, 3, 4])
    assert scheduler.pick() == expected


def test_restart_weight_and_age_bound_in_calls():
    """The layer-0 queue counts at restart_weight (4 x 0.5 = 2 < 3 rows at layer 1); past max_wait
    calls the oldest queue runs whatever the scores (the deeper of two equally old ones)."""
    scheduler = Scheduler(4, SchedulerSettings(max_wait=5, depth_bias=0.0, catch_up=0.0, restart_weight=0.5))
    scheduler.add(0, [0, 1, 2, 3])
    scheduler.add(1, [4, 5, 6])
    assert scheduler.pick() == 1
    scheduler.calls += 6  # both queues waited 6 > 5 calls
    scheduler.add(3, [7, 8, 9, 10, 11, 12, 13, 14])
    assert scheduler.pick() == 1
    with pytest.raises(ValueError, match="restart_weight"):
        SchedulerSettings(restart_weight=0.0)
    with pytest.raises(ValueError, match="max_call"):
        SchedulerSettings(max_call=0)


def test_admissible_rows_count_at_layer_0_and_are_admitted_before_its_call():
    scheduler = Scheduler(3, SchedulerSettings(max_call=4, restart_weight=1.0, catch_up=0.0, depth_bias=0.0))
    scheduler.add(2, [0, 1])
    assert scheduler.pick(admissible=0) == 2 and scheduler.pick(admissible=3) == 0
    asked = []
    batch = scheduler.schedule(3, lambda count: asked.append(count) or [5, 6, 7][:count])
    assert asked == [3] and batch.layer == 0 and batch.rows == [5, 6, 7]
    assert scheduler.schedule(0, None).rows == [0, 1]
    assert scheduler.schedule() is None


def test_max_call_takes_the_oldest_and_the_rest_waits_at_the_front():
    scheduler = Scheduler(2, SchedulerSettings(max_call=3))
    scheduler.add(1, [4, 5])
    scheduler.calls += 1
    scheduler.add(1, [6, 7])
    assert scheduler.take(1) == [4, 5, 6]
    assert list(scheduler.queues[1]) == [7] and scheduler.entered == {7: 1}


def test_choose_picks_rows_but_keeps_the_oldest():
    scheduler = Scheduler(2, SchedulerSettings(max_call=2), choose=lambda queue, count: queue[:1] + queue[-1:])
    scheduler.add(0, [3, 1, 2, 0])
    assert scheduler.take(0) == [3, 0] and list(scheduler.queues[0]) == [1, 2]
    bad = Scheduler(2, SchedulerSettings(max_call=2), choose=lambda queue, count: queue[1:1 + count])
    bad.add(0, [3, 1, 2])
    with pytest.raises(RuntimeError, match="oldest"):
        bad.take(0)


def test_update_counts_calls_and_requeues():
    scheduler = Scheduler(3)
    scheduler.update(Outcome(0, ran=2, next=[0], restart=[1], finished=[(2, "done")]))
    assert scheduler.calls == 1 and list(scheduler.queues[1]) == [0] and list(scheduler.queues[0]) == [1]
    scheduler.update(Outcome(1))  # every row was dropped: no call
    assert scheduler.calls == 1
    assert sorted(scheduler.clear()) == [0, 1] and not scheduler.busy


def test_slot_pool_and_slot_tensors():
    pool = SlotPool(3)
    assert pool.take(["a", "b"]) == [0, 1] and pool.in_flight == 2 and pool.free_count == 1
    assert pool.release(0) == "a" and pool.take(["c"]) == [0] and pool.taken() == [0, 1]
    with pytest.raises(RuntimeError):
        pool.take(["d", "e"])
    states = SlotTensors(3)
    states.write([2, 0], torch.tensor([2, 0]), {"count": torch.tensor([5, 7]), "seen": torch.zeros(2, 0)})
    states.write([1], torch.tensor([1]), {"count": torch.tensor([1]), "seen": torch.ones(1, 4)})  # grown state
    read = states.read([0, 2], torch.tensor([0, 2]))
    assert read["count"].tolist() == [7, 5] and read["seen"].shape == (2, 0)
    assert states.read([1], torch.tensor([1]))["seen"].tolist() == [[1.0] * 4]


class FakeRunner:
    """Rows are (name, exit layer, restarts): a row leaves after its exit layer; with restarts it re-enters
    layer 0 that many times first (a caption's next tokens). Records every call."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.rows: dict[int, list] = {}
        self.calls: list[tuple[int, list[str]]] = []
        self.released: list[int] = []

    def accept(self, items):
        return [list(item) for item in items]

    def admit(self, slots, items, upcoming):
        for slot, item in zip(slots, items):
            self.rows[slot] = item

    def run(self, layer, rows):
        self.calls.append((layer, [self.rows[slot][0] for slot in rows]))
        outcome = Outcome(layer, ran=len(rows))
        for slot in rows:
            name, exit_layer, restarts = self.rows[slot]
            if layer + 1 < exit_layer:
                outcome.next.append(slot)
            elif restarts:
                self.rows[slot][2] -= 1
                outcome.restart.append(slot)
            else:
                outcome.finished.append((slot, (name, layer + 1)))
        return outcome

    def release(self, slot):
        self.released.append(slot)


@pytest.mark.parametrize("max_call", [1, 2, 5, None])
def test_core_runs_every_row_to_its_exit_with_every_max_call(max_call):
    rng = random.Random(max_call)
    rows = [(f"r{i}", rng.randint(1, 4), rng.randint(0, 2)) for i in range(12)]
    runner = FakeRunner(4)
    core = ContinuousCore(runner, 4, SchedulerSettings(max_call=max_call))
    ids = core.submit(rows[:5])
    for _ in range(3):
        core.step()
    ids += core.submit(rows[5:])
    results = core.run()
    assert [results[i] for i in ids] == [(name, layer) for name, layer, _ in rows]
    assert all(len(names) <= (max_call or 4) for _, names in runner.calls)
    assert core.calls == len(runner.calls) and core.row_layers == sum(len(names) for _, names in runner.calls)
    assert not core.busy and core.in_flight == 0 and core.room == 4
    for name, layer, restarts in rows:  # each row ran layers 0..exit-1, once per token
        assert sum(names.count(name) for _, names in runner.calls) == layer * (restarts + 1)


def test_core_fills_calls_with_rows_of_one_layer():
    """Rows that entered together run layer after layer together (one call per layer, not per row)."""
    runner = FakeRunner(3)
    core = ContinuousCore(runner, 4, SchedulerSettings(max_call=4))
    core.submit([("a", 3, 0), ("b", 3, 0), ("c", 3, 0), ("d", 3, 0)])
    core.run()
    assert runner.calls == [(layer, ["a", "b", "c", "d"]) for layer in range(3)]


def test_core_age_bound_lets_no_row_starve():
    """A lone row at layer 1 waits behind a stream of full layer-0 calls only max_wait calls."""
    runner = FakeRunner(2)
    core = ContinuousCore(runner, 8, SchedulerSettings(max_call=2, max_wait=3, depth_bias=0.0, catch_up=0.0,
                                                       restart_weight=1.0))
    core.submit([("lone", 2, 0)])
    core.step()  # layer 0: the lone row goes on to layer 1
    core.submit([(f"s{i}", 1, 0) for i in range(20)])  # rows leaving at layer 1: full layer-0 calls
    for _ in range(5):
        core.step()
    layers = [layer for layer, _ in runner.calls]
    assert (1, ["lone"]) in runner.calls and layers.index(1) <= 5


def test_core_drops_rows_keep_refuses():
    runner = FakeRunner(2)
    core = ContinuousCore(runner, 2, SchedulerSettings(), keep=lambda row: row != 1)
    ids = core.submit([("a", 2, 0), ("b", 2, 0), ("c", 2, 0)])
    results = core.run()
    assert set(results) == {ids[0], ids[2]} and runner.released == [1] and core.in_flight == 0
