"""The policy server's core, free of transport: sessions, Algorithm 1/2 across requests, batching, model switches.

Per request (one step of one robot episode), on the batcher's worker thread:

    reset           new EpisodePolicy; start(frame); plan                                   -> chunk 0
    sync  + frames  observe(frames, executed -> unified against the state); plan
    async + nothing imagine (FDM) the chunk returned last time (executing now); plan          (right after reset)
    async + frames  observe(...); imagine the chunk returned last time; plan the one after it

which is Algorithm 1 / 2's call order on an ``EpisodePolicy`` (the gate's rollouts run this engine in process,
``services.policy_server.inprocess``). The plan and
imagine-and-plan passes of all sessions in a batch run together (``ChunkPolicy.plan_many`` /
``imagine_and_plan_many`` when the policy has them and batching is on; one episode after another otherwise).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hmac
import logging
import secrets
import threading
import time
import zlib
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from kserve.errors import InferenceError, InvalidInput

from model.policy import EpisodePolicy, Plan
from services.policy_server import metrics
from services.policy_server.batcher import Batcher, Job
from services.policy_server.guards import Forbidden, show
from services.policy_server.models import ModelHandle
from services.policy_server.sessions import Session, SessionStore
from services.policy_server.settings import ServeSettings
from services.protocol import (
    MODEL_CHANGED,
    NON_FINITE,
    OUT_OF_ORDER,
    UNKNOWN_SESSION,
    VERSION_NOT_SERVED,
    StepRequest,
    StepResponse,
)

log = logging.getLogger(__name__)

PLAN, IMAGINE_AND_PLAN = "plan", "imagine_and_plan"


def session_seed(session_id: str, base: int = 0) -> int:
    """Seed of a session's flow sampler: stable per (server seed, session id), different across robots."""
    return (base * 1_000_003 + zlib.crc32(session_id.encode())) % 2**31


@dataclass(eq=False)
class _Step:
    """A request that passed validation and its session's pre-planning work: what remains is one model pass."""

    job: Job
    session: Session
    kind: str  # PLAN or IMAGINE_AND_PLAN
    state: np.ndarray  # (S,) the state the chunk's native actions are computed against


