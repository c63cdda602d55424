"""Cross-robot batching: predict_chunks / imagine_many equal the per-session calls, outputs and state alike."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from model import LingBotVA, get_preset
from model.session import Session, imagine_many, predict_chunks

sys.path.insert(0, str(Path(__file__).parents[1] / "pipelines" / "evaluate"))
from model_dirs import TASK, load_policy, write_model_dir

TINY = get_preset("tiny")
C, H, W, TAU, A = TINY.latent_channels, 4, 8, TINY.tau, TINY.action_channels
HISTORY = (0, 2, 1)  # chunks each session observes after its first frame: three different cache lengths
TEXT_LEN = (4, 7, 3)  # instructions of different lengths (padded and masked in the batch)
ATOL = 1e-5


def tiny_model(**overrides) -> LingBotVA:
    torch.manual_seed(0)
    return LingBotVA(TINY.replace(**overrides) if overrides else TINY).eval()


def make_sessions(model: LingBotVA, **kwargs) -> list[Session]:
    """Three robots: own instruction, action mask, generator and history; built identically on every call."""
    kwargs = {"video_steps": 2, "action_steps": 3, **kwargs}  # fewer steps than deployed: a faster test
    data = torch.Generator().manual_seed(1)
    sessions = []
    for i, (chunks, text_len) in enumerate(zip(HISTORY, TEXT_LEN, strict=True)):
        mask = torch.zeros(A, dtype=torch.bool)
        mask[: 8 + 4 * i] = True
        s = model.session(torch.randn(text_len, TINY.text_dim, generator=data), mask, chunk_size=2,
                          **{"generator": torch.Generator().manual_seed(100 + i), **kwargs})
        s.observe(torch.randn(1, C, H, W, generator=data))
        for _ in range(chunks):
            s.observe(torch.randn(2, C, H, W, generator=data), torch.randn(2 * TAU, A, generator=data))
        sessions.append(s)
    return sessions


def observe_real(sessions: list[Session], seed: int) -> None:
    data = torch.Generator().manual_seed(seed)
    for s in sessions:
        s.observe(torch.randn(2, C, H, W, generator=data), torch.randn(2 * TAU, A, generator=data))


def assert_close(got: list, want: list) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        if isinstance(w, tuple | list):
            assert_close(list(g), list(w))
        else:
            assert g.shape == w.shape
            assert g.numel() == 0 or (g - w).abs().max().item() <= ATOL


def assert_same_state(got: list[Session], want: list[Session]) -> None:
    for g, w in zip(got, want, strict=True):
        assert (g.next_frame, g.num_chunks, g._committed, len(g.history)) == (
            w.next_frame, w.num_chunks, w._committed, len(w.history))
        assert g.cache.length == w.cache.length
        assert_close(g.cache.k + g.cache.v, w.cache.k + w.cache.v)
        for field in ("chunk", "kind", "seg"):
            assert torch.equal(getattr(g.cache.meta, field), getattr(w.cache.meta, field))
        assert torch.equal(g.generator.get_state(), w.generator.get_state())


SETTINGS = [
    pytest.param({}, {}, id="video-cfg5"),
    pytest.param({}, {"action_cfg": 2.0}, id="video-and-action-cfg"),
    pytest.param({}, {"video_cfg": 1.0}, id="no-cfg"),
    pytest.param({}, {"window_chunks": 3}, id="window-3"),
    pytest.param({}, {"action_temperature": 0.5}, id="action-temperature"),
    pytest.param({"objective": "reactive"}, {}, id="reactive"),
]


@pytest.mark.parametrize(("model_kw", "session_kw"), SETTINGS)
def test_predict_chunks_equals_per_session_calls(model_kw, session_kw):
    model = tiny_model(**model_kw)
    want_sessions, got_sessions = make_sessions(model, **session_kw), make_sessions(model, **session_kw)
    assert len({s.cache.length for s in got_sessions}) == 3
    want = [s.predict_chunk() for s in want_sessions]
    got = predict_chunks(got_sessions)
    assert_close(got, want)
    assert_same_state(got_sessions, want_sessions)
    # the state left behind (cache, generators) carries on identically: the next chunk after a real one matches
    observe_real(want_sessions, 5)
    observe_real(got_sessions, 5)
    assert_close(predict_chunks(got_sessions), [s.predict_chunk() for s in want_sessions])


@pytest.mark.parametrize("session_kw", [
    pytest.param({}, id="video-cfg5"),
    pytest.param({"video_cfg": 1.0, "action_cfg": 2.0}, id="action-cfg-only"),
    pytest.param({"window_chunks": 2}, id="window-2"),
])
def test_imagine_many_equals_per_session_calls(session_kw):
    model = tiny_model()
    want_sessions, got_sessions = make_sessions(model, **session_kw), make_sessions(model, **session_kw)
    executing = [a for _, a in predict_chunks(got_sessions)]
    assert_close(executing, [a for _, a in (s.predict_chunk() for s in want_sessions)])

    want = [s.imagine(a) for s, a in zip(want_sessions, executing, strict=True)]
    got = imagine_many(got_sessions, executing)
    assert_close(got, want)
    assert_same_state(got_sessions, want_sessions)  # the provisional entries too
    assert_close(predict_chunks(got_sessions), [s.predict_chunk() for s in want_sessions])
    # the real outcome replaces the provisional entries in both
    observe_real(want_sessions, 6)
    observe_real(got_sessions, 6)
    assert_same_state(got_sessions, want_sessions)
    assert_close(predict_chunks(got_sessions), [s.predict_chunk() for s in want_sessions])


def test_sessions_sharing_the_global_generator_draw_noise_in_call_order():
    model = tiny_model()
    want_sessions, got_sessions = make_sessions(model, generator=None), make_sessions(model, generator=None)
    torch.manual_seed(3)
    want = [s.predict_chunk() for s in want_sessions]
    torch.manual_seed(3)
    assert_close(predict_chunks(got_sessions), want)


def test_imagine_many_without_commit_leaves_the_sessions_unchanged():
    model = tiny_model()
    want_sessions, got_sessions = make_sessions(model), make_sessions(model)
    actions = [torch.randn(2 * TAU, A, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    want = [s.imagine(a, commit=False) for s, a in zip(want_sessions, actions, strict=True)]
    assert_close(imagine_many(got_sessions, actions, commit=False), want)
    assert_same_state(got_sessions, want_sessions)


def test_one_session_takes_the_per_session_path(monkeypatch):
    calls = []
    original = Session.predict_chunk
    monkeypatch.setattr(Session, "predict_chunk", lambda self, k=None: calls.append(k) or original(self, k))
    (session,) = make_sessions(tiny_model())[:1]
    predict_chunks([session], 2)
    assert calls == [2]
    assert predict_chunks([]) == [] and imagine_many([], []) == []


def test_explicit_chunk_size_overrides_the_sessions_own():
    model = tiny_model()
    want_sessions, got_sessions = make_sessions(model), make_sessions(model)
    want_sessions[1].chunk_size = got_sessions[1].chunk_size = 4
    with pytest.raises(ValueError, match="chunk_size"):
        predict_chunks(got_sessions)
    assert_close(predict_chunks(got_sessions, 3), [s.predict_chunk(3) for s in want_sessions])


def _unobserved(sessions):
    sessions[2] = sessions[2].model.session(torch.randn(4, TINY.text_dim), torch.ones(A, dtype=torch.bool))


def _other_size(sessions):
    sessions[1].size = (H, 2 * W)


@pytest.mark.parametrize(("change", "match"), [
    pytest.param(lambda ss: setattr(ss[1], "video_steps", 1), "video_steps", id="video-steps"),
    pytest.param(lambda ss: setattr(ss[2], "action_steps", 4), "action_steps", id="action-steps"),
    pytest.param(lambda ss: setattr(ss[1], "video_cfg", 3.0), "video_cfg", id="video-cfg"),
    pytest.param(lambda ss: setattr(ss[1], "action_cfg", 3.0), "action_cfg", id="action-cfg"),
    pytest.param(lambda ss: setattr(ss[2], "video_s_end", 0.5), "video_s_end", id="s-end"),
    pytest.param(lambda ss: setattr(ss[1], "window", 2), "window", id="window"),
    pytest.param(lambda ss: setattr(ss[1], "model", tiny_model()), "another model", id="model"),
    pytest.param(lambda ss: setattr(ss[1], "use_cache", False), "use_cache", id="no-cache"),
    pytest.param(_unobserved, "no observation", id="unobserved"),
    pytest.param(_other_size, "size", id="latent-size"),
    pytest.param(lambda ss: ss.append(ss[0]), "twice", id="duplicate"),
])
def test_incompatible_sessions_are_a_value_error(change, match):
    sessions = make_sessions(tiny_model())
    change(sessions)
    lengths = [s.cache.length for s in sessions]
    with pytest.raises(ValueError, match=match):
        predict_chunks(sessions)
    with pytest.raises(ValueError, match=match):
        imagine_many(sessions, [torch.zeros(2 * TAU, A)] * len(sessions))
    assert [s.cache.length for s in sessions] == lengths  # nothing was committed


def test_imagine_many_checks_the_action_chunks():
    model = tiny_model()
    sessions = make_sessions(model)
    with pytest.raises(ValueError, match="3 sessions but 2"):
        imagine_many(sessions, [torch.zeros(2 * TAU, A)] * 2)
    with pytest.raises(ValueError, match="differ in length"):
        imagine_many(sessions, [torch.zeros(2 * TAU, A), torch.zeros(TAU, A), torch.zeros(2 * TAU, A)])
    with pytest.raises(ValueError, match="reactive"):
        imagine_many(make_sessions(tiny_model(objective="reactive")), [torch.zeros(2 * TAU, A)] * 3)


# --------------------------------------------------------------------------------------------- policy level
def test_policy_plan_many_equals_per_episode_plans(tmp_path):
    policy = load_policy(write_model_dir(tmp_path / "model"))
    rng = np.random.default_rng(0)
    side, views = policy.image_size, len(policy.cameras)
    frames0 = [rng.integers(0, 256, (views, side, side, 3), dtype=np.uint8) for _ in HISTORY]
    chunks = [[(rng.integers(0, 256, (policy.steps_per_chunk, views, side, side, 3), dtype=np.uint8),
                rng.uniform(-0.2, 0.2, (policy.steps_per_chunk, A))) for _ in range(n)] for n in HISTORY]

    def episodes():
        out = []
        for i, (f0, history) in enumerate(zip(frames0, chunks, strict=True)):
            ep = policy.episode(TASK, seed=i)
            ep.start(f0)
            for frames, executed in history:
                ep.observe(frames, executed)
            out.append(ep)
        return out

    want_eps, got_eps = episodes(), episodes()
    want = [ep.plan() for ep in want_eps]
    got = policy.plan_many(got_eps)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g.actions, w.actions, atol=1e-4, rtol=1e-5)
        assert_close([g.latents, g.normalized], [w.latents, w.normalized])
    # async (Alg. 2): imagine each episode's executing chunk, then plan the next one
    want_next = []
    for ep, plan in zip(want_eps, want, strict=True):
        ep.imagine(plan)
        want_next.append(ep.plan())
    got_next = policy.imagine_and_plan_many(got_eps, got)
    for g, w in zip(got_next, want_next, strict=True):
        np.testing.assert_allclose(g.actions, w.actions, atol=1e-4, rtol=1e-5)
        assert_close([g.latents, g.normalized], [w.latents, w.normalized])
    assert_same_state([ep.session for ep in got_eps], [ep.session for ep in want_eps])
    with pytest.raises(ValueError, match="not created by this policy"):
        policy.plan_many([*got_eps, object()])
    with pytest.raises(ValueError, match="3 episodes but 2 plans"):
        policy.imagine_and_plan_many(got_eps, got_next[:2])
