"""Model updates: the server follows ``models:/<name>@champion`` in a real (sqlite) MLflow registry. Moving the alias
while robots in several threads keep stepping fails no request; new sessions start on the new version, sessions begun
on the old one finish on it, and a version pushed out of memory tells its sessions to reset."""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict

import httpx
import mlflow
import pytest
from conftest import PolicyServer, frames, states
from model_dirs import write_model_dir

from pipelines.settings import default_tracking_uri
from pipelines.tracking_store import ensure_experiment
from pipelines.train.registry import log_and_register
from services.protocol import MODEL_CHANGED, StepRequest

NAME = "lingbot-va-serve-test"
ROBOTS = 3


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """Versions 1-3 of NAME (three different tiny models); champion -> 1."""
    tmp = tmp_path_factory.mktemp("registry")
    data_dir = tmp / "data"
    previous = mlflow.get_tracking_uri() if os.environ.get("MLFLOW_TRACKING_URI") else None
    uri = default_tracking_uri(data_dir)
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=ensure_experiment("lingbot-serve-test", data_dir)):
            versions = [log_and_register(write_model_dir(tmp / f"m{i}", seed=i), registered_name=NAME,
                                         alias="champion" if i == 0 else "challenger") for i in range(3)]
        assert versions == [1, 2, 3]
        yield {"uri": uri, "data_dir": data_dir}
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.fixture(scope="module")
def swap_server(registry, tmp_path_factory):
    log = tmp_path_factory.mktemp("swap-logs") / "swap.log"
    server = PolicyServer(f"models:/{NAME}@champion", ["--tracking-uri", registry["uri"], "--data-dir",
                           str(registry["data_dir"]), "--poll-interval-s", "0.3", "--max-wait-ms", "20"], log)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


def _move_champion(registry, version: int) -> None:
    mlflow.set_tracking_uri(registry["uri"])
    mlflow.MlflowClient().set_registered_model_alias(NAME, "champion", str(version))


class Robots:
    """Robots in threads, each running short async episodes (reset, no-tensor step, two executed chunks) until
    stopped; every response and every failure is recorded."""

    def __init__(self, server: PolicyServer):
        self.server = server
        self.responses: list[tuple[str, int, str]] = []  # (session, chunk, model version)
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(ROBOTS)]

    def start(self) -> Robots:
        for t in self.threads:
            t.start()
        return self

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(120)
        assert not any(t.is_alive() for t in self.threads)

    def versions_of_new_sessions(self) -> set[str]:
        with self._lock:
            return {v for _, chunk, v in self.responses if chunk == 0}

    def _run(self, robot: int) -> None:
        for episode in range(60):  # bounded even if never stopped
            if self.stop.is_set():
                return
            sid = f"swap-{robot}-{episode}"
            transport = "rest" if (robot + episode) % 2 else "grpc"
            try:
                resp = self._step(StepRequest(sid, reset=True, images=frames(1, episode), state=states(1, robot)),
                                  transport)
                executed = [resp, self._step(StepRequest(sid), transport)]
                for chunk in (2, 3):
                    req = StepRequest(sid, seq=chunk, images=frames(8, chunk), actions=executed[chunk - 2].actions,
                                      state=states(8, chunk))
                    executed.append(self._step(req, transport))
            except Exception as err:  # every failure is a test failure, reported with its session
                with self._lock:
                    self.errors.append(f"{sid} ({transport}): {type(err).__name__}: {err}")

    def _step(self, req: StepRequest, transport: str):
        resp = self.server.step(req, transport)
        with self._lock:
            self.responses.append((req.session_id, resp.chunk_index, resp.model_version))
        return resp


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_alias_moves_while_robots_step(swap_server, registry):
    v1, v2, v3 = (f"{NAME}/{i}" for i in (1, 2, 3))
    keeper = swap_server.step(StepRequest("keeper", reset=True, images=frames(1, 0), state=states(1, 0)))
    assert keeper.model_version == v1
    robots = Robots(swap_server).start()
    try:
        _wait_for(lambda: len(robots.responses) >= 2 * ROBOTS, 60, "the robots' first steps")
        _move_champion(registry, 2)
        _wait_for(lambda: v2 in robots.versions_of_new_sessions(), 60, "a session on version 2")
        n = len(robots.responses)
        _wait_for(lambda: len(robots.responses) >= n + 2 * ROBOTS, 60, "steps on version 2")
    finally:
        robots.join()
    assert robots.errors == [], robots.errors
    by_session = defaultdict(set)
    for sid, _, version in robots.responses:
        by_session[sid].add(version)
    assert all(len(v) == 1 for v in by_session.values()), {s: v for s, v in by_session.items() if len(v) > 1}
    assert {v for vs in by_session.values() for v in vs} == {v1, v2}
    # the session begun on version 1 finishes on it after the switch
    resp = swap_server.step(StepRequest("keeper"))
    assert (resp.model_version, resp.chunk_index) == (v1, 1)
    on_v2 = swap_server.step(StepRequest("on-v2", reset=True, images=frames(1, 1), state=states(1, 1)))
    assert on_v2.model_version == v2
    # an episode begun on version 1 restarting its session (pinned) starts on version 1 again: it is still in memory
    restart = swap_server.step(StepRequest("keeper-2", reset=True, model_version=v1, images=frames(1, 3),
                                           state=states(1, 3)), "grpc")
    assert (restart.model_version, restart.chunk_index) == (v1, 0)

    # a third version: two stay in memory (2 and 3), so version 1's sessions are told to reset
    _move_champion(registry, 3)
    _wait_for(lambda: swap_server.step(StepRequest("probe", reset=True, images=frames(1, 2), state=states(1, 2)))
              .model_version == v3, 60, "version 3")
    with pytest.raises(httpx.HTTPStatusError) as err:
        swap_server.step(StepRequest("keeper"))
    assert err.value.response.status_code == 400 and MODEL_CHANGED in err.value.response.json()["error"]
    assert swap_server.step(StepRequest("on-v2")).model_version == v2  # version 2's session goes on
    with pytest.raises(httpx.HTTPStatusError) as err:  # ... and its episode cannot restart there: the episode ends
        swap_server.step(StepRequest("keeper", reset=True, model_version=v1, images=frames(1, 0), state=states(1, 0)))
    assert err.value.response.status_code == 400 and "model version not served" in err.value.response.json()["error"]
    assert swap_server.step(StepRequest("keeper", reset=True, images=frames(1, 0), state=states(1, 0))) \
        .model_version == v3
    text = swap_server.metrics()
    assert f'lingbot_serve_model_version_info{{model_name="lingbot-va",version="{v3}"}} 1.0' in text
    assert 'lingbot_serve_model_switches_total{model_name="lingbot-va"} 2.0' in text
    assert f'version="{v1}"' not in text  # version 1 is out of memory and out of the metrics
