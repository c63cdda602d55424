"""The edge runtime: execute action chunks at the control rate while the next one is requested from the endpoint.

Two threads per episode:

    executor  (thread "robot-executor") owns the ``Robot``: resets it, then every control period executes what the
              episode's ``ChunkSchedule`` says: the next action of the current chunk, a wait for the next chunk, or,
              past its deadline, the robot's safe hold action. A finished chunk's frames/actions/states go onto the
              observation queue (unless the episode ends with it: nobody would run the chunk it asks for).
    requester (the calling thread) owns the ``PolicyClient`` and speaks the wire contract of ``services.protocol``:
              reset -> chunk 0; async: an empty request -> chunk 1 (planned from chunk 0's imagined outcome); then
              each finished chunk k is sent and answered with chunk k+2 (async) / k+1 (sync).

Deadlines, holds, stalls and pacing are ``services.robot_client.schedule``'s (pure, tested without time); a robot's
``Timing`` comes from its settings, and a simulator can run in lockstep with its policy (``Timing.lockstep``: every
chunk awaited, nothing held), which is how the gate runs this same runtime against an in-process server.

Routing and versions. An episode runs whole on one endpoint: ``endpoint``, or ``canary_endpoint`` for
``canary_percent`` % of the episodes, chosen once from a hash of the session id (``services.robot_client.routing``).
It is pinned to the ``model_version`` of its first chunk: every later request (session restarts included) carries
it, a server that no longer serves that version refuses (``VersionUnavailable``), and a chunk of another version is
stale; either ends the episode in the safe hold, so one episode's chunks never come from two versions.

Safety. Every chunk is checked before it can run: NaN/inf or malformed chunks are rejected (never executed; the
session is reset), stale chunks are never executed (the episode ends), and out-of-limit commands are clipped to
the robot's limits (not rejected: a saturated command is still the policy's intent; ``saturated_actions`` counts
them). State-relative embodiments (Meta-World's delta actions) re-map each step's unified target against the live
state through the embodiment adapter. ``Robot.step`` refuses NaN/inf and out-of-limit commands itself as the last
line of defence.

Failures. An unreachable endpoint is retried with exponential backoff on a fresh channel while the robot holds; it
never aborts the episode (its step and time budgets do). "send reset=true" errors, timeouts and rejected chunks
restart the session (same endpoint, same model version) from the current observation; more than ``max_resets`` of
those in a row abort the episode in the safe hold. No exception escapes ``run_episode``: the reason lands in
``EpisodeStats.error``.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
import uuid
from collections import deque
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.data.embodiments import UNIFIED_DIM, get_adapter
from services.protocol import SEED_LIMIT, SESSION_ID_PATTERN, StepRequest, StepResponse
from services.robot_client.client import (
    Cancelled,
    EndpointUnavailable,
    NonFiniteChunk,
    PolicyClient,
    PolicyError,
    RequestRejected,
    SessionLost,
    VersionUnavailable,
)
from services.robot_client.robot import Observation, Robot
from services.robot_client.routing import CANARY, STABLE, route_for
from services.robot_client.schedule import Act, Chunk, ChunkSchedule, Pacer, Timing, Wait
from services.robot_client.settings import RobotSettings


@dataclass
class EpisodeStats:
    """What one episode did; ``to_dict()`` adds ``on_time_pct`` and latency percentiles."""

    task: str
    session_id: str
    mode: str
    route: str = STABLE  # "stable" | "canary": the endpoint the whole episode ran on
    endpoint: str | None = None
    success: bool = False
    steps: int = 0  # robot steps, holds included
    policy_steps: int = 0  # steps that executed a chunk's action
    steps_to_success: int | None = None
    chunks: int = 0  # chunks whose execution started
    on_time_chunks: int = 0
    late_chunks: int = 0
    latency_ms: list[float] = field(default_factory=list)  # request round trips, resets included
    stalls: int = 0
    stall_s: float = 0.0
    holds: int = 0  # hold actions executed
    resets: int = 0  # session restarts after the first reset
    reconnects: int = 0  # attempts on a fresh channel after the endpoint was unreachable
    rejected_chunks: int = 0  # NaN/inf or malformed: never executed
    nan_chunks: int = 0  # chunks the model produced with NaN/inf (refused by the server or by the robot)
    stale_chunks: int = 0  # from another model version than the episode's: never executed (the episode ends)
    saturated_actions: int = 0  # commands clipped to (or at) the robot's limits
    control_rate_hz: float | None = None
    model_version: str | None = None  # the version every chunk of the episode came from
    seed: int | None = None  # the sampler seed sent at reset (None: the server's choice)
    actions_digest: str = ""  # sha1 of the native commands executed, holds included (determinism checks)
    wall_s: float = 0.0
    ended: str | None = None  # success | done (the robot's horizon) | max_steps | timeout | stopped | aborted
    error: str | None = None  # why the episode was aborted (None: it was not)
    recovered_errors: list[str] = field(default_factory=list)  # the first error of each kind recovered from
    error_counts: dict[str, int] = field(default_factory=dict)  # recovered errors by kind (exception class)

    @property
    def on_time_pct(self) -> float | None:
        """Share of accounted chunks that arrived by their deadline, in percent (None before any)."""
        n = self.on_time_chunks + self.late_chunks
        return 100.0 * self.on_time_chunks / n if n else None

    def to_dict(self) -> dict:
        """JSON-friendly dict with ``on_time_pct`` and ``latency_ms_p50`` / ``_p99`` added."""
        out = asdict(self)
        out["on_time_pct"] = self.on_time_pct
        lat = np.asarray(self.latency_ms)
        out["latency_ms_p50"] = float(np.percentile(lat, 50)) if lat.size else None
        out["latency_ms_p99"] = float(np.percentile(lat, 99)) if lat.size else None
        return out


@dataclass
class _Executed:
    """One finished chunk as the next request reports it."""

    epoch: int
    frames: np.ndarray  # (N, V, H, W, 3) uint8, seen after each executed action
    actions: np.ndarray  # (N, A) float32, native, executed
    states: np.ndarray  # (N, S) float32, observed before each action


class _Abort(PolicyError):
    """A problem no session reset can fix (wrong embodiment/cameras): the episode ends in the safe hold."""


class ChunkRejected(SessionLost):
    """A chunk that must not run; the session is restarted (the episode ends for "stale"). ``kind``: "nan" (NaN/inf),
    "malformed" (shapes, rate), "stale" (another model version than the episode's) or "out_of_order" (another
    session's or chunk index)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_chunk(resp: StepResponse, *, session_id: str, model_version: str, chunk_index: int,
                action_dim: int) -> np.ndarray:
    """The chunk's unified targets (T, 30) float64 when it may run; raises ``ChunkRejected`` saying why not."""
    if resp.model_version != model_version:
        raise ChunkRejected("stale", f"stale chunk: model_version {resp.model_version!r}, the episode began on "
                                     f"{model_version!r}")
    if resp.session_id != session_id or resp.chunk_index != chunk_index:
        raise ChunkRejected("out_of_order", f"out of order: got chunk {resp.chunk_index} of {resp.session_id!r}, "
                                            f"expected {chunk_index} of {session_id!r}")
    targets, actions = np.asarray(resp.targets), np.asarray(resp.actions)
    steps = len(targets)
    if targets.ndim != 2 or targets.shape[1] != UNIFIED_DIM or steps == 0 or actions.shape != (steps, action_dim):
        raise ChunkRejected("malformed", f"malformed chunk {resp.chunk_index}: targets {targets.shape}, actions "
                                         f"{actions.shape}; expected (T, {UNIFIED_DIM}) and (T, {action_dim})")
    if not (np.isfinite(targets).all() and np.isfinite(actions).all()):
        raise ChunkRejected("nan", f"chunk {resp.chunk_index} contains NaN or inf; it was not executed")
    if not math.isfinite(resp.control_rate_hz) or resp.control_rate_hz <= 0:
        raise ChunkRejected("malformed", f"chunk {resp.chunk_index} has control_rate_hz {resp.control_rate_hz}")
    return targets.astype(np.float64)


