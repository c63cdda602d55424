"""`lingbot serve`: the policy server's flags (ours + kserve's standard ModelServer flags) and its entry point."""

from __future__ import annotations

import argparse

from kserve.model_server import parser as kserve_parser

from pipelines.settings import add_settings_flags, settings_from_flags
from services.policy_server.settings import ServeSettings

KSERVE_FLAGS = ("http_port", "grpc_port", "workers", "max_threads", "max_asyncio_workers", "enable_grpc",
                "enable_docs_url", "enable_latency_logging", "access_log_format", "event_loop", "timeout_keep_alive")
"""The kserve ModelServer flags `lingbot serve` passes on (``serve_command``); kserve's transformer / predictor-proxy,
SSL, logging-config and model-name flags do nothing here, so they are not offered."""


class _RefuseToken(argparse.Action):
    """``--token`` is refused: a secret on the command line shows in ``ps`` and shell history."""

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error("--token is refused: a token on the command line shows in ps; pass --token-file PATH or set "
                     "LINGBOT_SERVE_TOKEN / LINGBOT_SERVE_TOKEN_FILE")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The policy server's own flags (from ``ServeSettings``; unset ones fall back to ``LINGBOT_SERVE_*`` / ``.env``
    / defaults) and kserve's server flags in ``KSERVE_FLAGS``, as kserve's parser defines them."""
    g = parser.add_argument_group("policy server")
    add_settings_flags(g, ServeSettings, exclude=("token",))
    g.add_argument("--token", action=_RefuseToken, help=argparse.SUPPRESS)
    k = parser.add_argument_group("kserve model server")
    for action in kserve_parser._actions:  # read only: kserve offers no list of its flags
        if action.dest in KSERVE_FLAGS:
            k.add_argument(*action.option_strings, dest=action.dest, default=action.default, type=action.type,
                           choices=action.choices, help=action.help)


def serve_command(args: argparse.Namespace) -> int:
    """Load the model, start REST + gRPC, serve until SIGINT/SIGTERM."""
    import mlflow

    from services.policy_server.predictor import LingBotPredictor
    from services.policy_server.server import PolicyModelServer

    settings = settings_from_flags(ServeSettings, args)
    if settings.model and str(settings.model).startswith("models:/"):
        mlflow.set_tracking_uri(settings.mlflow_uri)
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register `lingbot serve` on the `lingbot` command line."""
    serve = sub.add_parser("serve", help="serve action chunks to robots (KServe V2, REST + gRPC, sessions)")
    add_arguments(serve)
    serve.set_defaults(func=serve_command)
