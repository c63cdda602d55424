"""`lingbot fleet`: N simulated Meta-World robots against one policy endpoint; prints a table, can write JSON."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="run simulated Meta-World robots against a policy endpoint")
    p.add_argument("--endpoint", default=None, help="gRPC host:port or REST http://host:port "
                                                    "(default: LINGBOT_ROBOT_ENDPOINT or 127.0.0.1:8081)")
    p.add_argument("--canary-endpoint", default=None, help="the canary's endpoint (same transport); whole episodes "
                                                           "run there (default: LINGBOT_ROBOT_CANARY_ENDPOINT)")
    p.add_argument("--canary-percent", type=int, default=None, help="share of episodes sent to the canary")
    p.add_argument("--transport", choices=["grpc", "rest"], default=None, help="KServe V2 over gRPC or REST")
    p.add_argument("--robots", type=int, default=None, help="robots, one process each")
    p.add_argument("--task", default=None, help="Meta-World task, e.g. reach-v3")
    p.add_argument("--episodes", type=int, default=None, help="episodes per robot")
    p.add_argument("--mode", choices=["async", "sync"], default=None, help="Algorithm 2 (async) or 1 (sync)")
    p.add_argument("--control-rate-hz", type=float, default=None, help="default: the endpoint's")
    p.add_argument("--deadline-ms", type=float, default=None, help="grace before a late chunk makes the robot hold")
    p.add_argument("--max-steps", type=int, default=None, help="robot steps per episode, holds included")
    p.add_argument("--image-size", type=int, default=None, help="frame side the model expects (default 96)")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.set_defaults(func=fleet_command)


def fleet_command(args: argparse.Namespace) -> int:
    from services.fleet.fleet import run_fleet, table
    from services.fleet.settings import FleetSettings
    from services.robot_client.settings import RobotSettings

    robot_over = {"endpoint": args.endpoint, "canary_endpoint": args.canary_endpoint,
                  "canary_percent": args.canary_percent, "transport": args.transport, "mode": args.mode,
                  "control_rate_hz": args.control_rate_hz, "deadline_ms": args.deadline_ms, "max_steps": args.max_steps}
    fleet_over = {"robots": args.robots, "task": args.task, "episodes": args.episodes, "image_size": args.image_size}
    try:
        robot = RobotSettings(**{k: v for k, v in robot_over.items() if v is not None})
        fleet = FleetSettings(**{k: v for k, v in fleet_over.items() if v is not None})
    except ValueError as err:  # pydantic's ValidationError: one line through the CLI's ValueError path
        raise ValueError(str(err).replace("\n", "; ")) from None
    # kserve's client logs a traceback for every failed call; the runtime counts and reports them instead
    logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)
    rep = run_fleet(fleet, robot)
    print(table(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0 if rep["overall"]["errors"] == 0 else 1
