"""Build the explorer app over one run: `create_app(run_dir)` returns a ready Dash app.

Pages are Dash Pages, registered here with their paths (`/painting/<image_id>` is a path
template); each page module has `layout(**url_values)` and `register(app)` for its callbacks.
The JSON API (dash_app.api, under /api/v1) is served by the same Flask server.
"""

from __future__ import annotations

import os
from collections.abc import Collection
from pathlib import Path

import dash
from dash import Dash, Input, Output, dcc, html

from dash_app import api, search
from dash_app.addresses import Addresses
from dash_app.data import EXTENSION, RunData, load_run_data
from dash_app.guard import Guard, callback_error
from dash_app.pages import (
    artist,
    clusters,
    compare,
    graph,
    heads,
    home,
    journey,
    not_found_404,
    painting,
    review,
    scores,
    upload,
)
from dash_app.pages import map as map_page
from dash_app.routes import add_routes

#: (module, path or path template, name in the menu or None, page title).
PAGES = [
    (home, "/", None, "Start"),
    (map_page, "/map", "Map", "Map"),
    (clusters, "/clusters", "Families", "Visual families"),
    (compare, "/compare", "Compare", "Compare two artists"),
    (upload, "/upload", "Upload", "Upload"),
    (scores, "/scores", "Scores", "Scores"),
    (heads, "/heads", "Heads", "Heads"),
    (graph, "/influence", "Influence", "Influence graph"),
    (journey, "/journey", "Journey", "Journey of visual families"),
    (review, "/review", "Review", "Review"),
    (painting, "/painting/<image_id>", None, "Painting"),
    (artist, "/artist/<artist_id>", None, "Artist"),
]


def create_app(run_dir: str | Path, data: RunData | None = None,
               users: dict[str, str] | None = None,
               allowed_hosts: Collection[str] | None = None) -> Dash:
    """The Dash app over a run directory; everything heavy is loaded here, once. `users`
    (name: password hash) turns on HTTP Basic authentication, `allowed_hosts` a Host allow-list
    (see dash_app.guard)."""
    data = data or load_run_data(run_dir)
    app = Dash(__name__, title=f"influence · {data.name}", suppress_callback_exceptions=True,
               assets_folder=os.path.join(os.path.dirname(__file__), "assets"),
               update_title=None, use_pages=True, pages_folder="", on_error=callback_error)
    app.server.extensions[EXTENSION] = data
    # Uploads are checked in the browser first; this caps anything that bypasses it. Only the
    # callbacks in LARGE_OUTPUTS may send that much; every other request gets the guard's cap.
    app.server.config["MAX_CONTENT_LENGTH"] = upload.MAX_REQUEST_BYTES
    Guard([o for module, *_ in PAGES for o in getattr(module, "LARGE_OUTPUTS", ())],
          users, allowed_hosts, api.LARGE_PATHS).install(app.server)
    add_routes(app.server, data)
    api.add_api(app.server)
    # Dash's page shell, with the page's language declared (screen readers, hyphenation).
    app.index_string = app.index_string.replace("<html>", '<html lang="en">', 1)
    for module, path, name, title in PAGES:
        dash.register_page(module.__name__, path_template=path if "<" in path else None,
                           path=None if "<" in path else path, name=name or title,
                           title=f"{title} · influence", layout=module.layout)
    # Dash Pages shows this page's layout for any address no page has.
    dash.register_page(not_found_404.__name__, path="/404", name="Not found",
                       title="Not found · influence", layout=not_found_404.layout)
    Addresses([(module, path) for module, path, *_ in PAGES]).install(app.server, data)
    app.layout = html.Div([
        dcc.Location(id="url", refresh="callback-nav"),
        dcc.Store(id="view-state"),
        html.Div(id="view-state-sink", hidden=True),
        html.Header([
            dcc.Link("influence", href="/", className="brand"),
            html.Nav([dcc.Link(name, href=path, className="nav-link", id=f"nav-{name.lower()}")
                      for _, path, name, _ in PAGES if name]),
            search.box(),
            html.Span(f"{data.name} · {len(data.catalog):,} paintings", className="run-name"),
        ], className="header"),
        html.Main(dash.page_container, className="page"),
    ])
    # The view's state goes into the address bar without reloading the page, so a copied link
    # reopens the same view (each page's layout reads it back from its arguments).
    app.clientside_callback(
        """function(query) {
            if (query === null || query === undefined) { return window.dash_clientside.no_update; }
            const url = window.location.pathname + (query ? '?' + query : '');
            if (url !== window.location.pathname + window.location.search) {
                window.history.replaceState(window.history.state, '', url);
            }
            return window.dash_clientside.no_update;
        }""", Output("view-state-sink", "children"), Input("view-state", "data"),
        prevent_initial_call=True)

    search.register(app)
    for module, *_ in PAGES:
        module.register(app)
    return app
