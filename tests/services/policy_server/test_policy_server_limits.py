"""Bounds and guards: session eviction (max sessions, idle TTL, memory cap) answered with the reset message, bearer
auth on REST and gRPC, batching switched off, and the batcher's per-session serialisation."""

from __future__ import annotations

import asyncio
import re
import threading
import time

import grpc
import httpx
import numpy as np
import pytest
from conftest import STATE, PolicyServer, frames, states
from model_dirs import load_policy

from services.policy_server.batcher import Batcher
from services.policy_server.models import ModelHandle
from services.policy_server.sessions import Session, SessionStore
from services.protocol import DEFAULT_MODEL_NAME, StepRequest, to_infer_request

TASK = "reach-v3"
TOKEN = "s3cret-token"
TTL_S = 4.0


@pytest.fixture(scope="module")
def small_server(model_dir, tmp_path):
    """Two sessions at most, a short idle TTL, a token, no cross-robot batching."""
    server = PolicyServer(model_dir, ["--max-sessions", "2", "--session-ttl-s", str(TTL_S), "--no-batching"],
                          tmp_path / "small.log", token=TOKEN, env={"LINGBOT_SERVE_TOKEN": TOKEN})
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory):
    return tmp_path_factory.mktemp("limits")


def _reset(server, sid: str, seed: int = 0):
    return server.step(StepRequest(sid, reset=True, images=frames(1, seed), state=states(1, seed)))


def _error(server, req: StepRequest) -> str:
    with pytest.raises(httpx.HTTPStatusError) as err:
        server.step(req)
    assert err.value.response.status_code == 400, err.value.response.text
    return err.value.response.json()["error"]


def test_least_recently_used_session_is_evicted(small_server):
    for i in range(3):
        assert _reset(small_server, f"lru-{i}", i).chunk_index == 0
    message = _error(small_server, StepRequest("lru-0"))
    assert "unknown session lru-0: send reset=true" in message and "max_sessions=2" in message
    assert small_server.step(StepRequest("lru-2")).chunk_index == 1  # the newest two are still served
    assert small_server.step(StepRequest("lru-1")).chunk_index == 1
    assert _reset(small_server, "lru-0").chunk_index == 0  # a reset brings an evicted robot back


def test_idle_session_is_evicted_after_the_ttl(small_server):
    _reset(small_server, "idle")
    time.sleep(TTL_S + 2.5)  # the worker sweeps at least once a second when idle
    message = _error(small_server, StepRequest("idle"))
    assert "unknown session idle: send reset=true" in message and "idle" in message
    text = small_server.metrics()
    for reason in ("lru", "ttl"):
        count = re.search(rf'lingbot_serve_evictions_total\{{model_name="lingbot-va",reason="{reason}"\}} (\S+)', text)
        assert count and float(count[1]) >= 1, reason


