"""Per-robot-episode sessions and the bounded store that holds them.

A ``Session`` owns one ``EpisodePolicy`` (KV cache + VAE stream) and the bookkeeping of Algorithm 1/2 across
requests: how many chunks were returned and how many of them the robot reported executed. The store bounds the
sessions by count (LRU), idle time and estimated memory; an evicted id is remembered for a while so its next request
is told why it must reset.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from model.policy import EpisodePolicy, Plan
from services.policy_server.models import ModelHandle

_REMEMBER_EVICTED = 4096  # evicted ids kept for the error message


@dataclass(eq=False)
class Session:
    """One robot episode on the server."""

    session_id: str
    handle: ModelHandle
    episode: EpisodePolicy
    mode: str
    instruction: str
    frame_shape: tuple[int, ...]  # (V, H, W, 3) of this episode's frames
    last_state: np.ndarray  # (S,) the latest robot state reported
    token: str = ""  # the session_token of the client that opened it
    returned: int = 0  # chunks returned so far; the next response is chunk `returned`
    reported: int = 0  # chunks whose executed frames were observed
    last_plan: Plan | None = None  # the chunk returned last (in async mode: executing while the next is planned)
    last_used: float = field(default_factory=time.monotonic)
    nbytes: int = 0

    @property
    def outstanding(self) -> int:
        """Chunks returned but not yet reported executed."""
        return self.returned - self.reported

    def estimate_bytes(self) -> int:
        """Bytes of the tensors this session keeps alive: KV cache keys/values and the VAE's causal conv cache."""
        total = 0
        # a policy without a model session or VAE stream (the gate's blind-replay baseline) keeps neither cache
        cache = getattr(getattr(self.episode, "session", None), "cache", None)
        for t in [*cache.k, *cache.v] if cache is not None else []:
            total += t.nbytes if isinstance(t, torch.Tensor) else 0
        for t in getattr(getattr(self.episode, "stream", None), "_cache", None) or []:
            total += t.nbytes if isinstance(t, torch.Tensor) else 0
        self.nbytes = total
        return total


class SessionStore:
    """Thread-safe map session_id -> Session, bounded by count, idle time and memory.

    ``on_evict(reason, n)`` is told about every eviction (for the metrics).
    """

    def __init__(self, max_sessions: int, ttl_s: float, max_bytes: int = 0,
                 on_evict: Callable[[str, int], None] | None = None, clock: Callable[[], float] = time.monotonic):
        self.max_sessions, self.ttl_s, self.max_bytes = max_sessions, ttl_s, max_bytes
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._evicted: OrderedDict[str, str] = OrderedDict()  # id -> why
        self._lock = threading.Lock()
        self._on_evict = on_evict or (lambda reason, n: None)
        self._clock = clock

    def __len__(self) -> int:
        return len(self._sessions)

    def get(self, session_id: str) -> Session | None:
        """The session (marked as just used), or None."""
        with self._lock:
            session = self._sessions.get(session_id)
            if session is not None:
                session.last_used = self._clock()
                self._sessions.move_to_end(session_id)
            return session

    def peek(self, session_id: str) -> Session | None:
        """The session without marking it used (a refused request must not keep it alive)."""
        with self._lock:
            return self._sessions.get(session_id)

    def why_missing(self, session_id: str) -> str | None:
        """Why ``session_id`` was evicted, if it was (recently)."""
        with self._lock:
            return self._evicted.get(session_id)

    def put(self, session: Session) -> None:
        """Add or replace a session; evicts the least recently used ones beyond ``max_sessions``."""
        with self._lock:
            session.last_used = self._clock()
            self._sessions[session.session_id] = session
            self._sessions.move_to_end(session.session_id)
            self._evicted.pop(session.session_id, None)
            while len(self._sessions) > self.max_sessions:
                self._evict_oldest(f"evicted: more than max_sessions={self.max_sessions} sessions", "lru")

    def remove(self, session_id: str, why: str | None = None, reason: str | None = None) -> None:
        """Drop a session (closed, broken or on a retired model); ``why`` is remembered for its next request."""
        with self._lock:
            if self._sessions.pop(session_id, None) is not None and why:
                self._remember(session_id, why)
                if reason:
                    self._on_evict(reason, 1)

    def sweep(self) -> None:
        """Evict sessions idle beyond the TTL, then least recently used ones until under the memory cap."""
        with self._lock:
            now = self._clock()
            for sid in [s for s, sess in self._sessions.items() if now - sess.last_used > self.ttl_s]:
                del self._sessions[sid]
                self._remember(sid, f"evicted: idle for more than session_ttl_s={self.ttl_s:g}")
                self._on_evict("ttl", 1)
            if self.max_bytes:
                total = sum(s.nbytes for s in self._sessions.values())
                while total > self.max_bytes and len(self._sessions) > 1:  # the newest session always stays
                    total -= self._evict_oldest(f"evicted: sessions exceeded the memory cap of {self.max_bytes} "
                                                "bytes", "memory").nbytes

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def clear(self) -> None:
        with self._lock:
            self._sessions.clear()

    def _evict_oldest(self, why: str, reason: str) -> Session:
        sid, session = self._sessions.popitem(last=False)
        self._remember(sid, why)
        self._on_evict(reason, 1)
        return session

    def _remember(self, session_id: str, why: str) -> None:
        self._evicted[session_id] = why
        self._evicted.move_to_end(session_id)
        while len(self._evicted) > _REMEMBER_EVICTED:
            self._evicted.popitem(last=False)
