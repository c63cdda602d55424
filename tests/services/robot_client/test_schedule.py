"""The runtime's chunk scheduling without time: deadlines, holds, stalls, on-time accounting and pacing, driven by
explicit timestamps (no threads, no sleeps)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from services.robot_client.schedule import HOLD, Act, Chunk, ChunkCounts, ChunkSchedule, Pacer, Timing, Wait
from services.robot_client.settings import RobotSettings

REAL = Timing(deadline_s=0.05, first_chunk_s=10.0)


def chunk(arrived: float, steps: int = 2, index: int = 0) -> Chunk:
    targets = np.arange(steps * 30, dtype=np.float64).reshape(steps, 30) + 1000 * index
    return Chunk(epoch=1, index=index, targets=targets, arrived=arrived, control_rate_hz=80.0)


# each event: ("next", now, chunk offered or None, expected) | ("stepped", now, finished?) | ("drop",) | ("close", now)
# expected: an Act's step index, Wait(until) or HOLD
CASES = [
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0), 0), ("stepped", 0.1, False),
        ("next", 0.1, None, 1), ("stepped", 0.2, True),
        ("next", 0.2, chunk(0.15, index=1), 0),  # arrived before it was needed
    ], ChunkCounts(chunks=2, on_time_chunks=1), id="a chunk queued in time runs at once and is on time"),
    pytest.param(REAL, [
        ("next", 0.5, None, Wait(10.0)),  # the first chunk is awaited for first_chunk_s, not held for
        ("next", 3.0, chunk(3.0), 0),
    ], ChunkCounts(chunks=1), id="the first chunk is awaited and never counted"),
    pytest.param(REAL, [
        ("next", 10.0, None, HOLD), ("next", 10.1, None, HOLD),  # past first_chunk_s: one stall, held
        ("next", 12.0, chunk(12.0), 0),
    ], ChunkCounts(chunks=1, stalls=1, stall_s=2.0), id="a first chunk later than first_chunk_s stalls once"),
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0, steps=1), 0), ("stepped", 1.0, True),
        ("next", 1.0, None, Wait(1.05)),  # needed at 1.0: the robot waits still until the deadline
        ("next", 1.03, chunk(1.03, index=1), 0),
    ], ChunkCounts(chunks=2, on_time_chunks=1), id="a chunk within the deadline is on time: wait, no hold"),
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0, steps=1), 0), ("stepped", 1.0, True),
        ("next", 1.06, None, HOLD), ("next", 1.07, None, HOLD), ("next", 1.1, None, HOLD),
        ("next", 1.2, chunk(1.2, index=1), 0),
    ], ChunkCounts(chunks=2, late_chunks=1, stalls=1, stall_s=pytest.approx(0.14)),
        id="past the deadline the robot holds: one stall per late chunk, timed until it arrives"),
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0, steps=1), 0), ("stepped", 1.0, True),
        ("next", 1.5, chunk(1.2, index=1), 0),  # queued late, picked up at once
    ], ChunkCounts(chunks=2, late_chunks=1), id="late by its arrival time even without a hold"),
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0, steps=1), 0), ("stepped", 1.0, True),
        ("next", 2.0, None, HOLD), ("close", 2.5),
    ], ChunkCounts(chunks=1, stalls=1, stall_s=0.5), id="an episode ending while holding counts the stall so far"),
    pytest.param(REAL, [
        ("next", 0.0, chunk(0.0, steps=4), 0), ("stepped", 0.1, False), ("drop",),
        ("next", 0.3, None, Wait(pytest.approx(0.35))),  # the restarted session's chunk is needed from now
        ("next", 0.32, chunk(0.32, index=0), 0),
    ], ChunkCounts(chunks=2, on_time_chunks=1), id="a session restart drops the running chunk"),
    pytest.param(Timing.lockstep(), [
        ("next", 1e6, None, Wait(math.inf)),  # the world waits: never a hold, however long
        ("next", 2e6, chunk(2e6, steps=1), 0), ("stepped", 2e6, True),
        ("next", 3e6, None, Wait(math.inf)),
        ("next", 4e6, chunk(4e6, index=1), 0),
    ], ChunkCounts(chunks=2, on_time_chunks=1), id="lockstep awaits every chunk"),
]


@pytest.mark.parametrize("timing, events, counts", CASES)
def test_chunk_schedule(timing, events, counts):
    schedule = ChunkSchedule(timing, now=0.0)
    for event in events:
        kind, args = event[0], event[1:]
        if kind == "next":
            now, offered, expected = args
            assert schedule.wants_chunk or offered is None  # the caller offers a chunk only when one is wanted
            got = schedule.next(now, offered)
            if isinstance(expected, int):
                assert isinstance(got, Act) and got.step == expected, (event, got)
                np.testing.assert_array_equal(got.target, schedule.chunk.targets[expected])
            else:
                assert got == expected, (event, got)
        elif kind == "stepped":
            now, finished = args
            assert schedule.stepped(now) is finished
        elif kind == "drop":
            schedule.drop()
        else:
            schedule.close(*args)
    assert schedule.counts == counts


def test_the_schedule_updates_the_counts_it_is_given_and_refuses_a_stray_step():
    counts = ChunkCounts()
    schedule = ChunkSchedule(REAL, now=0.0, counts=counts)
    schedule.next(0.0, chunk(0.0))
    assert counts.chunks == 1 and not schedule.wants_chunk
    with pytest.raises(RuntimeError, match="without a running chunk"):
        ChunkSchedule(REAL, now=0.0).stepped(1.0)


@pytest.mark.parametrize("period, asks, dues", [
    pytest.param(0.1, [(0.0, False), (0.02, False), (0.15, False)], [0.0, 0.1, 0.2], id="on schedule: sleeps"),
    pytest.param(0.1, [(0.0, False), (0.15, False), (0.25, False)], [0.0, 0.15, 0.25],
                 id="less than a period late: at once, schedule kept"),
    pytest.param(0.1, [(0.0, False), (0.35, False), (0.36, False)], [0.0, 0.35, 0.45],
                 id="more than a period late: restarts from now, no burst"),
    pytest.param(0.1, [(0.0, False), (0.15, True), (0.2, False)], [0.0, 0.15, 0.25],
                 id="after a pause: restarts from now"),
    pytest.param(0.0, [(0.0, False), (0.0, False), (5.0, False)], [0.0, 0.0, 5.0], id="unpaced: always now"),
])
def test_pacer(period, asks, dues):
    pacer = Pacer()
    assert [pytest.approx(pacer.due(now, period, restart)) for now, restart in asks] == dues


def test_timing_from_settings_and_lockstep():
    t = Timing.of(RobotSettings(mode="async", deadline_ms=20, request_timeout_s=3.0, control_rate_hz=40))
    assert (t.deadline_s, t.first_chunk_s, t.control_rate_hz, t.paced) == (pytest.approx(0.02), 3.0, 40, True)
    assert Timing.of(RobotSettings(mode="sync", request_timeout_s=7.0)).deadline_s == 7.0
    free = Timing.lockstep()
    assert (free.deadline_s, free.first_chunk_s, free.paced) == (math.inf, math.inf, False)
    assert Timing.lockstep(20.0).paced
    with pytest.raises(ValueError, match="deadline_s"):
        Timing(deadline_s=-1.0)
    with pytest.raises(ValueError, match="control_rate_hz"):
        Timing(control_rate_hz=0.0)