def test_rest_needs_the_bearer_token(small_server):
    body, json_length = to_infer_request(StepRequest("auth-rest", reset=True, images=frames(1, 0),
                                                     state=states(1, 0))).to_rest()
    url = f"{small_server.rest_url}/v2/models/{DEFAULT_MODEL_NAME}/infer"
    base = {"inference-header-content-length": str(json_length), "content-type": "application/octet-stream"}
    for auth in (None, "Bearer wrong", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"):
        headers = {**base, **({"authorization": auth} if auth else {})}
        r = httpx.post(url, content=body, headers=headers, timeout=30)
        assert r.status_code == 401 and "bearer token" in r.json()["error"], (auth, r.text)
    r = httpx.post(url, content=body, headers={**base, "authorization": f"Bearer {TOKEN}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert httpx.get(f"{small_server.rest_url}/v2/health/ready", timeout=10).status_code == 200  # probes stay open


def test_grpc_needs_the_bearer_token(small_server):
    req = StepRequest("auth-grpc", reset=True, images=frames(1, 0), state=states(1, 0))
    for metadata in ((), (("authorization", "Bearer wrong"),)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(small_server.grpc(req, metadata=metadata))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "bearer token" in err.value.details()
    assert asyncio.run(small_server.grpc(req)).chunk_index == 0


def test_no_batching_runs_one_request_per_batch(small_server):
    async def four():
        return await asyncio.gather(*[small_server.rest(StepRequest(f"solo-{i}", reset=True, images=frames(1, i),
                                                                    state=states(1, i))) for i in range(2)],
                                    *[small_server.grpc(StepRequest(f"solo-{i}", reset=True, images=frames(1, i),
                                                                    state=states(1, i))) for i in range(2, 4)])

    assert [r.chunk_index for r in asyncio.run(four())] == [0, 0, 0, 0]
    text = small_server.metrics()
    le1 = float(re.search(r'lingbot_serve_batch_size_bucket\{le="1\.0",model_name="lingbot-va"\} (\S+)', text)[1])
    count = float(re.search(r'lingbot_serve_batch_size_count\{model_name="lingbot-va"\} (\S+)', text)[1])
    assert count >= 4 and le1 == count


# --- the store and the batcher on their own -------------------------------------------------------------------

@pytest.fixture(scope="module")
def handle(model_dir) -> ModelHandle:
    return ModelHandle(load_policy(model_dir), "test/1", model_dir)


def _session(handle: ModelHandle, sid: str, seed: int) -> Session:
    episode = handle.policy.episode(TASK, seed)
    episode.start(frames(1, seed)[0])
    session = Session(sid, handle, episode, "async", TASK, (2, 32, 32, 3), STATE.astype(np.float64))
    session.estimate_bytes()
    return session


def test_memory_cap_evicts_least_recently_used_sessions(handle):
    sessions = [_session(handle, f"mem-{i}", i) for i in range(3)]
    one = sessions[0].nbytes
    assert one > 0 and all(s.nbytes == one for s in sessions)  # KV cache + VAE cache of one observed frame
    evicted: list[str] = []
    store = SessionStore(max_sessions=10, ttl_s=100, max_bytes=int(2.5 * one), on_evict=lambda r, n: evicted.append(r))
    for s in sessions:
        store.put(s)
        store.sweep()
    assert [s.session_id for s in store.sessions()] == ["mem-1", "mem-2"] and evicted == ["memory"]
    assert "memory cap" in store.why_missing("mem-0")
    sessions[1].episode.observe(frames(8, 9), np.zeros((8, 30), np.float32))  # the cache grows with history
    assert sessions[1].estimate_bytes() > one


def test_ttl_uses_the_idle_time(handle):
    now = [0.0]
    store = SessionStore(max_sessions=10, ttl_s=5, clock=lambda: now[0])
    store.put(_session(handle, "a", 0))
    store.put(_session(handle, "b", 1))
    now[0] = 4.0
    assert store.get("a") is not None  # used: its idle time restarts
    now[0] = 7.0
    store.sweep()
    assert [s.session_id for s in store.sessions()] == ["a"] and "idle" in store.why_missing("b")


@pytest.mark.parametrize("batching", [True, False])
def test_batcher_serialises_a_session_and_batches_different_ones(batching):
    batches: list[list[tuple[str, int]]] = []

    def process(jobs):
        batches.append([j.payload for j in jobs])
        time.sleep(0.02)
        for j in jobs:
            j.future.set_result(j.payload)

    batcher = Batcher(process, max_batch_size=4, max_wait_s=0.1, batching=batching).start()
    try:
        futures = [batcher.submit(key, (key, i)) for i in range(3) for key in ("a", "b", "c")]
        assert [f.result(timeout=30) for f in futures] == [(k, i) for i in range(3) for k in ("a", "b", "c")]
    finally:
        batcher.stop()
    for batch in batches:
        keys = [k for k, _ in batch]
        assert len(keys) == len(set(keys)), batch  # never one session twice in a batch
        assert len(batch) <= (4 if batching else 1)
    for key in "abc":
        order = [i for batch in batches for k, i in batch if k == key]
        assert order == [0, 1, 2]  # a session's steps in arrival order
    assert max(len(b) for b in batches) == (3 if batching else 1)


def test_batcher_fails_queued_jobs_on_stop():
    gate = threading.Event()

    def process(jobs):
        gate.wait(10)
        for j in jobs:
            j.future.set_result(None)

    batcher = Batcher(process, max_batch_size=1, max_wait_s=0).start()
    first = batcher.submit("a", 1)
    time.sleep(0.2)  # the worker holds "a"; "b" waits in the queue
    second = batcher.submit("b", 2)
    stopper = threading.Thread(target=batcher.stop)
    stopper.start()
    time.sleep(0.2)  # stop() has raised its flag and waits for the running batch
    gate.set()
    stopper.join(30)
    assert first.result(timeout=10) is None
    with pytest.raises(RuntimeError, match="shutting down"):
        second.result(timeout=10)
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit("c", 3)


def test_batcher_drops_a_cancelled_request_and_answers_the_rest_of_its_batch(caplog):
    """A client that went away cancels its future while it waits: its batch must still answer the others (it used
    to fail the whole batch with InvalidStateError, logged as 'batch of N failed')."""
    gate, seen = threading.Event(), []

    def process(jobs):
        gate.wait(10) if jobs[0].key == "hold" else None
        seen.append([j.key for j in jobs])
        for j in jobs:
            j.future.set_result(j.key)

    batcher = Batcher(process, max_batch_size=4, max_wait_s=0.3).start()
    try:
        hold = batcher.submit("hold", 0)
        time.sleep(0.5)  # "hold"'s window has closed and the worker waits in it; the next two queue up together
        gone, kept = batcher.submit("gone", 1), batcher.submit("kept", 2)
        assert gone.cancel()
        gate.set()
        assert (hold.result(timeout=10), kept.result(timeout=10)) == ("hold", "kept")
    finally:
        batcher.stop()
    assert ["kept"] in seen and not any("gone" in keys for keys in seen)
    assert "failed" not in caplog.text


def test_batcher_window_closes_once_every_active_session_is_in():
    """A lone robot's request does not wait out the batching window; with another session active it does (so the
    other's request can join)."""
    waited: list[float] = []

    def process(jobs):
        for j in jobs:
            waited.append(j.started_at - j.queued_at)
            j.future.set_result(len(jobs))

    batcher = Batcher(process, max_batch_size=4, max_wait_s=0.3, active_s=5.0).start()
    try:
        assert batcher.submit("a", 0).result(timeout=10) == 1
        assert waited[-1] < 0.15  # alone: no window
        batcher.submit("b", 0).result(timeout=10)  # b is active now too
        first = batcher.submit("a", 1)
        time.sleep(0.05)
        second = batcher.submit("b", 1)
        assert (first.result(timeout=10), second.result(timeout=10)) == (2, 2)  # the window held a for b
    finally:
        batcher.stop()
