"""The explorer's JSON API over HTTP, on the same Flask server as the pages (under /api/v1).

- `POST /api/v1/similar`: multipart field `image`, optional `k` and `features`: the object
  `similar --json` prints for that image (built by the same `Explorer.query`), `query` being
  the uploaded file's name.
- `GET /api/v1/paintings/<image_id>`: a painting's catalog row, links and nearest neighbours.
- `GET /api/v1/artists/<artist_id>`: an artist and their top possible influences, as the artist
  page shows them (score, percentile, painting pairs).
- `GET /api/v1/heads`: every trained head's target, feature set and held-out metrics.
- `GET /api/v1/openapi.json`: the OpenAPI 3.1 document describing all of them.

An upload is held to the upload page's limits (`dash_app.pages.upload.LIMITS`: 20 MB, 50
megapixels, a plausible size for its pixels) but decoded whole, as `similar` decodes a file,
so the answer is the command line's to the last digit; so that memory stays bounded, at most
DECODERS API uploads are decoded and answered at once. Every error is JSON `{"error": reason}`
with a 4xx status (503 when busy): a path naming nothing is a 404, a wrong parameter or
image a 400, too large a 413. The guard (size caps, authentication, hosts, headers) applies as
to every request; nothing a request sends is written to the run.
"""

from __future__ import annotations

import json
import math
import re
import threading
from typing import Any

import numpy as np
import pandas as pd
from flask import Blueprint, Flask, Response, current_app, request
from werkzeug.exceptions import HTTPException

from dash_app.checks import integer, text
from dash_app.data import RunData, current
from dash_app.guard import SMALL_REQUEST_BYTES
from dash_app.openapi import document
from dash_app.pages.artist import CANDIDATES
from dash_app.pages.upload import DECODE_WAIT, DECODERS, LIMITS, MAX_UPLOAD_BYTES
from dash_app.routes import image_url, thumb_url
from influence.catalog import artist_slug
from influence.images import open_rgb
from influence.runs import InfluenceError
from influence.thumbnails import IMAGE_ID