class RobotRuntime:
    """Runs episodes of one ``Robot`` against a policy endpoint (see the module docstring for the behaviour).

    ``client`` / ``canary_client`` talk to ``settings.endpoint`` / ``settings.canary_endpoint`` (made from the settings
    when not given, and closed by ``close`` then); any object with ``PolicyClient``'s methods will do (the gate's
    ``InProcessClient``). ``timing``: deadlines and pacing (default: ``Timing.of(settings)``, real time).
    """

    def __init__(self, robot: Robot, settings: RobotSettings | None = None, client: PolicyClient | None = None,
                 canary_client: PolicyClient | None = None, timing: Timing | None = None) -> None:
        self.robot = robot
        self.settings = settings or RobotSettings()
        self.timing = timing or Timing.of(self.settings)
        self.adapter = get_adapter(robot.embodiment)  # unknown embodiment: ValueError naming the known ones
        if self.adapter.spec.native_action_dim != robot.limits.dim:
            raise ValueError(f"{type(robot).__name__} has {robot.limits.dim} action dims; embodiment "
                             f"{robot.embodiment!r} has {self.adapter.spec.native_action_dim}")
        hold = self.settings.hold_action
        if hold is not None and not robot.limits.contains(np.asarray(hold, np.float32)):
            raise ValueError(f"hold_action {hold} must be {robot.limits.dim} finite values within the robot's limits")
        self.client = client or PolicyClient.from_settings(self.settings)
        self.canary_client = canary_client
        if canary_client is None and self.settings.canary_endpoint:
            self.canary_client = PolicyClient.from_settings(self.settings, self.settings.canary_endpoint)
        self._owned = [c for c, given in ((self.client, client), (self.canary_client, canary_client))
                       if given is None and c is not None]
        self._episode: _Episode | None = None

    def route(self, session_id: str) -> str:
        """``"stable"`` or ``"canary"``: where the episode with this session id runs, all of it."""
        if self.canary_client is None:
            return STABLE
        return route_for(session_id, self.settings.canary_percent)

    def run_episode(self, task: str, *, max_steps: int | None = None, episode_id: str | None = None,
                    seed: int | None = None) -> EpisodeStats:
        """One episode of ``task`` (the instruction sent at reset); never raises for runtime failures.

        Its session id is ``<robot_id>-<episode_id>`` (default: a random id), which also picks its endpoint.
        ``seed``: the policy's sampler seed for the episode (default: the server derives one from the session id);
        with lockstep timing, the same seed, model and robot give the same actions.
        """
        session_id = f"{self.settings.robot_id}-{episode_id or uuid.uuid4().hex[:12]}"
        if not SESSION_ID_PATTERN.fullmatch(session_id):
            raise ValueError(f"episode_id {episode_id!r} makes the session id {session_id!r}: use 1-128 of "
                             "[A-Za-z0-9._:-] in all")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < SEED_LIMIT):
            raise ValueError(f"seed must be an int in [0, 2**63) or None, got {seed!r}")
        route = self.route(session_id)
        client = self.canary_client if route == CANARY else self.client
        self._episode = _Episode(self, client, route, task, session_id, max_steps or self.settings.max_steps, seed)
        try:
            return self._episode.run()
        finally:
            self._episode = None

    @property
    def stats(self) -> EpisodeStats | None:
        """The running episode's live stats (for monitoring: read, never written, from other threads)."""
        episode = self._episode
        return None if episode is None else episode.stats

    def stop(self) -> None:
        """End the running episode (if any) from another thread: the robot stops after its current step."""
        episode = self._episode
        if episode is not None:
            episode.end("stopped")

    def close(self) -> None:
        """Close the clients this runtime made (the robot and given clients belong to the caller)."""
        for client in self._owned:
            client.close()

    def __enter__(self) -> RobotRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Episode:
    """The state one episode's executor and requester share; every field below ``_cv`` is guarded by it."""

    def __init__(self, runtime: RobotRuntime, client: PolicyClient, route: str, task: str, session_id: str,
                 max_steps: int | None, seed: int | None) -> None:
        self.robot, self.client, self.s = runtime.robot, client, runtime.settings
        self.adapter, self.timing = runtime.adapter, runtime.timing
        self.task, self.session_id, self.seed = task, session_id, seed
        horizon = getattr(self.robot, "horizon", None)
        self.max_steps = max_steps or horizon or 10**9  # the wall-clock bound still applies
        self.stats = EpisodeStats(task=task, session_id=session_id, mode=self.s.mode, route=route,
                                  endpoint=client.endpoint, seed=seed)
        self.version: str | None = None  # the model version the episode is pinned to, from its first chunk
        # binds the server's session to this robot: its restarts may reset the id, nobody else can while it is live
        self.token = secrets.token_urlsafe(24)
        self._cv = threading.Condition()
        self._stop = False
        self._epoch = 0  # bumped by the requester at every session (re)start
        self._exec_epoch = 0  # the epoch the executor has switched to
        self._latest: Observation | None = None
        self._pending: deque[Chunk] = deque()
        self._finished: deque[_Executed] = deque()
        self._resets_in_row = 0
        self._schedule: ChunkSchedule | None = None  # executor only, from the robot's reset on
        self._digest = hashlib.sha1()  # executor only: the commands executed

    # --- orchestration --------------------------------------------------------------------------------------

    def run(self) -> EpisodeStats:
        t0 = time.perf_counter()
        self._deadline_at = t0 + self.s.episode_timeout_s
        executor = threading.Thread(target=self._execute, name="robot-executor", daemon=True)
        executor.start()
        try:
            self._request()
        except Exception as exc:  # a bug or an unexpected client failure: end in the safe hold, report it
            self._abort(f"requester: {type(exc).__name__}: {exc}")
        finally:
            self._shutdown()
            executor.join(timeout=30.0)  # it stops within one step; a hung robot is left to its daemon thread
        self.stats.wall_s = time.perf_counter() - t0
        return self.stats

    def _shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        self.client.cancel()

    def end(self, why: str) -> None:
        """Stop both threads; the first reason given is the one recorded."""
        with self._cv:
            if self.stats.ended is None:
                self.stats.ended = why
        self._shutdown()

    def _abort(self, reason: str) -> None:
        with self._cv:
            if self.stats.error is None and self.stats.ended is None:
                self.stats.error = reason
        self.end("aborted")

    def _note(self, err: Exception) -> None:
        kind, counts = type(err).__name__, self.stats.error_counts
        if kind not in counts:
            self.stats.recovered_errors.append(f"{kind}: {err}")
        counts[kind] = counts.get(kind, 0) + 1

    # --- executor thread ------------------------------------------------------------------------------------

    def _execute(self) -> None:
        try:
            self._execute_loop()
        except Exception as exc:  # the robot failed: nothing more may be commanded
            self._abort(f"robot: {type(exc).__name__}: {exc}")
        finally:
            if self._schedule is not None:  # the episode may have ended while holding
                self._schedule.close(time.perf_counter())
            self.stats.actions_digest = self._digest.hexdigest()
            self._shutdown()

    def _execute_loop(self) -> None:
        robot, st, timing = self.robot, self.stats, self.timing
        obs = robot.reset()
        with self._cv:
            self._latest = obs
            self._cv.notify_all()
        rate = timing.control_rate_hz or self.adapter.spec.control_rate_hz
        schedule = self._schedule = ChunkSchedule(timing, time.perf_counter(), counts=st)
        pacer = Pacer()
        frames: list[np.ndarray] = []
        actions: list[np.ndarray] = []
        states: list[np.ndarray] = []
        last_action: np.ndarray | None = None
        paused = False  # the robot waited for a chunk: its next step starts a new schedule (no catch-up burst)
        while True:
            if st.steps >= self.max_steps:
                return self.end("max_steps")
            if time.perf_counter() >= self._deadline_at:
                return self.end("timeout")
            with self._cv:
                if self._stop:
                    return
                if self._exec_epoch != self._epoch:  # the session restarts: drop what belonged to the old one
                    schedule.drop()
                    frames, actions, states = [], [], []
                    self._exec_epoch = self._epoch
                    self._cv.notify_all()
                chunk = None
                if schedule.wants_chunk:
                    while self._pending and self._pending[0].epoch != self._epoch:
                        self._pending.popleft()
                    chunk = self._pending.popleft() if self._pending else None
                now = time.perf_counter()
                todo = schedule.next(now, chunk)
                if chunk is not None and not timing.control_rate_hz:
                    rate = chunk.control_rate_hz
                if isinstance(todo, Wait):
                    if now >= self._deadline_at:
                        return self.end("timeout")
                    until = min(todo.until, self._deadline_at)
                    self._cv.wait(timeout=until - now if until < math.inf else None)  # a chunk's arrival wakes it
                    paused = True
                    continue
            state = obs.state
            if isinstance(todo, Act):
                epoch = schedule.chunk.epoch
                native = self.adapter.to_native(todo.target[None], state[None])[0]
                action = robot.limits.clip(native)
                if np.isclose(action, robot.limits.low).any() or np.isclose(action, robot.limits.high).any():
                    st.saturated_actions += 1
            else:
                hold = self.s.hold_action
                action = np.asarray(hold if hold is not None else robot.hold_action(last_action), np.float32)
            if timing.paced:
                now = time.perf_counter()
                time.sleep(max(0.0, pacer.due(now, 1.0 / rate, restart=paused) - now))
            paused = False
            outcome = robot.step(action)
            self._digest.update(np.asarray(action, np.float32).tobytes())
            obs = robot.observe()
            last_action = action
            st.steps += 1
            with self._cv:
                self._latest = obs
            if outcome.success:
                st.success, st.steps_to_success = True, st.steps
            ends = "success" if outcome.success else "done" if outcome.done else \
                "max_steps" if st.steps >= self.max_steps else None
            if isinstance(todo, Act):
                st.policy_steps += 1
                frames.append(obs.frames)
                actions.append(action)
                states.append(state)
                if schedule.stepped(time.perf_counter()):
                    if ends is None:  # the chunk that ends the episode is not reported: nobody runs the next one
                        done = _Executed(epoch, np.stack(frames), np.stack(actions), np.stack(states))
                        with self._cv:
                            if epoch == self._epoch:
                                self._finished.append(done)
                                self._cv.notify_all()
                    frames, actions, states = [], [], []
            else:
                st.holds += 1
            if ends is not None:
                return self.end(ends)

    # --- requester (calling thread) -------------------------------------------------------------------------

    def _request(self) -> None:
        first = True
        while True:
            try:
                self._session(first)
                return
            except Cancelled:
                return
            except _Abort as err:
                self._abort(str(err))
                return
            except VersionUnavailable as err:  # the endpoint moved on from this episode's version
                self._abort(f"the episode runs on model version {self.version!r}; the endpoint refused it: {err}")
                return
            except (SessionLost, RequestRejected) as err:
                self._note(err)
                if isinstance(err, NonFiniteChunk):
                    self.stats.nan_chunks += 1
                self._resets_in_row += 1
                if self._resets_in_row > self.s.max_resets:
                    self._abort(f"gave up after {self.s.max_resets} session resets in a row; last error: "
                                f"{type(err).__name__}: {err}")
                    return
                # back off exponentially while restarts fail in a row (a chunk of a session resets the count)
                delay = self.s.backoff_initial_s * 2 ** (self._resets_in_row - 1)
                if not self._sleep(min(delay, self.s.backoff_max_s)):
                    return
            first = False

    def _session(self, first: bool) -> None:
        """One session from its reset until the episode ends (returns) or it must restart (raises)."""
        epoch, obs = self._begin(first)
        if not first:
            self.stats.resets += 1
        mode = self.s.mode
        # a restart carries the episode's version: the server starts it there or refuses
        resp = self._call(StepRequest(self.session_id, reset=True, instruction=self.task, mode=mode,
                                      cameras=tuple(self.robot.cameras), model_version=self.version,
                                      session_token=self.token, seed=self.seed, images=obs.frames[None],
                                      state=obs.state[None]))
        self._check_endpoint(resp)
        if self.version is None:
            self.version = self.stats.model_version = resp.model_version
        self._accept(resp, epoch, expected=0)
        seq = 1
        if mode == "async":  # chunk 0 is executing now; the server plans chunk 1 from its imagined outcome
            self._accept(self._call(StepRequest(self.session_id, mode=mode, seq=seq, model_version=self.version,
                                                session_token=self.token)), epoch, seq)
            seq += 1
        while True:
            done = self._next_executed(epoch)
            if done is None:
                raise Cancelled("episode over")
            resp = self._call(StepRequest(self.session_id, mode=mode, seq=seq, model_version=self.version,
                                          session_token=self.token, images=done.frames, actions=done.actions,
                                          state=done.states))
            self._accept(resp, epoch, seq)
            seq += 1

    def _begin(self, first: bool) -> tuple[int, Observation]:
        """Start a session epoch: the executor drops the old session's chunks; returns the observation to reset on."""
        with self._cv:
            self._epoch += 1
            self._pending.clear()
            self._finished.clear()
            self._cv.notify_all()
            epoch = self._epoch
            # the executor acknowledges within one control period (it may be mid-step); first: wait for reset()
            while not self._stop and (self._latest is None or (not first and self._exec_epoch != epoch)):
                self._cv.wait(timeout=0.5)
            if self._stop:
                raise Cancelled("episode over")
            return epoch, self._latest

    def _call(self, request: StepRequest) -> StepResponse:
        """One round trip; an unreachable endpoint is retried on a fresh channel with exponential backoff."""
        backoff = self.s.backoff_initial_s
        while True:
            with self._cv:
                if self._stop:
                    raise Cancelled("episode over")
            t0 = time.perf_counter()
            try:
                resp = self.client.step(request)
            except EndpointUnavailable as err:
                self._note(err)
                self.client.reconnect()
                if not self._sleep(backoff):
                    raise Cancelled("episode over") from None
                backoff = min(2 * backoff, self.s.backoff_max_s)
                self.stats.reconnects += 1
                continue
            self.stats.latency_ms.append(1000.0 * (time.perf_counter() - t0))
            return resp

    def _check_endpoint(self, resp: StepResponse) -> None:
        robot = self.robot
        if resp.embodiment != robot.embodiment:
            raise _Abort(f"the endpoint serves embodiment {resp.embodiment!r}; this robot is {robot.embodiment!r}")
        if resp.cameras and tuple(resp.cameras) != tuple(robot.cameras):
            raise _Abort(f"the endpoint expects cameras {list(resp.cameras)}; this robot has {list(robot.cameras)}")
        if resp.image_size is not None and resp.image_size != robot.image_size:
            raise _Abort(f"the endpoint expects {resp.image_size} px images; this robot renders {robot.image_size}")

    def _accept(self, resp: StepResponse, epoch: int, expected: int) -> None:
        """Check a chunk and hand it to the executor, or raise so the session restarts (the episode ends for a chunk
        of another model version)."""
        try:
            targets = check_chunk(resp, session_id=self.session_id, model_version=self.version, chunk_index=expected,
                                  action_dim=self.robot.limits.dim)
        except ChunkRejected as err:
            if err.kind == "stale":
                self.stats.stale_chunks += 1
                raise _Abort(f"{err}: an episode never changes model version") from None
            if err.kind != "out_of_order":
                self.stats.rejected_chunks += 1
            if err.kind == "nan":
                self.stats.nan_chunks += 1
            raise
        if self.timing.paced:
            self.stats.control_rate_hz = self.timing.control_rate_hz or resp.control_rate_hz
        if expected > 0:
            self._resets_in_row = 0  # the session is making progress again
        with self._cv:
            if epoch == self._epoch and not self._stop:
                self._pending.append(Chunk(epoch, expected, targets, time.perf_counter(), resp.control_rate_hz))
                self._cv.notify_all()

    def _next_executed(self, epoch: int) -> _Executed | None:
        with self._cv:
            while not self._stop:
                while self._finished and self._finished[0].epoch != epoch:
                    self._finished.popleft()
                if self._finished:
                    return self._finished.popleft()
                self._cv.wait(timeout=0.5)
            return None

    def _sleep(self, seconds: float) -> bool:
        """Wait ``seconds`` unless the episode ends first; returns whether it is still running."""
        end = time.perf_counter() + seconds
        with self._cv:
            while not self._stop:
                left = end - time.perf_counter()
                if left <= 0:
                    return True
                self._cv.wait(timeout=left)
            return False
