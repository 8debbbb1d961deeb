"""The search box in the header: type part of an artist's name or a title, pick a suggestion
with the mouse or the keyboard (arrows, Enter; Escape or a click elsewhere closes them)."""

from __future__ import annotations

from urllib.parse import urlencode

from dash import Dash, Input, Output, dcc, html

from dash_app.checks import MAX_TEXT
from dash_app.components import artist_href, painting_href
from dash_app.data import current

SUGGESTIONS = 12


def box() -> html.Div:
    """The box and its suggestions; the keys are handled in the browser (assets/keys.js)."""
    return html.Div([
        html.Label([html.Span("Find an artist or a title", className="sr-only"),
                    dcc.Input(id="search", type="search", placeholder="Find an artist or a title…",
                              debounce=0.25, autoComplete="off", className="search-input",
                              maxLength=MAX_TEXT)]),
        html.Div(id="search-suggestions", className="search-suggestions"),
    ], className="search")


def href(match: dict[str, str]) -> str:
    """Where a suggestion leads: a painting's page, or the artist's page (or the map narrowed
    to the artist when the run has no influence stage)."""
    if match["kind"] == "painting":
        return painting_href(match["value"])
    return artist_href(match["value"]) or "/map?" + urlencode({"artist": match["value"]})


def register(app: Dash) -> None:
    @app.callback(Output("search-suggestions", "children"), Input("search", "value"),
                  prevent_initial_call=True)
    def suggest(text: object) -> list:
        # The index caps what it reads of the text (influence.selections.MAX_QUERY_CHARS).
        text = text if isinstance(text, str) else ""
        matches = current().search(text, SUGGESTIONS)
        if text.strip() and not matches:
            return [html.Div("Nothing found.", className="search-none")]
        return [dcc.Link(m["label"], href=href(m), className=f"search-hit {m['kind']}")
                for m in matches]

    @app.callback(Output("search", "value"), Input("url", "pathname"),
                  prevent_initial_call=True)
    def clear(_: str) -> str:
        return ""
