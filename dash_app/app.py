"""Build the explorer app over one run: `create_app(run_dir)` returns a ready Dash app."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qs

from dash import Dash, Input, Output, dcc, html

from dash_app.components import message
from dash_app.data import RunData, load_run_data
from dash_app.pages import clusters, painting, scores, upload
from dash_app.pages import map as map_page
from dash_app.routes import add_routes

NAV = [("/", "Map"), ("/clusters", "Clusters"), ("/upload", "Upload"), ("/scores", "Scores")]


def create_app(run_dir: str | Path, data: RunData | None = None) -> Dash:
    """The Dash app over a run directory; everything heavy is loaded here, once."""
    data = data or load_run_data(run_dir)
    app = Dash(__name__, title=f"influence · {data.name}", suppress_callback_exceptions=True,
               assets_folder=str(Path(__file__).parent / "assets"), update_title=None)
    # Uploads are checked in the browser first; this caps anything that bypasses it.
    app.server.config["MAX_CONTENT_LENGTH"] = upload.MAX_REQUEST_BYTES
    add_routes(app.server, data)
    app.layout = html.Div([
        dcc.Location(id="url", refresh="callback-nav"),
        html.Header([
            dcc.Link("influence", href="/", className="brand"),
            html.Nav([dcc.Link(label, href=href, className="nav-link", id=f"nav-{label.lower()}")
                      for href, label in NAV]),
            html.Span(f"{data.name} · {len(data.catalog):,} paintings", className="run-name"),
        ], className="header"),
        html.Main(id="page", className="page"),
    ])

    @app.callback(Output("page", "children"), Input("url", "pathname"), Input("url", "search"))
    def route(pathname: str | None, search: str | None) -> object:
        query = {k: v[0] for k, v in parse_qs((search or "").lstrip("?")).items()}
        path = (pathname or "/").rstrip("/") or "/"
        if path == "/":
            return map_page.layout(data, query)
        if path == "/clusters":
            return clusters.layout(data, query)
        if path.startswith("/painting/"):
            return painting.layout(data, path.removeprefix("/painting/"), query)
        if path == "/upload":
            return upload.layout(data)
        if path == "/scores":
            return scores.layout(data)
        return message(f"No page at {path}.", "error")

    for page in (map_page, clusters, painting, upload, scores):
        page.register(app, data)
    return app
