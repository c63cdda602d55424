"""Robot episodes while a canary is live: a stable and a canary policy server (real subprocesses on 127.0.0.1 with two
different tiny models, so two model versions) and robots that split by episode. Every chunk of every episode, as it
came over the wire, carries one model version, the one of the endpoint its session id picks; and a canary replaced
by a newer version mid-episode ends that episode instead of carrying it on with the new version."""

from __future__ import annotations

import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import pytest
from server_process import MODEL_DIRS, ServerProcess

from services.policy_server.models import content_hash
from services.protocol import StepRequest
from services.robot_client import PolicyClient, RobotRuntime, RobotSettings
from services.robot_client.metaworld import MetaWorldRobot
from services.robot_client.routing import CANARY, STABLE, route_for

sys.path.insert(0, str(MODEL_DIRS))
from model_dirs import TASK, write_model_dir

IMAGE_SIZE = 32  # the tiny model directory's frames
CHUNK = 8  # its chunk: K=2 latent frames x tau=4 actions
PERCENT = 50


class RecordingClient(PolicyClient):
    """The real client, remembering (session id, chunk index, model version) of every response it received."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.seen: list[tuple[str, int, str]] = []

    def step(self, request: StepRequest):
        resp = super().step(request)
        self.seen.append((resp.session_id, resp.chunk_index, resp.model_version))
        return resp


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("canary-models")
    return {name: write_model_dir(root / name, seed=seed) for seed, name in enumerate(("stable", "canary", "next"))}


@pytest.fixture(scope="module")
def versions(models) -> dict[str, str]:
    """The ``model_version`` each server answers with (a directory's is its content hash)."""
    out = {name: f"dir-{content_hash(path)}" for name, path in models.items()}
    assert len(set(out.values())) == 3
    return out


@pytest.fixture(scope="module")
def servers(models, tmp_path_factory):
    logs = tmp_path_factory.mktemp("canary-logs")
    with ServerProcess(models["stable"], logs / "stable.log") as stable, \
            ServerProcess(models["canary"], logs / "canary.log") as canary:
        yield {STABLE: stable, CANARY: canary}


def settings(robot_id: str, stable: str, canary: str, **kwargs) -> RobotSettings:
    base = {"robot_id": robot_id, "endpoint": stable, "canary_endpoint": canary, "canary_percent": PERCENT,
            "request_timeout_s": 20.0, "episode_timeout_s": 120.0}
    return RobotSettings(_env_file=None, **{**base, **kwargs})


def by_session(*clients: RecordingClient) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for client in clients:
        for session, _, version in client.seen:
            out[session].add(version)
    return out


def test_every_episode_stays_on_one_model_version_while_the_canary_is_live(servers, versions):
    # (robot, transport, episode): both transports, and episode ids that take both routes at 50 %
    plan = [("arm-1", "grpc", f"ep-{i}") for i in range(4)] + [("arm-2", "rest", f"ep-{i}") for i in range(3)]
    routes = {f"{robot}-{ep}": route_for(f"{robot}-{ep}", PERCENT) for robot, _, ep in plan}
    assert set(routes.values()) == {STABLE, CANARY}
    endpoints = {"grpc": {k: s.grpc_endpoint for k, s in servers.items()},
                 "rest": {k: s.rest_endpoint for k, s in servers.items()}}
    clients = {t: {k: RecordingClient(e, transport=t, timeout_s=20.0) for k, e in endpoints[t].items()}
               for t in endpoints}
    stats = {}
    try:
        for variant, (robot_id, transport, episode) in enumerate(plan):
            # deadline_ms: a late chunk is waited for, not held through (holds are test_robot_runtime's subject), so
            # every episode executes exactly its 3 chunks however busy the cores are
            cfg = settings(robot_id, endpoints[transport][STABLE], endpoints[transport][CANARY], transport=transport,
                           control_rate_hz=40, max_steps=3 * CHUNK, deadline_ms=20_000)
            pair = clients[transport]
            with MetaWorldRobot(TASK, variant, image_size=IMAGE_SIZE) as robot:
                runtime = RobotRuntime(robot, cfg, client=pair[STABLE], canary_client=pair[CANARY])
                st = runtime.run_episode(TASK, episode_id=episode)
            stats[st.session_id] = st
    finally:
        for pair in clients.values():
            for client in pair.values():
                client.close()
    assert set(stats) == set(routes)
    for session, st in stats.items():
        assert st.error is None, (session, st.error)
        assert st.route == routes[session] and st.endpoint == endpoints[_transport(plan, session)][st.route]
        assert st.policy_steps == 3 * CHUNK or st.success
        # one session from its reset to its end: no restarts, nothing stale, nothing rejected
        assert st.resets == st.stale_chunks == st.rejected_chunks == 0, session
        assert st.model_version == versions[st.route]
    # the wire: every chunk of an episode carries one version, the route's, and only its endpoint ever answered it
    seen = by_session(*(c for pair in clients.values() for c in pair.values()))
    assert set(seen) == set(stats)
    assert dict(seen) == {s: {versions[routes[s]]} for s in stats}
    for pair in clients.values():
        for route, client in pair.items():
            assert {routes[s] for s, _, _ in client.seen} <= {route}
    chunks = defaultdict(list)
    for pair in clients.values():
        for client in pair.values():
            for session, index, _ in client.seen:
                chunks[session].append(index)
    assert all(c == list(range(len(c))) and len(c) >= 3 for c in chunks.values()), chunks


def _transport(plan, session: str) -> str:
    return next(t for robot, t, ep in plan if f"{robot}-{ep}" == session)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.1)


