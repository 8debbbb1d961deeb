"""`python -m dash_app --run RUN_DIR [--host 127.0.0.1] [--port 8050]`: serve the explorer."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from influence.runs import InfluenceError


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dash_app", description=__doc__)
    parser.add_argument("--run", required=True, help="the run directory to browse")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--debug", action="store_true", help="Dash debug mode (development only)")
    args = parser.parse_args(argv)
    from dash_app.app import create_app

    try:
        app = create_app(args.run)
    except InfluenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"explorer: http://{args.host}:{args.port}/ (run {args.run})")
    app.run(host=args.host, port=args.port, debug=args.debug)
    return 0


if __name__ == "__main__":
    sys.exit(main())
