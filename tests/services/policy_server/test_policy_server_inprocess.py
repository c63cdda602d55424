"""The in-process transport: the engine behind ``PolicyClient``'s interface, through the wire encoding. Its chunks are
the episode policy's (seeded by the request), its refusals are the errors a remote robot gets, and a request in flight
can be cancelled."""

from __future__ import annotations

import contextlib
import threading

import numpy as np
import pytest
import torch
from conftest import frames, states
from model_dirs import write_model_dir

from model.policy import ChunkPolicy, Plan
from pipelines.data.embodiments import METAWORLD_CAMERAS, get_adapter
from services.policy_server.inprocess import InProcessClient
from services.protocol import StepRequest
from services.robot_client.client import Cancelled, NonFiniteChunk, RequestRejected, SessionLost, VersionUnavailable

TASK = "reach-v3"


@pytest.fixture(scope="module")
def policy(model_dir) -> ChunkPolicy:
    return ChunkPolicy.load(model_dir, get_adapter)


def test_chunks_are_the_seeded_episode_policys_in_fp32(policy):
    """sync: reset -> plan; executed chunk -> observe, plan; each chunk is the local EpisodePolicy's with the request's
    seed, rounded to FP32 as the wire carries it, and the plans behind them are recorded."""
    ep = policy.episode(TASK, seed=12345)
    f0, s0, f1, s1 = frames(1, 0), states(1, 0), frames(8, 1), states(8, 1)
    with contextlib.closing(InProcessClient.serving(policy, record=True)) as client:
        r0 = client.step(StepRequest("s", reset=True, instruction=TASK, mode="sync", seed=12345, images=f0, state=s0))
        ep.start(f0[0])
        p0 = ep.plan()
        assert r0.targets.dtype == np.float32 and r0.chunk_index == 0 and r0.model_version == "in-process"
        np.testing.assert_array_equal(r0.targets, p0.actions.astype(np.float32))
        r1 = client.step(StepRequest("s", mode="sync", seq=1, session_token=r0.session_token, images=f1,
                                     actions=r0.actions, state=s1))
        ep.observe(f1, policy.adapter.to_unified(r0.actions, s1))
        p1 = ep.plan()
        np.testing.assert_array_equal(r1.targets, p1.actions.astype(np.float32))
        assert [p.actions.tobytes() for p in client.plans] == [p0.actions.tobytes(), p1.actions.tobytes()]
        assert client.episode is not None
    with pytest.raises(Cancelled, match="closed"):
        client.step(StepRequest("s", reset=True, images=f0, state=s0))


def test_refusals_are_the_errors_a_remote_robot_gets(policy, tmp_path):
    reset = {"reset": True, "images": frames(1, 0), "state": states(1, 0)}
    with contextlib.closing(InProcessClient.serving(policy)) as client:
        with pytest.raises(SessionLost, match="unknown session ghost: send reset=true"):
            client.step(StepRequest("ghost", images=frames(8, 1), actions=np.zeros((8, 4), np.float32),
                                    state=states(8, 1)))
        with pytest.raises(VersionUnavailable, match="model version not served"):
            client.step(StepRequest("p", model_version="other/1", **reset))
        with pytest.raises(RequestRejected, match="unknown instruction"):
            client.step(StepRequest("i", instruction="push-v3", **reset))
        with pytest.raises(RequestRejected, match="seed must be an integer"):
            client.step(StepRequest("n", seed=-1, **reset))
    nan_policy = ChunkPolicy.load(write_model_dir(tmp_path / "nan", nan=True), get_adapter)
    with contextlib.closing(InProcessClient.serving(nan_policy)) as client, \
            pytest.raises(NonFiniteChunk, match="non-finite actions"):
        client.step(StepRequest("n", **reset))


class _BlockingPolicy:
    """A policy whose plans wait for ``release``: a request that stays in flight."""

    adapter, cameras, image_size, tasks, steps_per_chunk = get_adapter("metaworld-sawyer"), METAWORLD_CAMERAS, 32, \
        [TASK], 8

    def __init__(self) -> None:
        self.release = threading.Event()

    def episode(self, task: str, seed: int) -> _BlockingPolicy:
        return self

    def start(self, frames: np.ndarray) -> None:
        pass

    def plan(self) -> Plan:
        self.release.wait(60)
        return Plan(np.zeros((8, 30)), torch.zeros(0), torch.zeros(8, 30))

    def native_actions(self, unified: np.ndarray, state: np.ndarray) -> np.ndarray:
        return np.zeros((len(unified), 4), np.float32)


def test_cancel_ends_the_wait_for_a_request_in_flight():
    policy = _BlockingPolicy()
    client = InProcessClient.serving(policy)
    timer = threading.Timer(0.2, client.cancel)
    timer.start()
    try:
        with pytest.raises(Cancelled, match="cancelled"):
            client.step(StepRequest("b", reset=True, images=frames(1, 0), state=states(1, 0)))
    finally:
        policy.release.set()
        client.close()
