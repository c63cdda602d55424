"""Which endpoint serves a robot episode: a canary is split per episode, never per request.

An episode is one server session, and its KV cache lives in one server process: every request of the episode must
reach that process, and every chunk must come from the model version it began on. A per-request split (a weighted
route in front of the stable and canary pods) sends an episode's next request to a pod that does not know its
session. So the robot chooses, once per episode, between two addresses it can reach directly: in KServe's Standard
mode each predictor of an InferenceService ``<isvc>`` is its own Deployment behind its own Service, the stable
``<isvc>-predictor`` and a canary named ``c`` ``<isvc>-c-predictor``, each selecting only its own pods.

The choice is a pure function of the episode's session id (``<robot_id>-<episode id>``): the same episode maps to
the same endpoint on any robot, process or Python (no salted ``hash()``), the share of canary episodes approaches
the percent across robots and episodes, and raising the percent only moves episodes from stable to canary.
"""

from __future__ import annotations

import hashlib

STABLE, CANARY = "stable", "canary"


def canary_bucket(key: str) -> float:
    """Where ``key`` lands in [0, 100): the first 8 bytes of its SHA-256 as a share of 2**64, in percent."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "big") * 100.0 / 2**64


def route_for(key: str, canary_percent: float) -> str:
    """``CANARY`` when the episode keyed ``key`` lands below ``canary_percent`` (0-100), else ``STABLE``."""
    if not 0.0 <= canary_percent <= 100.0:
        raise ValueError(f"canary_percent must be within 0..100, got {canary_percent}")
    return CANARY if canary_bucket(key) < canary_percent else STABLE