PREFIX = "/api/v1"
#: Paintings answered when `k` is not given: the command line's default.
DEFAULT_K = 10
MAX_K = 100
#: The largest body of a `similar` request: the largest file and room for the form around it.
MAX_REQUEST_BYTES = MAX_UPLOAD_BYTES + 1_000_000
#: Request paths whose bodies may exceed the guard's small cap, with their own cap.
LARGE_PATHS = {f"{PREFIX}/similar": MAX_REQUEST_BYTES}
#: Head JSON fields not served: the model's repr, library versions, weight files, timings.
HIDDEN_HEAD_FIELDS = frozenset({"model", "versions", "weights", "timings"})
#: Characters of a name or id echoed back in an answer or an error.
ECHO = 80
_answering = threading.BoundedSemaphore(DECODERS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

api = Blueprint("api", __name__, url_prefix=PREFIX)


class ApiError(Exception):
    """A request the API refuses: its status and a one-line reason."""

    def __init__(self, status: int, reason: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or {}


def plain(value: Any) -> Any:
    """A value as JSON holds it: numpy and pandas scalars and arrays to Python, NaN/NA to None."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if value is None or value is pd.NA or value is pd.NaT:
        return None
    return value


def reply(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """Strict JSON (no NaN), UTF-8."""
    return Response(json.dumps(plain(body), ensure_ascii=False, allow_nan=False), status,
                    headers, mimetype="application/json")


def failure(status: int, reason: str, headers: dict[str, str] | None = None) -> Response:
    return reply({"error": " ".join(reason.split())}, status, headers)


def echo(value: str) -> str:
    """A name from the request, cut and without control characters, to quote back."""
    return _CONTROL.sub("", value)[:ECHO]


def wanted_k() -> int:
    """`k` from the form or the query string (the command line's default when absent)."""
    raw = request.values.get("k")
    if raw is None:
        return DEFAULT_K
    k = integer(raw, 1, MAX_K, None)
    if k is None:
        raise ApiError(400, f"k must be a whole number from 1 to {MAX_K}, got '{echo(raw)}'")
    return k


def wanted_features(data: RunData) -> str | None:
    """`features` from the form or the query string: an indexed feature set, or None (the
    search features)."""
    if data.search_features is None:
        raise ApiError(404, "this run has no usable search index: run `index`")
    raw = request.values.get("features")
    if not raw:
        return None
    if raw not in data.indexed:
        raise ApiError(400, f"unknown feature set '{echo(raw)}' (indexed: "
                            f"{', '.join(data.indexed)})")
    return raw


def upload_name(name: str | None) -> str:
    """The label of an uploaded file: its own name without folders, or "upload"."""
    base = re.split(r"[/\\]", text(name, 1000))[-1]
    return echo(base).strip() or "upload"


@api.errorhandler(ApiError)
def refused(error: ApiError) -> Response:
    return failure(error.status, error.reason, error.headers)


@api.errorhandler(InfluenceError)
def unanswerable(error: InfluenceError) -> Response:
    """What the library refuses (a bad image, a feature set it cannot search) is the request's
    fault: a 400 with the library's one-line reason."""
    return failure(400, str(error))


@api.post("/similar")
def similar() -> Response:
    """Search with one uploaded image: the `similar --json` object."""
    data = current()
    k, features = wanted_k(), wanted_features(data)
    upload = request.files.get("image")
    if upload is None:
        raise ApiError(400, "send the image as the multipart file field 'image'")
    raw = upload.stream.read(MAX_UPLOAD_BYTES + 1)
    if len(raw) > MAX_UPLOAD_BYTES:
        raise ApiError(413, f"the file is larger than {MAX_UPLOAD_BYTES // 1_000_000} MB")
    if not _answering.acquire(timeout=DECODE_WAIT):
        raise ApiError(503, "the server is busy with other uploads: try again in a minute",
                       {"Retry-After": str(DECODE_WAIT)})
    try:
        image = open_rgb(raw, LIMITS)
        answer = data.query(image, k=k, features=features)
    finally:
        _answering.release()
    if "error" in answer:
        raise ApiError(400, answer["error"])
    return reply({**answer, "query": upload_name(upload.filename)})


@api.get("/paintings/<image_id>")
def painting(image_id: str) -> Response:
    """A painting's catalog row, its links, and its nearest paintings (itself left out)."""
    data = current()
    row = data.painting(image_id) if IMAGE_ID.match(image_id) else None
    if row is None:
        raise ApiError(404, f"no painting with image_id '{echo(image_id)}' in this run")
    k = wanted_k()
    neighbours = None
    if data.search_features is not None:
        neighbours = data.neighbours(image_id, k=k, features=wanted_features(data))
    return reply({"image_id": image_id, "metadata": row, "thumbnail": thumb_url(image_id),
                  "image": image_url(image_id), "page": f"/painting/{image_id}",
                  "similar": neighbours})


def candidate(pair: dict[str, Any], other: str) -> dict[str, Any]:
    """One candidate of an artist: the other artist, the pair's standing and its evidence."""
    return {"artist": pair[other], "artist_id": artist_slug(pair[other]),
            **{key: pair[key] for key in ("score", "percentile", "visual", "reverse", "time",
                                          "relation", "gap", "rank", "recorded", "evidence")}}


@api.get("/artists/<artist_id>")
def artist(artist_id: str) -> Response:
    """An artist with their possible influences, those they may have influenced, and undated
    look-alikes: the artist page's candidates."""
    data = current()
    influence = data.influence
    if influence is None:
        raise ApiError(404, "this run has no influence stage: run `influence` to know its "
                            "artists")
    row = influence.artist(artist_id) if len(artist_id) <= 200 else None
    if row is None:
        raise ApiError(404, f"no artist with artist_id '{echo(artist_id)}' in this run")
    name = row["artist"]
    ids = data.catalog.loc[data.catalog["artist"] == name, "image_id"]
    return reply({
        "artist": row, "features": influence.features,
        "influences": [candidate(p, "influenced_by")
                       for p in influence.earlier(name, CANDIDATES).to_dict("records")],
        "influenced": [candidate(p, "artist")
                       for p in influence.later(name, CANDIDATES).to_dict("records")],
        "undated": [candidate(p, "influenced_by")
                    for p in influence.undated(name, CANDIDATES).to_dict("records")],
        "paintings": ids.tolist()})


@api.get("/heads")
def heads() -> Response:
    """Every trained head: target, feature set and the held-out metrics of its JSON."""
    data = current()
    shown = [{k: v for k, v in info.items() if k not in HIDDEN_HEAD_FIELDS}
             for info in data.head_info]
    return reply({"heads": shown,
                  "targets": list(dict.fromkeys(h["target"] for h in shown)),
                  "features": list(dict.fromkeys(h["features"] for h in shown))})


@api.get("/openapi.json")
def openapi() -> Response:
    return reply(document(PREFIX, DEFAULT_K, MAX_K))


@api.route("/<path:rest>", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
def elsewhere(rest: str) -> Response:
    """Any other path under the API: a JSON 404, or a 405 for an API path asked with the wrong
    method (without this, Dash Pages' catch-all would answer a GET with the app's page)."""
    adapter = current_app.url_map.bind_to_environ(request.environ)
    allowed = []
    for method in ("GET", "POST"):
        try:
            endpoint, _ = adapter.match(request.path, method=method)
        except HTTPException:
            continue
        if endpoint.startswith(f"{api.name}.") and endpoint != f"{api.name}.elsewhere":
            allowed.append(method)
    if allowed:
        raise ApiError(405, f"method not allowed (allowed: {', '.join(allowed)})",
                       {"Allow": ", ".join(allowed)})
    raise ApiError(404, f"no such API path: see {PREFIX}/openapi.json")


#: One-line reasons for the HTTP errors raised before an API view runs.
REASONS = {400: "bad request", 401: "authentication required",
           404: f"no such API path: see {PREFIX}/openapi.json",
           405: "method not allowed", 413: "the request is too large"}


def add_api(server: Flask) -> None:
    """Register the API on the Dash app's Flask server, its HTTP errors answered as JSON."""
    server.register_blueprint(api)

    def http_error(error: HTTPException) -> Response | HTTPException:
        if not request.path.startswith(PREFIX + "/"):
            return error
        code = error.code or 500
        reason = REASONS.get(code, (error.name or "error").lower())
        headers = {}
        if allowed := sorted(getattr(error, "valid_methods", None) or ()):
            reason += f" (allowed: {', '.join(allowed)})"
            headers["Allow"] = ", ".join(allowed)
        if code == 413:
            reason += f" (at most {LARGE_PATHS.get(request.path, SMALL_REQUEST_BYTES):,} bytes)"
        return failure(code, reason, headers)

    server.register_error_handler(HTTPException, http_error)
