"""The engine without a transport: the async path of a client that reports a chunk before asking for the next one,
and a model that produces NaN (a server error that closes the session, never actions sent to a robot)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import frames, owned, states
from kserve.errors import InferenceError, InvalidInput
from model_dirs import load_policy, write_model_dir

from services.policy_server.engine import PolicyEngine, session_seed
from services.policy_server.models import load_model
from services.policy_server.settings import ServeSettings
from services.protocol import StepRequest


def submit(engine: PolicyEngine, req: StepRequest):
    """``engine.submit`` as the session's own client: carrying its session_token."""
    return engine.submit(owned(req))

TASK = "reach-v3"


def _engine(model_dir, tmp_path, name: str) -> PolicyEngine:
    settings = ServeSettings(_env_file=None, model=str(model_dir), data_dir=tmp_path)
    return PolicyEngine(load_model(model_dir, tmp_path), settings, name).start()


def test_async_report_before_asking_plans_without_imagining(model_dir, tmp_path):
    """reset -> chunk 0; frames of chunk 0 (nothing executing) -> observe, plan; then no tensors -> imagine chunk 1
    (executing now), plan chunk 2: each equal to the local EpisodePolicy driven that way."""
    engine = _engine(model_dir, tmp_path, "engine-async")
    local = load_policy(model_dir)
    ep = local.episode(TASK, seed=session_seed("late"))
    try:
        f0, s0, f1, s1 = frames(1, 0), states(1, 0), frames(8, 1), states(8, 1)
        r0 = submit(engine, StepRequest("late", reset=True, images=f0, state=s0)).result(60)
        ep.start(f0[0])
        np.testing.assert_allclose(r0.targets, ep.plan().actions, atol=1e-5)
        r1 = submit(engine, StepRequest("late", images=f1, actions=r0.actions, state=s1)).result(60)
        ep.observe(f1, local.adapter.to_unified(r0.actions, s1))
        p1 = ep.plan()
        np.testing.assert_allclose(r1.targets, p1.actions, atol=1e-5)
        r2 = submit(engine, StepRequest("late")).result(60)
        ep.imagine(p1)
        np.testing.assert_allclose(r2.targets, ep.plan().actions, atol=1e-5)
        assert [r0.chunk_index, r1.chunk_index, r2.chunk_index] == [0, 1, 2]
        with pytest.raises(InvalidInput, match="valid only in async mode right after the reset"):
            submit(engine, StepRequest("late")).result(60)  # chunks 1 and 2 are both unreported now
    finally:
        engine.stop()


def test_nan_model_is_a_server_error_that_closes_the_session(tmp_path):
    nan_dir = write_model_dir(tmp_path / "nan", nan=True)
    engine = _engine(nan_dir, tmp_path, "engine-nan")
    try:
        with pytest.raises(InferenceError, match="non-finite actions"):
            submit(engine, StepRequest("n", reset=True, images=frames(1, 0), state=states(1, 0))).result(60)
        with pytest.raises(InvalidInput, match="unknown session n: send reset=true"):
            submit(engine, StepRequest("n")).result(60)
    finally:
        engine.stop()


def test_a_reset_pinned_to_its_episode_version_survives_a_hot_swap(model_dir, tmp_path):
    """After a switch new sessions start on the new version, and a reset pinned to the old one (an episode that
    began there restarting its session) starts on it while the server holds it. A version it never had, or no longer
    holds, is refused; so is a step pinned to another version than its session's, which leaves the session as it
    was."""
    engine = _engine(model_dir, tmp_path, "engine-pin")
    new = load_model(write_model_dir(tmp_path / "v2", seed=1), tmp_path)
    old = engine.current.version
    assert new.version != old

    def reset(sid: str, pin: str | None = None):
        req = StepRequest(sid, reset=True, model_version=pin, images=frames(1, 0), state=states(1, 0))
        return submit(engine, req).result(60)

    try:
        assert reset("a").model_version == old
        engine.switch(new)
        assert reset("b").model_version == new.version
        restarted = reset("a", pin=old)
        assert (restarted.model_version, restarted.chunk_index) == (old, 0)
        assert submit(engine, StepRequest("a", model_version=old)).result(60).model_version == old
        with pytest.raises(InvalidInput, match="model version not served: the request is pinned to 'dir-never'"):
            reset("c", pin="dir-never")
        with pytest.raises(InvalidInput, match=f"model version not served: .*session b runs '{new.version}'"):
            submit(engine, StepRequest("b", model_version=old)).result(60)
        chunk = submit(engine, StepRequest("b", model_version=new.version)).result(60)
        assert (chunk.model_version, chunk.chunk_index) == (new.version, 1)  # the refused step changed nothing
        # once no session uses the old version it leaves memory: a reset pinned to it is refused from then on
        engine.store.remove("a")
        engine.housekeeping()
        with pytest.raises(InvalidInput, match=f"pinned to '{old}'; this server serves '{new.version}'"):
            reset("a", pin=old)
    finally:
        engine.stop()