def test_a_canary_replaced_mid_episode_ends_the_episode_on_its_version(servers, models, versions, tmp_path):
    canary = servers[CANARY]
    episode = next(f"roll-{i}" for i in range(100) if route_for(f"arm-9-roll-{i}", PERCENT) == CANARY)
    cfg = settings("arm-9", servers[STABLE].grpc_endpoint, canary.grpc_endpoint, control_rate_hz=5,
                   max_steps=10**4, episode_timeout_s=240.0, backoff_initial_s=0.1, backoff_max_s=0.5)
    stable_client = RecordingClient(servers[STABLE].grpc_endpoint, timeout_s=20.0)
    canary_client = RecordingClient(canary.grpc_endpoint, timeout_s=20.0)
    robot = MetaWorldRobot(TASK, 9, image_size=IMAGE_SIZE)
    runtime = RobotRuntime(robot, cfg, client=stable_client, canary_client=canary_client)
    result = []
    runner = threading.Thread(target=lambda: result.append(runtime.run_episode(TASK, episode_id=episode)))
    replacement = ServerProcess(models["next"], tmp_path / "next.log")
    replacement.http_port, replacement.grpc_port = canary.http_port, canary.grpc_port  # the canary's Service
    runner.start()
    try:
        _wait_for(lambda: runtime.stats is not None and runtime.stats.policy_steps >= 2 * CHUNK, 60, "two chunks")
        assert runtime.stats.route == CANARY and runtime.stats.model_version == versions[CANARY]
        canary.kill()  # the rollout restarts the canary pod; it comes back with the newer version
        replacement.start()
        runner.join(180)
        assert not runner.is_alive(), "the episode did not end"
        session = runtime.stats.session_id if runtime.stats else f"arm-9-{episode}"
        # what a client that does not pin its episode gets from the new canary: the newer version, same session
        plain = PolicyClient(canary.grpc_endpoint, timeout_s=20.0)
        try:
            obs = robot.observe()
            fresh = plain.step(StepRequest(session, reset=True, instruction=TASK, images=obs.frames[None],
                                           state=obs.state[None]))
        finally:
            plain.close()
        assert fresh.model_version == versions["next"]
    finally:
        runtime.stop()
        runner.join(60)
        for client in (stable_client, canary_client):
            client.close()
        robot.close()
        replacement.stop()
        canary.start()  # the module's canary, back on its ports
    (stats,) = result
    assert stats.ended == "aborted" and "model version not served" in stats.error, stats.error
    assert f"pinned to '{versions[CANARY]}'" in stats.error
    assert any("unknown session" in e for e in stats.recovered_errors)  # the new pod never saw the session
    assert stats.model_version == versions[CANARY] and stats.policy_steps >= 2 * CHUNK
    # every chunk the episode received came from the canary's first version; the newer one never answered it
    assert by_session(stable_client, canary_client) == {stats.session_id: {versions[CANARY]}}
