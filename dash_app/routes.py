"""Flask routes for images: thumbnails, full images and score plots, addressed by id only.

No route takes a path from the request: an image id must match a hex pattern and be in the
catalog, a plot name must be a clustered feature set and a known plot; everything else is a 404.
Images are named by content hash, so browsers may cache them for good.
"""

from __future__ import annotations

import io

from flask import Flask, Response, abort, jsonify, send_file

from dash_app.data import RunData, memory_mb
from influence.images import BadImage, open_rgb
from influence.thumbnails import IMAGE_ID, thumbnail_bytes, thumbnail_path

CACHE_SECONDS = 7 * 24 * 3600


def thumb_url(image_id: str) -> str:
    return f"/thumbs/{image_id}.jpg"


def image_url(image_id: str) -> str:
    return f"/images/{image_id}"


def plot_url(features: str, plot: str) -> str:
    return f"/plots/{features}/{plot}.png"


def add_routes(server: Flask, data: RunData) -> None:
    """Register the image routes on the Dash app's Flask server."""

    def known(image_id: str) -> str:
        if not IMAGE_ID.match(image_id) or data.row_of(image_id) is None:
            abort(404)
        return image_id

    @server.route("/thumbs/<image_id>.jpg")
    def thumbnail(image_id: str) -> Response:
        path = thumbnail_path(data.run, known(image_id))
        if path.is_file():
            response = send_file(path, mimetype="image/jpeg", max_age=CACHE_SECONDS)
        else:
            # A run made before thumbnails existed: resize in memory, write nothing.
            source = data.image_file(image_id)
            if source is None:
                abort(404)
            try:
                jpeg = thumbnail_bytes(open_rgb(source))
            except BadImage:
                abort(404)
            response = send_file(io.BytesIO(jpeg), mimetype="image/jpeg", max_age=CACHE_SECONDS)
        response.headers["Cache-Control"] = f"public, max-age={CACHE_SECONDS}, immutable"
        return response

    @server.route("/images/<image_id>")
    def image(image_id: str) -> Response:
        path = data.image_file(known(image_id))
        if path is None:
            abort(404)
        response = send_file(path, max_age=CACHE_SECONDS)
        response.headers["Cache-Control"] = f"public, max-age={CACHE_SECONDS}, immutable"
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    @server.route("/plots/<features>/<plot>.png")
    def plot(features: str, plot: str) -> Response:
        path = data.plots(features).get(plot)
        if path is None:
            abort(404)
        return send_file(path, mimetype="image/png", max_age=300)

    @server.route("/health")
    def health() -> Response:
        """For a load balancer or a supervisor: the run is loaded and what it costs in memory."""
        return jsonify({"status": "ok", "run": data.name, "paintings": len(data.catalog),
                        "features": data.features,
                        "search": data.search_features,
                        "influence": data.influence is not None,
                        "memory_mb": {**data.memory_mb, **memory_mb()}})
