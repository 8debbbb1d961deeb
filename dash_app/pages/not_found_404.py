"""The page for an address no page has (Dash Pages shows it; the server sends it as a 404)."""

from __future__ import annotations

from dash import Dash, dcc, html

from dash_app.components import start_links


def layout(**_: str) -> html.Div:
    return html.Div([
        html.H1("No page here", id="not-found"),
        html.P("There is no page at this address: it may be mistyped, or from an older version "
               "of the explorer. Search for an artist or a title above, or start from one of "
               "these:"),
        start_links(),
        html.P(dcc.Link("Back to the start page", href="/")),
    ])


def register(app: Dash) -> None:
    """The page is static; it has no callbacks of its own."""
