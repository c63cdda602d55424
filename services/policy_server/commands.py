"""`lingbot serve`: the policy server's flags (ours + kserve's standard ModelServer flags) and its entry point."""

from __future__ import annotations

import argparse
from pathlib import Path


class _RefuseToken(argparse.Action):
    """``--token`` is refused: a secret on the command line shows in ``ps`` and shell history."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--token is refused: a token on the command line shows in ps; pass --token-file PATH or set "
                     "LINGBOT_SERVE_TOKEN / LINGBOT_SERVE_TOKEN_FILE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The policy server's own flags; unset ones fall back to ``LINGBOT_SERVE_*`` / ``.env`` / defaults."""
    g = parser.add_argument_group("policy server")
    g.add_argument("--model", help="models:/lingbot-va-<task>@champion (followed as the alias moves), "
                                   "models:/<name>/<version> or a model directory")
    g.add_argument("--host", help="interface to bind REST and gRPC to (default 127.0.0.1)")
    g.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    g.add_argument("--token-file", type=Path, help="file holding the bearer token required on inference calls "
                                                   "(or LINGBOT_SERVE_TOKEN / LINGBOT_SERVE_TOKEN_FILE; default: none)")
    g.add_argument("--tracking-uri", help="MLflow tracking URI (default: sqlite under the data dir)")
    g.add_argument("--data-dir", type=Path, help="data root: MLflow store, downloaded models")
    g.add_argument("--device", help="torch device (default cpu)")
    g.add_argument("--seed", type=int, help="base seed of the sessions' samplers")
    g.add_argument("--batching", action=argparse.BooleanOptionalAction, default=None,
                   help="batch concurrent sessions' model passes (default on)")
    g.add_argument("--max-batch-size", type=int, help="most sessions in one batched model pass")
    g.add_argument("--max-wait-ms", type=float, help="batching window after the first request")
    g.add_argument("--active-session-s", type=float, help="sessions that sent a request this recently may join a "
                                                          "batch; the window closes once all are in (0: never early)")
    g.add_argument("--max-sessions", type=int, help="sessions kept (LRU eviction beyond)")
    g.add_argument("--session-ttl-s", type=float, help="idle time after which a session is evicted")
    g.add_argument("--max-session-memory-mb", type=float, help="cap on the sessions' cache memory (0: none)")
    g.add_argument("--max-request-mb", type=float, help="largest request accepted")
    g.add_argument("--poll-interval-s", type=float, help="registry alias poll interval (0: never)")
    g.add_argument("--old-sessions", choices=["finish", "reset"], help="on a model switch: finish on the old "
                                                                       "version or tell sessions to reset")
    # kserve's --model_name defaults to "model"; None lets LINGBOT_SERVE_MODEL_NAME / "lingbot-va" decide
    parser.set_defaults(model_name=None)


def settings_from_args(args: argparse.Namespace):
    """``ServeSettings`` from the environment, overridden by the flags that were given."""
    from services.policy_server.settings import ServeSettings

    names = ["model", "model_name", "host", "token_file", "tracking_uri", "data_dir", "device", "seed", "batching",
             "max_batch_size", "max_wait_ms", "active_session_s", "max_sessions", "session_ttl_s",
             "max_session_memory_mb", "max_request_mb", "poll_interval_s", "old_sessions"]
    return ServeSettings(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None})


def serve_command(args: argparse.Namespace) -> int:
    """Load the model, start REST + gRPC, serve until SIGINT/SIGTERM."""
    import mlflow

    from pipelines.train.registry import default_tracking_uri
    from services.policy_server.predictor import LingBotPredictor
    from services.policy_server.server import PolicyModelServer

    settings = settings_from_args(args)
    if settings.model and str(settings.model).startswith("models:/"):
        mlflow.set_tracking_uri(settings.tracking_uri or default_tracking_uri(settings.data_dir))
    predictor = LingBotPredictor(settings)
    predictor.load()
    server = PolicyModelServer(
        host=settings.host, token=settings.token.get_secret_value() if settings.token else None,
        max_request_bytes=settings.max_request_bytes, http_port=args.http_port, grpc_port=args.grpc_port,
        workers=args.workers, max_threads=args.max_threads, max_asyncio_workers=args.max_asyncio_workers,
        enable_grpc=args.enable_grpc, enable_docs_url=args.enable_docs_url,
        enable_latency_logging=args.enable_latency_logging, access_log_format=args.access_log_format,
        event_loop=args.event_loop, timeout_keep_alive=args.timeout_keep_alive, grace_period=5)
    server.start([predictor])
    return 0


KSERVE_FLAGS = ("http_port", "grpc_port", "workers", "max_threads", "max_asyncio_workers", "enable_grpc",
                "enable_docs_url", "enable_latency_logging", "access_log_format", "event_loop", "timeout_keep_alive")
"""The kserve ModelServer flags `lingbot serve` passes on (``serve_command``); kserve's transformer / predictor-proxy,
SSL, logging-config and model-name flags do nothing here, so they are not offered."""


class _ServeParser(argparse.ArgumentParser):
    """Adds kserve's standard server flags (``kserve.model_server.parser``, those in ``KSERVE_FLAGS``) when `lingbot
    serve` is parsed: importing kserve takes seconds, which the other `lingbot` commands should not pay."""

    _kserve_added = False

    def parse_known_args(self, args=None, namespace=None):
        if not self._kserve_added:
            from kserve.model_server import parser as kserve_parser

            group = self.add_argument_group("kserve model server")
            for action in kserve_parser._actions:
                if action.dest in KSERVE_FLAGS:
                    group._add_action(action)  # shared, as ArgumentParser(parents=[...]) shares them
            self._kserve_added = True
            self.set_defaults(model_name=None)
        return super().parse_known_args(args, namespace)


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lingbot serve` on the `lingbot` command line."""
    default_class, sub._parser_class = sub._parser_class, _ServeParser
    try:
        serve = sub.add_parser("serve", help="serve action chunks to robots (KServe V2, REST + gRPC, sessions)")
    finally:
        sub._parser_class = default_class
    add_arguments(serve)
    serve.set_defaults(func=serve_command)
