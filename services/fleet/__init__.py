"""Simulated fleets: N Meta-World robots, one process each, against one policy endpoint (``lingbot fleet``).

``services.fleet.fleet.run_fleet(FleetSettings, RobotSettings) -> report``; ``table(report)`` renders it. Nothing
is imported here so that registering the CLI command stays cheap.
"""
