"""`python -m dash_app --run RUN_DIR [--host 127.0.0.1] [--port 8050] [--threads 8] [--debug]`.

Serves the explorer with waitress, a production WSGI server: one process holding the run once
(its catalog, clusterings, faiss index and model), answering requests from a pool of threads.
A pre-forking server (gunicorn) would load the run again in every worker for no gain here:
a query's CPU work runs in numpy, faiss and torch, which release the GIL. `--debug` serves
with Flask's development server and Dash's debug tools instead, for working on the app.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from influence.runs import InfluenceError

#: Threads answering requests: enough that page loads and thumbnails are not stuck behind a
#: running upload query (queries themselves take turns, see RunData.query).
THREADS = 8


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dash_app",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run directory to browse")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"request threads of the server (default {THREADS})")
    parser.add_argument("--debug", action="store_true",
                        help="Flask's development server with Dash's debug tools (not for use)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    from dash_app.app import create_app

    try:
        app = create_app(args.run)
    except InfluenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = app.server.extensions["influence"]
    print(f"explorer: http://{args.host}:{args.port}/ (run {args.run}; "
          f"{data.memory_mb['loaded'] - data.memory_mb['before_load']:.0f} MB for the run, "
          f"{data.memory_mb['loaded']:.0f} MB resident; "
          f"health: /health)", flush=True)
    if args.debug:
        app.run(host=args.host, port=args.port, debug=True)
        return 0
    from waitress import serve

    serve(app.server, host=args.host, port=args.port, threads=args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
