"""bench/serving.py's pure parts: overhead paired per request, the rate where execution equals planning, and the
on-time capacity search (on synthetic latency data). The benchmark measures; these check what it computes."""

import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import serving  # noqa: E402


def test_overhead_is_paired_per_request():
    # request 2 is slow because the model was slow, not the wire: pairing keeps it out of the overhead
    out = serving.paired_overhead([12.0, 105.0, 13.0], [10.0, 101.0, 12.0])
    assert out["overhead_ms_p50"] == pytest.approx(2.0)
    assert out["overhead_ms_mean"] == pytest.approx(7.0 / 3)
    assert out["samples"] == 3
    with pytest.raises(ValueError, match="pair them"):
        serving.paired_overhead([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="compute_us"):
        serving.paired_overhead([1.0], [None])


def test_equal_rate_makes_a_chunk_last_as_long_as_a_plan():
    rate = serving.equal_rate_hz(16, 400.0)
    assert rate == pytest.approx(40.0)
    assert 16 / rate == pytest.approx(0.4)  # 16 steps at that rate take the 400 ms plan
    with pytest.raises(ValueError):
        serving.equal_rate_hz(16, 0.0)


def synthetic_fleet(per_robot_ms: float, budget_ms: float = 250.0, seed: int = 0):
    """A server whose chunk latency grows with the fleet: base 60 ms + per_robot_ms per robot, lognormal jitter."""
    calls = []

    def measure(n: int) -> dict:
        calls.append(n)
        rng = np.random.default_rng(seed + n)
        lat = (60.0 + per_robot_ms * n) * rng.lognormal(0.0, 0.1, 2000)
        return {"on_time_pct": 100.0 * float(np.mean(lat <= budget_ms)), "latency_ms_p50": float(np.median(lat))}

    return measure, calls


@pytest.mark.parametrize(("per_robot_ms", "expected"), [
    # the 95th percentile of the jitter is exp(1.645 * 0.1) = 1.18: 10 robots 210 ms -> 248 <= 250; 12 -> 283 late
    pytest.param(15.0, 10, id="batching-like: 10 robots fit"),
    pytest.param(60.0, 2, id="no-batching-like: 2 robots"),    # 2: 180 ms -> 212 ok; 4: 300 ms late
    pytest.param(400.0, 0, id="even one robot is late"),
])
def test_capacity_search_stops_at_the_first_fleet_below_95_percent(per_robot_ms, expected):
    measure, calls = synthetic_fleet(per_robot_ms)
    counts = serving.robot_counts(32)
    capacity, rows = serving.find_capacity(measure, counts, beyond=1)
    assert capacity == expected
    first_late = next(i for i, r in enumerate(rows) if r["on_time_pct"] < serving.ON_TIME_PCT)
    assert rows[first_late - 1]["robots"] == expected if expected else first_late == 0
    assert len(rows) == first_late + 2 and calls == counts[:first_late + 2]  # one count beyond, for the plot
    assert [r["robots"] for r in rows] == calls


def test_a_later_lucky_fleet_does_not_raise_the_capacity():
    pcts = {1: 99.0, 2: 90.0, 4: 97.0}
    capacity, rows = serving.find_capacity(lambda n: {"on_time_pct": pcts[n]}, [1, 2, 4], beyond=1)
    assert capacity == 1 and [r["robots"] for r in rows] == [1, 2, 4]


def test_robot_counts_are_fine_up_to_the_goal_then_coarse():
    assert serving.robot_counts(24) == [1, 2, 4, 6, 8, 10, 12, 16, 20, 24]
    assert serving.robot_counts(3) == [1, 2]
