"""`lingbot fleet`: N simulated Meta-World robots against one policy endpoint; prints a table, can write JSON."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from pipelines.settings import add_settings_flags, settings_from_flags
from services.fleet.settings import FleetSettings
from services.robot_client.settings import RobotSettings

ROBOT_FLAGS = ("endpoint", "canary_endpoint", "canary_percent", "transport", "mode", "control_rate_hz", "deadline_ms",
               "max_steps")
"""The robot settings a fleet run sets from its command line; the rest (identity, token, timeouts) stay the robots'
environment's."""
FLEET_FLAGS = ("robots", "task", "episodes", "image_size")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("fleet", help="run simulated Meta-World robots against a policy endpoint")
    add_settings_flags(p, RobotSettings, fields=ROBOT_FLAGS)
    add_settings_flags(p, FleetSettings, fields=FLEET_FLAGS)
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.set_defaults(func=fleet_command)


def fleet_command(args: argparse.Namespace) -> int:
    from services.fleet.fleet import run_fleet, table

    robot = settings_from_flags(RobotSettings, args, fields=ROBOT_FLAGS)
    fleet = settings_from_flags(FleetSettings, args, fields=FLEET_FLAGS)
    # kserve's client logs a traceback for every failed call; the runtime counts and reports them instead
    logging.getLogger("kserve.trace").setLevel(logging.CRITICAL)
    rep = run_fleet(fleet, robot)
    print(table(rep))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rep, indent=1) + "\n")
    return 0 if rep["overall"]["errors"] == 0 else 1
