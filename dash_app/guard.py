"""What stands between the explorer and a hostile request, on the Flask server under Dash.

- Size: every request body is capped at SMALL_REQUEST_BYTES, except a callback request for one
  of the few outputs that need more (an upload, a map selection's points), up to the app's
  MAX_CONTENT_LENGTH, and the few paths given their own cap (the JSON API's upload);
  waitress refuses anything larger before the app sees it.
- Headers: `X-Content-Type-Options`, `X-Frame-Options` with CSP `frame-ancestors`, and
  `Referrer-Policy` on every response.
- Hosts: an optional allow-list of Host headers (Flask's TRUSTED_HOSTS; others get a 400).
- Users: optional HTTP Basic authentication against a file of `user:password-hash` lines
  (werkzeug's `generate_password_hash` format), for deployments without a proxy that does it.
- Dash Pages' router: its inputs must be a path and a query string, else a 400.
- Errors: a malformed callback request (not JSON, unknown output, forged structure) is a 400
  and a request for a script Dash does not serve a 404, each logged in one line; a callback
  that raises anyway answers `no_update`, logged in one line: never a traceback in the page
  or the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Collection, Mapping
from pathlib import Path

from dash.exceptions import DependencyException
from flask import Flask, Response, abort, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.security import check_password_hash

from influence.runs import InfluenceError

log = logging.getLogger("dash_app")

#: The most any request other than the large callbacks may carry: a callback's inputs are a few
#: kilobytes (filters, a lasso of MAX_VERTICES points).
SMALL_REQUEST_BYTES = 1_000_000
DISPATCH = "/_dash-update-component"
SCRIPTS = "/_dash-component-suites/"
HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
           "Content-Security-Policy": "frame-ancestors 'none'",
           "Referrer-Policy": "same-origin"}
REALM = 'Basic realm="influence explorer", charset="UTF-8"'
#: Dash Pages' own callback, which turns the address into a page: its inputs are checked here
#: (a path starting with "/", a query string), as the app's callbacks check theirs.
PAGES_ROUTER = ".._pages_content.children..._pages_store.data.."


def read_users(path: str | Path) -> dict[str, str]:
    """The users of an auth file: one `user:hash` per line (blank lines and # comments skipped),
    the hash as werkzeug's `generate_password_hash` writes it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise InfluenceError(f"cannot read the auth file {path}: {e.strerror}") from None
    users = {}
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        user, sep, hashed = line.strip().partition(":")
        if not sep or not user or "$" not in hashed:
            raise InfluenceError(f"{path}, line {number}: expected user:password-hash "
                                 "(werkzeug.security.generate_password_hash)")
        users[user] = hashed
    if not users:
        raise InfluenceError(f"the auth file {path} names no user")
    return users


def routable(inputs: object) -> bool:
    """Whether the Pages router's inputs are a path starting with "/" and a query string."""
    if not isinstance(inputs, list):
        return False
    for item in inputs:
        value = item.get("value") if isinstance(item, dict) else None
        prop = item.get("property") if isinstance(item, dict) else None
        if prop == "pathname" and not (isinstance(value, str) and value.startswith("/")):
            return False
        if prop == "search" and not (value is None or isinstance(value, str)):
            return False
    return True


class Guard:
    """The request checks of one app (see the module doc)."""

    def __init__(self, large_outputs: Collection[str], users: dict[str, str] | None = None,
                 allowed_hosts: Collection[str] | None = None,
                 large_paths: Mapping[str, int] | None = None) -> None:
        self.large_outputs = frozenset(large_outputs)
        #: Paths whose bodies may be larger than SMALL_REQUEST_BYTES, with their own cap (at
        #: most the app's MAX_CONTENT_LENGTH, which werkzeug enforces as the body is read).
        self.large_paths = dict(large_paths or {})
        self.users = users
        self.allowed_hosts = list(allowed_hosts) if allowed_hosts else None
        # Password hashes are slow on purpose; a header once verified is remembered by its
        # keyed digest (only valid credentials ever enter the set).
        self._key = os.urandom(32)
        self._verified: set[bytes] = set()

    def install(self, server: Flask) -> None:
        if self.allowed_hosts:
            server.config["TRUSTED_HOSTS"] = self.allowed_hosts
        server.before_request(self.check)
        server.after_request(self.headers)
        server.register_error_handler(Exception, self.malformed)

    def check(self) -> Response | None:
        """Before any view: the user, then the body's size."""
        if self.users is not None and not self.authorised():
            refused = jsonify({"error": "authentication required"})
            refused.status_code = 401
            refused.headers["WWW-Authenticate"] = REALM
            return refused
        size = request.content_length or 0
        if request.path != DISPATCH:
            if size > self.large_paths.get(request.path, SMALL_REQUEST_BYTES):
                abort(413)
            return None
        body = request.get_json(silent=True)
        output = body.get("output") if isinstance(body, dict) else None
        if size > SMALL_REQUEST_BYTES and output not in self.large_outputs:
            abort(413)
        if output == PAGES_ROUTER and not routable(body.get("inputs")):
            abort(400)
        return None

    def authorised(self) -> bool:
        auth = request.authorization
        if auth is None or auth.type != "basic" or not auth.username or auth.password is None:
            return False
        digest = hmac.new(self._key, f"{auth.username}\0{auth.password}".encode(),
                          hashlib.sha256).digest()
        if digest in self._verified:
            return True
        hashed = self.users.get(auth.username)
        if hashed is None or not check_password_hash(hashed, auth.password):
            return False
        self._verified.add(digest)
        return True

    @staticmethod
    def headers(response: Response) -> Response:
        for name, value in HEADERS.items():
            response.headers.setdefault(name, value)
        return response

    @staticmethod
    def malformed(error: Exception) -> Response | HTTPException:
        """A callback request Dash cannot dispatch (400), or a script Dash does not serve (404,
        such as a path-like name): one log line. HTTP errors pass; anything else is a bug."""
        if isinstance(error, HTTPException):
            return error
        if request.path == DISPATCH:
            status, what = 400, "malformed callback request"
        elif isinstance(error, DependencyException) and request.path.startswith(SCRIPTS):
            status, what = 404, "unknown script"
        else:
            raise error
        log.warning("%s: %s: %s", what, type(error).__name__, " ".join(str(error).split())[:200])
        return jsonify({"error": what}), status


def callback_error(error: Exception) -> None:
    """Dash's on_error: a callback that raised answers no_update, logged in one line."""
    log.error("callback error: %s: %s", type(error).__name__, str(error)[:200])
