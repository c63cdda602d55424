"""Prometheus metrics of the policy server, in prometheus_client's default registry (kserve serves it on /metrics)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUEST_SECONDS = Histogram(
    "lingbot_serve_request_seconds", "server-side latency of one step request (validation, queueing, model passes)",
    ["model_name", "kind", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
_MS_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
COMPUTE_SECONDS = Histogram(
    "lingbot_serve_compute_seconds", "model time of one request: from its batch's start until its chunk was ready "
    "(the response parameter compute_us)", ["model_name", "kind"], buckets=_MS_BUCKETS,
)
QUEUE_SECONDS = Histogram(
    "lingbot_serve_queue_seconds", "time one request waited for its batch (the response parameter queue_us)",
    ["model_name"], buckets=_MS_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "lingbot_serve_decode_seconds", "time from the transport's message to a checked request (decode_us)",
    ["model_name"], buckets=(0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1),
)
REQUEST_BYTES = Histogram(
    "lingbot_serve_request_bytes", "tensor bytes of one request (images, actions, state)", ["model_name"],
    buckets=(0, 1 << 10, 1 << 14, 1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22, 1 << 24, 1 << 26),
)
BATCH_SIZE = Histogram(
    "lingbot_serve_batch_size", "requests served by one batch of model passes", ["model_name"],
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
)
ACTIVE_SESSIONS = Gauge("lingbot_serve_active_sessions", "sessions held by the server", ["model_name"])
SESSION_BYTES = Gauge("lingbot_serve_session_bytes", "estimated bytes of the sessions' caches", ["model_name"])
EVICTIONS = Counter("lingbot_serve_evictions_total", "sessions evicted", ["model_name", "reason"])
MODEL_VERSION = Gauge("lingbot_serve_model_version_info", "1 for the model version new sessions start on, 0 for "
                      "older versions still serving their sessions", ["model_name", "version"])
MODEL_SWITCHES = Counter("lingbot_serve_model_switches_total", "switches to a new model version", ["model_name"])