class PolicyEngine:
    """Sessions of many robots on one (hot-swappable) model; ``submit`` a ``StepRequest``, get a ``StepResponse``."""

    def __init__(self, handle: ModelHandle, settings: ServeSettings, model_name: str):
        self.settings, self.model_name = settings, model_name
        self._models = threading.Lock()
        self.current = handle
        self.live: list[ModelHandle] = [handle]  # versions in memory, oldest first
        self.store = SessionStore(settings.max_sessions, settings.session_ttl_s, settings.max_session_memory_bytes,
                                  on_evict=lambda reason, n: metrics.EVICTIONS.labels(model_name, reason).inc(n))
        self.batcher = Batcher(self._process, max_batch_size=settings.max_batch_size,
                               max_wait_s=settings.max_wait_ms / 1000, batching=settings.batching,
                               on_idle=self.housekeeping, active_s=settings.active_session_s or None,
                               name=f"batcher-{model_name}")
        metrics.MODEL_VERSION.labels(model_name, handle.version).set(1)

    def start(self) -> PolicyEngine:
        self.batcher.start()
        return self

    def stop(self) -> None:
        self.batcher.stop()
        self.store.clear()

    def submit(self, step: StepRequest) -> concurrent.futures.Future:
        """Queue one step; the future resolves to a ``StepResponse`` or fails with ``InvalidInput`` (client
        mistake) / ``InferenceError`` (the model failed)."""
        return self.batcher.submit(step.session_id, step)

    # ------------------------------------------------------------------------------------------- model versions
    def switch(self, new: ModelHandle) -> None:
        """Make ``new`` the version new sessions start on. Running sessions finish on their version, or are told to
        reset (``old_sessions="reset"``, or beyond ``max_live_models`` versions in memory); a reset pinned to an old
        version (its episode began there) starts on it while it is still in memory."""
        with self._models:
            old, self.current = self.current, new
            self.live.append(new)
            keep = 1 if self.settings.old_sessions == "reset" else self.settings.max_live_models
            retired = self.live[:-keep]
            for handle in retired:
                handle.retired = True
            self.live = self.live[-keep:]
        metrics.MODEL_VERSION.labels(self.model_name, old.version).set(0)
        metrics.MODEL_VERSION.labels(self.model_name, new.version).set(1)
        self._forget_versions(retired)
        metrics.MODEL_SWITCHES.labels(self.model_name).inc()
        log.info("serving %s (was %s)", new.version, old.version)

    def housekeeping(self) -> None:
        """Evict idle / over-budget sessions and those on retired versions; free versions nobody uses."""
        for session in self.store.sessions():
            if session.handle.retired:
                self.store.remove(session.session_id, f"{MODEL_CHANGED} (the session began on "
                                                      f"{session.handle.version}, which is no longer served)", "model")
        self.store.sweep()
        sessions = self.store.sessions()
        with self._models:
            used = {id(s.handle) for s in sessions}
            dropped = [h for h in self.live if h is not self.current and id(h) not in used]
            self.live = [h for h in self.live if h not in dropped]
        self._forget_versions(dropped)
        metrics.ACTIVE_SESSIONS.labels(self.model_name).set(len(sessions))
        metrics.SESSION_BYTES.labels(self.model_name).set(sum(s.nbytes for s in sessions))

    def _forget_versions(self, handles: list[ModelHandle]) -> None:
        for handle in handles:
            with contextlib.suppress(KeyError):  # already gone
                metrics.MODEL_VERSION.remove(self.model_name, handle.version)

    # ------------------------------------------------------------------------------------------- one batch
    def _process(self, jobs: list[Job]) -> None:
        steps: list[_Step] = []
        for job in jobs:
            try:
                steps.append(self._prepare(job))
            except Exception as err:
                self._fail(job, err)
        groups: dict[tuple[int, str], list[_Step]] = defaultdict(list)
        for step in steps:
            groups[id(step.session.handle), step.kind].append(step)
        for group in groups.values():
            for step, plan in zip(group, self._plan(group), strict=True):
                try:
                    response = self._finish(step, plan)
                except Exception as err:
                    self._fail(step.job, err, step.session)
                    continue
                self._time(step.job, response, "reset" if step.job.payload.reset else step.kind)
                step.job.future.set_result(response)
        if steps:
            metrics.BATCH_SIZE.labels(self.model_name).observe(len(steps))
        self.housekeeping()

    def _prepare(self, job: Job) -> _Step:
        req: StepRequest = job.payload
        if req.reset:
            return self._reset(job, req)
        self._check_owner(req)
        session = self.store.get(req.session_id)
        if session is None:
            why = self.store.why_missing(req.session_id)
            raise InvalidInput(UNKNOWN_SESSION.format(session_id=req.session_id) + (f" ({why})" if why else ""))
        if session.handle.retired:
            self.store.remove(req.session_id, MODEL_CHANGED, "model")
            raise InvalidInput(f"{MODEL_CHANGED} (the session began on {session.handle.version}; now serving "
                               f"{self.current.version})")
        if req.model_version is not None and req.model_version != session.handle.version:
            raise InvalidInput(f"{VERSION_NOT_SERVED}: the request is pinned to {show(req.model_version)}; session "
                               f"{req.session_id} runs {session.handle.version!r} (parameter model_version)")
        policy = session.handle.policy
        if req.seq is not None and req.seq != session.returned:
            raise InvalidInput(f"{OUT_OF_ORDER}: this session's next chunk is {session.returned}, the request "
                               f"expects seq={req.seq}")
        self._check_cameras(req, policy.cameras)
        if req.instruction is not None and req.instruction != session.instruction:
            raise InvalidInput(f"instruction is fixed at reset: this session runs {session.instruction!r}, the "
                               f"request says {show(req.instruction)}; send reset=true to change it")
        if req.steps == 0:
            if session.mode == "sync":
                raise InvalidInput("a sync session needs the executed chunk's images, actions and state in every "
                                   "request after the reset")
            if session.outstanding != 1:
                raise InvalidInput(f"a request with no tensors is valid only in async mode right after the reset "
                                   f"response (chunk 0 is executing); this session has {session.outstanding} "
                                   "chunks unreported: send the executed chunk's images, actions and state")
            return _Step(job, session, IMAGINE_AND_PLAN, session.last_state)
        if session.outstanding < 1:
            raise InvalidInput("no chunk of this session is executing: nothing to report")
        n = policy.steps_per_chunk
        if req.steps != n:
            raise InvalidInput(f"wrong N: the request reports {req.steps} executed steps; a chunk of this model has "
                               f"{n} steps (one image, action and state per executed step)")
        if tuple(req.images.shape[1:]) != session.frame_shape:
            raise InvalidInput(f"images have frames of shape {tuple(req.images.shape[1:])}; this session's frames "
                               f"are {session.frame_shape} (V, H, W, 3)")
        adapter = policy.adapter
        self._check_width("actions", req.actions, adapter.spec.native_action_dim, adapter.name)
        self._check_width("state", req.state, adapter.spec.state_dim, adapter.name)
        try:
            unified = adapter.to_unified(req.actions, req.state)
        except ValueError as err:
            raise InvalidInput(f"actions/state: {err}") from None
        self._episode_call(session, lambda: session.episode.observe(req.images, unified))
        session.reported += 1
        session.last_state = np.asarray(req.state[-1], np.float64)
        kind = IMAGINE_AND_PLAN if session.mode == "async" and session.outstanding == 1 else PLAN
        return _Step(job, session, kind, session.last_state)

    def _check_owner(self, req: StepRequest) -> None:
        """A live session answers only the client holding its token (a reset of it included): refused before
        anything of the session is read or touched."""
        session = self.store.peek(req.session_id)
        if session is not None and not hmac.compare_digest((req.session_token or "").encode(), session.token.encode()):
            raise Forbidden(f"session_id {req.session_id} is live and belongs to another client: send the "
                            "session_token its reset returned (a live session cannot be taken over; use a new "
                            "session_id)")

    def _reset(self, job: Job, req: StepRequest) -> _Step:
        self._check_owner(req)
        handle = self._version_for(req.model_version)
        policy = handle.policy
        if req.seq not in (None, 0):
            raise InvalidInput(f"{OUT_OF_ORDER}: a reset answers chunk 0, the request expects seq={req.seq}")
        self._check_cameras(req, policy.cameras)
        tasks = policy.tasks
        instruction = req.instruction
        if instruction is None:
            if len(tasks) != 1:
                raise InvalidInput(f"parameter instruction is required at reset: this model knows {tasks}")
            instruction = tasks[0]
        elif instruction not in tasks:
            raise InvalidInput(f"unknown instruction {show(instruction)}: this model knows {tasks}")
        views, size = len(policy.cameras), policy.image_size
        shape = tuple(req.images.shape[1:])
        if shape[0] != views or shape[-1] != 3 or (size is not None and shape[1:3] != (size, size)):
            want = f"({views}, {size or 'H'}, {size or 'W'}, 3)"
            raise InvalidInput(f"images have frames of shape {shape}; this model takes {want}: cameras "
                               f"{','.join(policy.cameras)}, square {size or 'any'} px RGB views")
        adapter = policy.adapter
        self._check_width("state", req.state, adapter.spec.state_dim, adapter.name)
        try:
            seed = req.seed if req.seed is not None else session_seed(req.session_id, self.settings.seed)
            episode = policy.episode(instruction, seed=seed)
            episode.start(req.images[0])
        except ValueError as err:
            raise InvalidInput(f"reset: {err}") from None
        state = np.asarray(req.state[-1], np.float64)
        session = Session(req.session_id, handle, episode, req.mode, instruction, shape, state,
                          token=req.session_token or secrets.token_urlsafe(24))
        session.estimate_bytes()
        self.store.put(session)  # replaces an earlier session of this id
        return _Step(job, session, PLAN, state)

    def _version_for(self, pinned: str | None) -> ModelHandle:
        """The version a reset starts on: the current one, or the pinned one while this server still holds it (a
        robot restarting a session of an episode that began before a hot swap)."""
        with self._models:
            if pinned is None:
                return self.current
            for handle in reversed(self.live):
                if handle.version == pinned and not handle.retired:
                    return handle
            served = [h.version for h in self.live if not h.retired]
        raise InvalidInput(f"{VERSION_NOT_SERVED}: the request is pinned to {show(pinned)}; this server serves "
                           f"{', '.join(map(repr, served))} (parameter model_version: an episode never changes model "
                           "version)")

    def _plan(self, group: list[_Step]) -> list[Plan | Exception]:
        """One model pass for a group (same model version, same kind): batched when possible."""
        policy = group[0].session.handle.policy
        episodes = [s.session.episode for s in group]
        plans = [s.session.last_plan for s in group]
        imagine = group[0].kind == IMAGINE_AND_PLAN
        batched = self.settings.batching and len(group) > 1
        many = getattr(policy, "imagine_and_plan_many" if imagine else "plan_many", None)
        if batched and many is not None:
            try:
                return many(episodes, plans) if imagine else many(episodes)
            except ValueError as err:  # e.g. sessions that cannot share a batch: fall back to one by one
                log.warning("batched %s failed (%s); running the %d sessions one by one", group[0].kind, err,
                            len(group))
                for episode in episodes:
                    episode.session.reset_provisional()
            except Exception as err:  # the batched pass broke: its sessions are closed by _finish/_fail
                return [err] * len(group)
        out: list[Plan | Exception] = []
        for episode, plan in zip(episodes, plans, strict=True):
            try:
                out.append(_imagine_and_plan(episode, plan) if imagine else episode.plan())
            except Exception as err:
                out.append(err)
        return out

    def _finish(self, step: _Step, plan: Plan | Exception) -> StepResponse:
        session = step.session
        if isinstance(plan, Exception):
            raise plan
        policy = session.handle.policy
        targets = np.asarray(plan.actions, np.float64)  # (K*tau, 30) unified, native units
        if not np.isfinite(targets).all():
            raise InferenceError(f"{NON_FINITE} for session {session.session_id}; the "
                                 "session was closed: send reset=true")
        native = policy.native_actions(targets, step.state)
        chunk = session.returned
        session.returned += 1
        session.last_plan = plan
        session.estimate_bytes()
        return StepResponse(actions=native, targets=targets.astype(np.float32), model_version=session.handle.version,
                            session_id=session.session_id, chunk_index=chunk, embodiment=session.handle.embodiment,
                            control_rate_hz=float(policy.adapter.spec.control_rate_hz), cameras=tuple(policy.cameras),
                            image_size=policy.image_size, session_token=session.token)

    # ------------------------------------------------------------------------------------------- helpers
    def _time(self, job: Job, response: StepResponse, kind: str) -> None:
        """The server's own timing of a request, on its response and in the metrics: model time since its batch
        began (the model passes of requests ahead of it in the batch included) and the wait for the batch."""
        now = time.perf_counter()
        started = job.started_at if job.started_at is not None else job.queued_at
        response.compute_ms, response.queue_ms = 1000 * (now - started), 1000 * (started - job.queued_at)
        metrics.COMPUTE_SECONDS.labels(self.model_name, kind).observe(now - started)
        metrics.QUEUE_SECONDS.labels(self.model_name).observe(started - job.queued_at)

    def _fail(self, job: Job, err: Exception, session: Session | None = None) -> None:
        if not isinstance(err, InvalidInput):
            log.error("step of session %s failed", job.key, exc_info=err)
            if session is not None:
                self.store.remove(session.session_id, f"closed after a server error: {err}")
            if not isinstance(err, InferenceError):
                err = InferenceError(f"the policy failed on session {job.key}: {type(err).__name__}: {err}; the "
                                     "session was closed: send reset=true")
        job.future.set_exception(err)

    def _episode_call(self, session: Session, fn) -> None:
        """Run an EpisodePolicy call that may half-update the session; a failure closes the session."""
        try:
            fn()
        except ValueError as err:
            self.store.remove(session.session_id, f"closed after a rejected request: {err}")
            raise InvalidInput(f"{err}; the session was closed: send reset=true") from None

    @staticmethod
    def _check_cameras(req: StepRequest, cameras: tuple[str, ...]) -> None:
        if req.cameras is not None and tuple(req.cameras) != tuple(cameras):
            raise InvalidInput(f"unknown camera order {show(','.join(req.cameras))}: this model takes cameras "
                               f"{','.join(cameras)} (in that order)")

    @staticmethod
    def _check_width(name: str, array: np.ndarray, width: int, embodiment: str) -> None:
        if array.shape[1] != width:
            raise InvalidInput(f"{name} has {array.shape[1]} columns; {embodiment}'s {name} has {width}")


def _imagine_and_plan(episode: EpisodePolicy, plan: Plan) -> Plan:
    episode.imagine(plan)
    return episode.plan()
