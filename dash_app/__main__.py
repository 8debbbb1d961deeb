"""`python -m dash_app --run RUN_DIR [--host 127.0.0.1] [--port 8050] [--threads 8]
[--auth-file FILE] [--allowed-hosts NAMES] [--debug]`.

Serves the explorer with waitress, a production WSGI server: one process holding the run once
(its catalog, clusterings, faiss index and model), answering requests from a pool of threads.
A pre-forking server (gunicorn) would load the run again in every worker for no gain here:
a query's CPU work runs in numpy, faiss and torch, which release the GIL. `--debug` serves
with Flask's development server and Dash's debug tools instead, for working on the app.

It listens on loopback unless told otherwise; to serve colleagues, put it behind a reverse proxy
that authenticates, or at least give `--auth-file` (docs/serving.md).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from dash_app.pages.upload import MAX_REQUEST_BYTES
from influence.runs import InfluenceError

#: Threads answering requests: enough that page loads and thumbnails are not stuck behind a
#: running upload query (queries themselves take turns, see RunData.query).
THREADS = 8
#: waitress's settings beyond threads: connections are cheap (its I/O loop is asynchronous, poll
#: rather than select so there is no 1024-socket ceiling), idle ones are closed after 30 s, and
#: a body larger than the largest upload is refused before it is read.
SERVER = {"connection_limit": 1000, "channel_timeout": 30, "cleanup_interval": 10,
          "asyncore_use_poll": True, "max_request_body_size": MAX_REQUEST_BYTES}
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dash_app",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the run directory to browse")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to listen on (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=8050)
    parser.add_argument("--threads", type=int, default=THREADS,
                        help=f"request threads of the server (default {THREADS})")
    parser.add_argument("--auth-file",
                        help="HTTP Basic users: one user:hash per line, the hash made by "
                             "werkzeug.security.generate_password_hash")
    parser.add_argument("--allowed-hosts",
                        help="comma-separated Host names the server answers to (default: any)")
    parser.add_argument("--debug", action="store_true",
                        help="Flask's development server with Dash's debug tools (not for use)")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be at least 1")
    from dash_app.app import create_app
    from dash_app.guard import read_users

    hosts = [h.strip() for h in (args.allowed_hosts or "").split(",") if h.strip()]
    try:
        users = read_users(args.auth_file) if args.auth_file else None
        app = create_app(args.run, users=users, allowed_hosts=hosts)
    except InfluenceError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.host not in LOOPBACK and users is None:
        print(f"warning: serving on {args.host} without authentication: anyone who can reach "
              "it can use it (see docs/serving.md)", file=sys.stderr)
    data = app.server.extensions["influence"]
    print(f"explorer: http://{args.host}:{args.port}/ (run {args.run}; "
          f"{data.memory_mb['loaded'] - data.memory_mb['before_load']:.0f} MB for the run, "
          f"{data.memory_mb['loaded']:.0f} MB resident; "
          f"health: /health)", flush=True)
    if args.debug:
        app.run(host=args.host, port=args.port, debug=True)
        return 0
    from waitress import serve

    serve(app.server, host=args.host, port=args.port, threads=args.threads, **SERVER)
    return 0


if __name__ == "__main__":
    sys.exit(main())
