"""Round trips through the real server (REST and gRPC, kserve's clients): every chunk equals what a local
``EpisodePolicy`` driven in the same order returns, in async (Alg. 2) and sync (Alg. 1) mode, one robot or several
batched together; plus metrics, model metadata, the bound host and the command line."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import frames, free_port, states
from model_dirs import load_policy

from model.policy import ChunkPolicy
from services.policy_server.engine import session_seed
from services.protocol import DEFAULT_MODEL_NAME, StepRequest, StepResponse

TASK = "reach-v3"


@pytest.fixture(scope="module")
def local(model_dir) -> ChunkPolicy:
    """The reference: the same model directory as a local ChunkPolicy."""
    return load_policy(model_dir)


def check(resp: StepResponse, plan, state: np.ndarray, chunk: int, local: ChunkPolicy, session_id: str) -> None:
    """``resp`` is ``plan`` (the local policy's chunk) in unified and in native units against ``state``."""
    assert resp.chunk_index == chunk and resp.session_id == session_id
    assert resp.targets.shape == (local.steps_per_chunk, 30) and resp.actions.shape == (local.steps_per_chunk, 4)
    np.testing.assert_allclose(resp.targets, plan.actions, atol=1e-5, rtol=1e-5)
    native = local.adapter.to_native(plan.actions, np.repeat(state[None], len(plan.actions), 0))
    np.testing.assert_allclose(resp.actions, native, atol=2e-3)
    spec = local.adapter.spec
    assert (resp.actions >= np.array(spec.action_low, np.float32)).all()
    assert (resp.actions <= np.array(spec.action_high, np.float32)).all()
    assert resp.model_version.startswith("dir-") and resp.embodiment == "metaworld-sawyer"
    assert resp.control_rate_hz == spec.control_rate_hz and resp.cameras == local.cameras
    assert resp.image_size == local.image_size
    # the server's own timing of the request: model time, batch wait and decode, all within the round trip
    assert resp.compute_ms is not None and resp.compute_ms > 0
    assert resp.queue_ms is not None and resp.queue_ms >= 0 and resp.decode_ms is not None and resp.decode_ms >= 0


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_async_chunks_equal_a_local_episode(policy_server, local, transport):
    sid = f"async-{transport}"
    ep = local.episode(TASK, seed=session_seed(sid))
    f0, s0 = frames(1, 0), states(1, 0)
    r0 = policy_server.step(StepRequest(sid, reset=True, instruction=TASK, cameras=local.cameras, seq=0, images=f0,
                                        state=s0), transport)
    ep.start(f0[0])
    p0 = ep.plan()
    check(r0, p0, s0[-1], 0, local, sid)
    # chunk 0 is executing: no tensors; the server imagines chunk 0 and plans chunk 1
    r1 = policy_server.step(StepRequest(sid, seq=1), transport)
    ep.imagine(p0)
    p1 = ep.plan()
    check(r1, p1, s0[-1], 1, local, sid)
    assert not np.allclose(r1.targets, r0.targets)
    responses, plans = [r0, r1], [p0, p1]
    for chunk in (2, 3):  # chunk k-2 executed (its frames, actions and states), chunk k-1 executing
        f, s = frames(local.steps_per_chunk, chunk), states(local.steps_per_chunk, chunk)
        executed = responses[chunk - 2].actions
        resp = policy_server.step(StepRequest(sid, seq=chunk, images=f, actions=executed, state=s), transport)
        ep.observe(f, local.adapter.to_unified(executed, s))
        ep.imagine(plans[chunk - 1])
        plans.append(ep.plan())
        check(resp, plans[chunk], s[-1], chunk, local, sid)
        responses.append(resp)


@pytest.mark.parametrize("transport", ["rest", "grpc"])
def test_sync_chunks_equal_a_local_episode(policy_server, local, transport):
    sid = f"sync-{transport}"
    ep = local.episode(TASK, seed=session_seed(sid))
    f0, s0 = frames(1, 10), states(1, 10)
    resp = policy_server.step(StepRequest(sid, reset=True, mode="sync", images=f0, state=s0), transport)
    ep.start(f0[0])
    check(resp, ep.plan(), s0[-1], 0, local, sid)
    for chunk in (1, 2):
        f, s = frames(local.steps_per_chunk, 10 + chunk), states(local.steps_per_chunk, 10 + chunk)
        executed = resp.actions
        resp = policy_server.step(StepRequest(sid, images=f, actions=executed, state=s), transport)
        ep.observe(f, local.adapter.to_unified(executed, s))
        check(resp, ep.plan(), s[-1], chunk, local, sid)


def test_concurrent_robots_are_batched_and_each_equals_its_local_episode(policy_server, local):
    """Four robots at once over REST and gRPC: the server batches their passes; every chunk is still exact."""
    robots = [f"batch-{i}" for i in range(4)]
    before = _batch_counts(policy_server.metrics())

    async def all_robots(make):
        calls = [policy_server.rest(make(i, sid)) if i % 2 else policy_server.grpc(make(i, sid))
                 for i, sid in enumerate(robots)]
        return await asyncio.gather(*calls)

    f0 = [frames(1, 100 + i) for i in range(4)]
    s0 = [states(1, 100 + i) for i in range(4)]
    resets = asyncio.run(all_robots(lambda i, sid: StepRequest(sid, reset=True, images=f0[i], state=s0[i])))
    seconds = asyncio.run(all_robots(lambda i, sid: StepRequest(sid)))
    f1 = [frames(local.steps_per_chunk, 200 + i) for i in range(4)]
    s1 = [states(local.steps_per_chunk, 200 + i) for i in range(4)]
    thirds = asyncio.run(all_robots(lambda i, sid: StepRequest(sid, images=f1[i], actions=resets[i].actions,
                                                               state=s1[i])))
    for i, sid in enumerate(robots):
        ep = local.episode(TASK, seed=session_seed(sid))
        ep.start(f0[i][0])
        p0 = ep.plan()
        check(resets[i], p0, s0[i][-1], 0, local, sid)
        ep.imagine(p0)
        p1 = ep.plan()
        check(seconds[i], p1, s0[i][-1], 1, local, sid)
        ep.observe(f1[i], local.adapter.to_unified(resets[i].actions, s1[i]))
        ep.imagine(p1)
        check(thirds[i], ep.plan(), s1[i][-1], 2, local, sid)
    after = _batch_counts(policy_server.metrics())
    assert after["count"] > before["count"]
    multi = (after["count"] - after["le1"]) - (before["count"] - before["le1"])
    assert multi >= 1, f"no batch held more than one request: {before} -> {after}"


def _batch_counts(text: str) -> dict[str, float]:
    le1 = re.search(r'lingbot_serve_batch_size_bucket\{le="1\.0",model_name="lingbot-va"\} (\S+)', text)
    count = re.search(r'lingbot_serve_batch_size_count\{model_name="lingbot-va"\} (\S+)', text)
    return {"le1": float(le1[1]) if le1 else 0.0, "count": float(count[1]) if count else 0.0}


def test_metrics_and_metadata(policy_server, local):
    policy_server.step(StepRequest("metrics-1", reset=True, images=frames(1, 5), state=states(1, 5)))
    text = policy_server.metrics()
    for name in ("lingbot_serve_request_seconds_bucket", "lingbot_serve_batch_size_count",
                 "lingbot_serve_active_sessions", "lingbot_serve_model_version_info",
                 "lingbot_serve_compute_seconds_bucket", "lingbot_serve_queue_seconds_count",
                 "lingbot_serve_decode_seconds_count", "lingbot_serve_request_bytes_count"):
        assert name in text, name
    assert re.search(r'lingbot_serve_request_seconds_count\{kind="reset",model_name="lingbot-va",outcome="ok"\} '
                     r'[1-9]', text)
    assert re.search(r'lingbot_serve_compute_seconds_count\{kind="reset",model_name="lingbot-va"\} [1-9]', text)
    assert re.search(r'lingbot_serve_model_version_info\{model_name="lingbot-va",version="dir-[0-9a-f]+"\} 1\.0',
                     text)
    active = re.search(r'lingbot_serve_active_sessions\{model_name="lingbot-va"\} (\S+)', text)
    assert active and float(active[1]) >= 1
    meta = httpx.get(f"{policy_server.rest_url}/v2/models/{DEFAULT_MODEL_NAME}", timeout=10).json()
    inputs = {i["name"]: i for i in meta["inputs"]}
    assert inputs["images"]["shape"] == [-1, 2, local.image_size, local.image_size, 3]
    assert inputs["images"]["datatype"] == "UINT8" and inputs["state"]["shape"] == [-1, 4]
    assert {o["name"] for o in meta["outputs"]} == {"actions", "targets"}


def _listeners(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp*) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local_addr, state = line.split()[1], line.split()[3]
            addr, hex_port = local_addr.split(":")
            if state == "0A" and int(hex_port, 16) == port:  # 0A = LISTEN
                found.add(addr)
    return found


def test_binds_127_0_0_1_only_by_default(policy_server, monkeypatch):
    from services.policy_server.settings import ServeSettings

    monkeypatch.delenv("LINGBOT_SERVE_HOST", raising=False)
    assert ServeSettings(_env_file=None).host == "127.0.0.1"
    loopback = {"0100007F", "0000000000000000FFFF00000100007F"}  # 127.0.0.1, and as IPv4-mapped IPv6 (gRPC)
    for port in (policy_server.http_port, policy_server.grpc_port):
        found = _listeners(port)
        assert found and found <= loopback, f"port {port} listens on {found}, not only on 127.0.0.1"


def test_command_line(tmp_path, capsys):
    from pipelines.cli import build_parser, main
    from pipelines.settings import settings_from_flags
    from services.policy_server.settings import ServeSettings

    token_file = tmp_path / "token"
    token_file.write_text("t0k\n")

    args = build_parser().parse_args(["serve", "--model", "models:/lingbot-va-reach-v3@champion", "--http_port",
                                      "9000", "--no-batching", "--max-sessions", "3", "--token-file",
                                      str(token_file)])
    settings = settings_from_flags(ServeSettings, args)
    assert args.http_port == 9000 and args.grpc_port == 8081
    assert settings.model == "models:/lingbot-va-reach-v3@champion" and settings.batching is False
    assert settings.max_sessions == 3 and settings.token.get_secret_value() == "t0k"
    # a token on the command line would show in ps: refused, pointing to the file and the environment
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--token", "t0k"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--token is refused" in err and "--token-file" in err and "LINGBOT_SERVE_TOKEN" in err
    assert settings.model_name == DEFAULT_MODEL_NAME and settings.host == "127.0.0.1"
    # a model that is not there: one clear line and exit code 2, before anything listens
    assert main(["serve", "--model", str(tmp_path / "nothing"), "--http_port", str(free_port())]) == 2
    assert "lingbot: error:" in capsys.readouterr().err
