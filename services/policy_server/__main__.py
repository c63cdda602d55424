"""``python -m services.policy_server``: the policy server in kserve's ``__main__`` style.

    python -m services.policy_server --model models:/lingbot-va-reach-v3@champion --http_port 8080 --grpc_port 8081

The same flags as ``lingbot serve``: the kserve ModelServer flags it passes on plus the policy server's own
(``services.policy_server.commands.add_arguments``; also read from ``LINGBOT_SERVE_*``).
"""

from __future__ import annotations

import argparse
import sys

from services.policy_server.commands import add_arguments, serve_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.policy_server")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return serve_command(args)
    except ValueError as err:  # user mistakes (bad model URI, bad settings): one clear line
        print(f"policy_server: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
