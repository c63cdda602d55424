"""The edge runtime's chunk scheduling as plain state machines driven by explicit timestamps: which action runs next,
how long the robot may wait for a chunk, when it holds instead, and the on-time accounting. No threads, no sleeps:
``RobotRuntime``'s executor thread feeds them ``time.perf_counter()``, the tests feed them numbers.

Deadlines. The next chunk is *needed* when the current one runs out. It is on time if it arrived no later than
``Timing.deadline_s`` after that; until then the robot waits without moving. Past the deadline the robot executes
its hold action every control period and a stall is recorded (one per late chunk, with its duration). The first chunk
of an episode is awaited for ``Timing.first_chunk_s`` (the robot has not started) and not counted. Hold steps are
pauses the model never sees: they keep the robot still, so the last reported observation stays valid and chunk
boundaries stay aligned.

Lockstep. A simulator can stop its world while the policy thinks (``Timing.lockstep``): every chunk is awaited as
long as it takes, nothing is ever held, and steps run as fast as the simulator allows (or paced at a given rate). The
robot then executes exactly the actions the model planned, whatever the machine's load: the gate runs its rollouts so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from services.robot_client.settings import RobotSettings


@dataclass(frozen=True)
class Timing:
    """How an episode keeps time: how long chunks may be late, and how fast the robot steps."""

    deadline_s: float = 0.05  # how long past the moment it is needed a chunk may arrive before the robot holds
    first_chunk_s: float = 10.0  # how long the episode's first chunk is awaited (the robot has not started)
    control_rate_hz: float | None = None  # steps per second; None: the rate the endpoint serves with each chunk
    paced: bool = True  # False: step as fast as the robot allows (a simulator in lockstep with its policy)

    def __post_init__(self) -> None:
        if not self.deadline_s >= 0 or not self.first_chunk_s > 0:
            raise ValueError(f"deadline_s must be >= 0 and first_chunk_s > 0 (math.inf: wait as long as it takes), "
                             f"got {self.deadline_s} and {self.first_chunk_s}")
        if self.control_rate_hz is not None and not (0 < self.control_rate_hz < math.inf):
            raise ValueError(f"control_rate_hz must be a positive finite rate or None, got {self.control_rate_hz}")

    @classmethod
    def of(cls, settings: RobotSettings) -> Timing:
        """A robot's real-time timing from its settings (the mode's default deadline applied)."""
        return cls(deadline_s=settings.deadline_s, first_chunk_s=settings.request_timeout_s,
                   control_rate_hz=settings.control_rate_hz)

    @classmethod
    def lockstep(cls, control_rate_hz: float | None = None) -> Timing:
        """A simulator's timing: its world waits for every chunk (no deadline, no holds, no stalls); it steps at
        ``control_rate_hz`` or, without one, as fast as it can."""
        return cls(deadline_s=math.inf, first_chunk_s=math.inf, control_rate_hz=control_rate_hz,
                   paced=control_rate_hz is not None)


@dataclass
class Chunk:
    """A checked chunk, queued by the requester for the executor."""

    epoch: int  # the session (re)start it belongs to
    index: int
    targets: np.ndarray  # (T, 30) unified, denormalised
    arrived: float  # when it was queued (the clock the schedule runs on)
    control_rate_hz: float  # the rate the endpoint served it with


@dataclass
class ChunkCounts:
    """The schedule's accounting (``EpisodeStats`` carries the same fields and is updated in place)."""

    chunks: int = 0  # chunks whose execution started
    on_time_chunks: int = 0
    late_chunks: int = 0
    stalls: int = 0
    stall_s: float = 0.0


@dataclass(frozen=True)
class Act:
    """Execute ``target`` (30,), step ``step`` of the current chunk."""

    target: np.ndarray
    step: int


@dataclass(frozen=True)
class Wait:
    """Do nothing until ``until`` or until a chunk arrives, whichever is first (``math.inf``: until a chunk arrives),
    then ask again."""

    until: float


@dataclass(frozen=True)
class Hold:
    """Execute the robot's safe hold action for one control period (a stall is in progress)."""


HOLD = Hold()


class ChunkSchedule:
    """Which step runs when, for one episode; every method takes the current time.

    Per control step the caller asks ``next(now, chunk)`` -- passing the next queued chunk of the running session when
    ``wants_chunk`` (it is taken) -- and, after executing an ``Act``, reports it with ``stepped(now)``.
    ``counts`` (default: a fresh ``ChunkCounts``) is updated in place.
    """

    def __init__(self, timing: Timing, now: float, counts: ChunkCounts | None = None) -> None:
        self.timing = timing
        self.counts = counts if counts is not None else ChunkCounts()
        self.chunk: Chunk | None = None
        self.pos = 0
        self._need_t: float | None = now  # the first chunk is needed from the start
        self._started = False  # has the episode's first chunk arrived
        self._stall_t: float | None = None  # when the current hold began

    @property
    def wants_chunk(self) -> bool:
        """Whether the next ``next`` call would take a queued chunk (no chunk is running)."""
        return self.chunk is None

    @property
    def stalling(self) -> bool:
        return self._stall_t is not None

    def next(self, now: float, chunk: Chunk | None = None) -> Act | Wait | Hold:
        """What the robot does at ``now``. ``chunk``: the next queued chunk, taken only when ``wants_chunk``."""
        if self.chunk is None and chunk is not None:
            self._begin(chunk, now)
        if self.chunk is not None:
            return Act(self.chunk.targets[self.pos], self.pos)
        if self._need_t is None:  # a session restart dropped the running chunk: the next one is needed now
            self._need_t = now
        if self._stall_t is None:
            grace = self.timing.deadline_s if self._started else self.timing.first_chunk_s
            if now < self._need_t + grace:
                return Wait(self._need_t + grace)
            self.counts.stalls += 1
            self._stall_t = now
        return HOLD

    def stepped(self, now: float) -> bool:
        """The ``Act`` returned last was executed; True when that finished its chunk (the next is needed from now)."""
        if self.chunk is None:
            raise RuntimeError("stepped() without a running chunk: only an Act is reported")
        self.pos += 1
        if self.pos < len(self.chunk.targets):
            return False
        self.chunk, self.pos, self._need_t = None, 0, now
        return True

    def drop(self) -> None:
        """The session restarts: the chunk in progress (if any) is abandoned."""
        self.chunk, self.pos = None, 0

    def close(self, now: float) -> None:
        """The episode ended: a hold in progress counts until now."""
        if self._stall_t is not None:
            self.counts.stall_s += now - self._stall_t
            self._stall_t = None

    def _begin(self, chunk: Chunk, now: float) -> None:
        c = self.counts
        c.chunks += 1
        if self._started and self._need_t is not None:
            if chunk.arrived <= self._need_t + self.timing.deadline_s:
                c.on_time_chunks += 1
            else:
                c.late_chunks += 1
        self._started, self._need_t = True, None
        self.close(now)
        self.chunk, self.pos = chunk, 0


class Pacer:
    """When control steps run: one every period. A step asked for less than a period late runs at once and keeps the
    schedule; a later one, or the first after a pause (``restart``), starts the schedule from now instead of bursting
    to catch up."""

    def __init__(self) -> None:
        self._next: float | None = None

    def due(self, now: float, period_s: float, restart: bool = False) -> float:
        """When the step asked for at ``now`` runs (>= ``now``; the caller sleeps until then)."""
        tick = self._next
        if tick is None or now - tick > period_s or (restart and now > tick):
            tick = now
        self._next = tick + period_s
        return max(tick, now)
