"""The influence graph: artists placed by time (the middle of their active years), in bands by
nationality or style, with each artist's strongest earlier candidates drawn as links, each with an
arrow from the earlier artist to the later one. The most linked artists are named; zoomed in to
few enough, every artist in view is. An unknown nationality or style counts as "other".

Plotly rather than dash-cytoscape: the x axis must be time, which a Plotly scatter gives with
a real year axis, zoom and hover for free, while cytoscape's layouts place nodes by the graph's
shape (time would have to be forced through preset positions) and it is one more dependency.
"""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, ctx, dcc, html, no_update
from plotly.colors import qualitative

from dash_app import checks
from dash_app.components import below_toolbar, graph, needs
from dash_app.data import current
from influence.influence import Influence

#: Groups (nationalities or styles) given a band of their own; the rest share "other".
BANDS = 12
OTHER = "other"
#: Artists named in the whole view (the most linked), and the most named when zoomed in.
NAMED = 12
NAMED_ZOOMED = 40
#: Where along a link its arrow sits (0: the earlier artist, 1: the later one).
ARROW_AT = 0.8
COLOURS = qualitative.Dark24
BY = {"nationality": "nationality", "style": "main style"}


#: Links per artist the slider offers.
LINKS = (1, 5)


def layout(by: str | None = None, links: str | None = None, group: str | None = None,
           **_: str) -> html.Div:
    data = current()
    if data.influence is None:
        return html.Div([html.H1("Who resembles whom, earlier to later"), needs("influence", data)])
    by = checks.one_of(by, BY, "nationality")
    return html.Div([
        html.H1("Who resembles whom, earlier to later"),
        html.Div([
            html.Label(["Bands and colours by", dcc.Dropdown(
                [{"label": v, "value": k} for k, v in BY.items()], by, id="graph-by",
                clearable=False)]),
            html.Label(["Only", dcc.Dropdown(
                [], group.split("|")[:checks.MAX_CHOSEN] if group else [], id="graph-group",
                multi=True, placeholder="every group")]),
            html.Label(["Links per artist", dcc.Slider(
                *LINKS, 1, value=checks.integer(links, *LINKS, 2), id="graph-links")]),
        ], className="controls"),
        html.P("Each artist sits at the middle of their active years; an arrow runs from an "
               "earlier or contemporary artist to a later one whose work resembles theirs "
               "(darker = stronger). The most linked artists are named; zoom in to name all. "
               "Click an artist to open their page.", className="hint"),
        graph(id="graph-figure", className="map-graph"),
    ])


def _groups(artists: pd.DataFrame, by: str) -> pd.Series:
    """Each artist's group; an unknown one is OTHER, not a band of its own."""
    if by == "style":
        return artists["styles"].map(lambda s: s[0]["label"] if len(s) else OTHER)
    return artists["nationality"].astype("object").where(artists["nationality"].notna(),
                                                         OTHER).astype(str)


def parse_view(relayout: object) -> tuple[float, float, float, float] | None:
    """The x and y ranges of a zoomed view from Plotly's relayout event, else None."""
    relayout = checks.mapping(relayout)
    keys = ("xaxis.range[0]", "xaxis.range[1]", "yaxis.range[0]", "yaxis.range[1]")
    found = checks.numbers([relayout.get(k) for k in keys], 4)
    return None if found is None else tuple(found)


def named(strength: pd.Series, x: np.ndarray, y: np.ndarray,
          view: tuple[float, float, float, float] | None) -> np.ndarray:
    """Which artists get their name drawn: the NAMED most linked; in a zoomed view holding at
    most NAMED_ZOOMED artists, every one in it."""
    if view is not None:
        x0, x1, y0, y1 = view
        inside = ((x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1))
                  & (y <= max(y0, y1)))
        if inside.sum() <= NAMED_ZOOMED:
            return inside
    top = strength.sort_values(ascending=False, kind="stable").index[:NAMED]
    return np.isin(np.arange(len(strength)), top) & (strength.to_numpy() > 0)


def figure(inf: Influence, by: str, per_artist: int, chosen: list[str],
           view: tuple[float, float, float, float] | None = None
           ) -> tuple[go.Figure, list[str]]:
    """The graph, and every group's name (commonest first, OTHER last) for the filter menu."""
    artists = inf.artists.dropna(subset=["active_mid"]).reset_index(drop=True)
    groups = _groups(artists, by)
    counts = groups.value_counts()
    order = [g for g in counts.index if g != OTHER] + ([OTHER] if OTHER in counts else [])
    own = [g for g in order if g != OTHER][:BANDS]
    banded = groups.where(groups.isin(own), OTHER)
    bands = own + ([OTHER] if (banded == OTHER).any() else [])
    chosen = [c for c in chosen if c in order]
    keep = groups.isin(chosen).to_numpy() if chosen else np.ones(len(artists), dtype=bool)
    # Within a band, artists are spread by rank in time, alternating up and down.
    y = np.zeros(len(artists))
    for n, band in enumerate(bands):
        rows = np.flatnonzero(banded.to_numpy() == band)
        rows = rows[np.argsort(artists["active_mid"].to_numpy()[rows], kind="stable")]
        y[rows] = n + 0.6 * ((np.arange(len(rows)) % 5) / 4 - 0.5)
    at = {a: (float(m), float(v)) for a, m, v, k in
          zip(artists["artist"], artists["active_mid"], y, keep, strict=True) if k}
    edges = inf.edges(per_artist)
    edges = edges[edges["artist"].isin(at) & edges["influenced_by"].isin(at)]
    fig = go.Figure()
    if len(edges):
        strength = edges["score"].rank(pct=True).to_numpy()
        for level, (low, high) in enumerate(((0, 0.5), (0.5, 0.8), (0.8, 1.01))):
            part = edges[(strength >= low) & (strength < high)]
            # Each link: the earlier artist, its arrow (pointing along the link), the later one.
            xs, ys, sizes = [], [], []
            for a, b in zip(part["artist"], part["influenced_by"], strict=True):
                (xb, yb), (xa, ya) = at[b], at[a]
                xs += [xb, xb + ARROW_AT * (xa - xb), xa, None]
                ys += [yb, yb + ARROW_AT * (ya - yb), ya, None]
                sizes += [0, 12 + 3 * level, 0, 0]
            colour = f"rgba(60,60,60,{0.2 + 0.25 * level})"
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", hoverinfo="skip",
                                     showlegend=False, name="links",
                                     line={"width": 0.6 + level * 0.8, "color": colour},
                                     marker={"symbol": "arrow", "angleref": "previous",
                                             "size": sizes, "color": colour}))
    linked = pd.concat([edges["artist"], edges["influenced_by"]]).value_counts()
    strength = artists["artist"].map(linked).fillna(0).where(keep, 0)
    names = named(strength, artists["active_mid"].to_numpy(dtype=float), y, view)
    for n, band in enumerate(bands):
        rows = np.flatnonzero((banded.to_numpy() == band) & keep)
        if not len(rows):
            continue
        part = artists.iloc[rows]
        fig.add_trace(go.Scatter(
            # Plain lists: the browser's events and the tests read them point by point.
            x=part["active_mid"].tolist(), y=y[rows].tolist(), mode="markers+text",
            name=f"{band} ({len(rows)})", customdata=part["artist_id"].tolist(),
            hovertext=part["artist"].tolist(),
            text=[a if n else "" for a, n in zip(part["artist"], names[rows], strict=True)],
            textposition="top center", textfont={"size": 11, "color": "#1f2630"},
            hovertemplate="%{hovertext}<br>active around %{x:.0f}<extra></extra>",
            marker={"size": 6 + 10 * np.sqrt(part["paintings"] / artists["paintings"].max()),
                    "color": COLOURS[n % len(COLOURS)], "line": {"width": 0.5,
                                                                 "color": "white"}}))
    fig.update_layout(template="plotly_white", height=720, margin={"l": 10, "r": 10, "t": 10,
                      "b": 40}, xaxis={"title": "middle of active years"},
                      yaxis={"tickvals": list(range(len(bands))), "ticktext": bands,
                             "zeroline": False},
                      legend={"itemsizing": "constant"}, uirevision=by)
    return below_toolbar(fig), order


def register(app: Dash) -> None:
    @app.callback(Output("graph-figure", "figure"), Output("graph-group", "options"),
                  Output("view-state", "data", allow_duplicate=True),
                  Input("graph-by", "value"), Input("graph-links", "value"),
                  Input("graph-group", "value"), Input("graph-figure", "relayoutData"),
                  prevent_initial_call="initial_duplicate")
    def show(by: object, per_artist: object, chosen: object, relayout: object) -> tuple:
        by, per_artist = checks.one_of(by, BY, "nationality"), checks.integer(per_artist, *LINKS, 2)
        chosen = checks.chosen(chosen)
        view = parse_view(relayout)
        # A relayout that is neither a zoom nor a reset (the first draw's autosize) changes
        # nothing drawn.
        if (ctx.triggered_id == "graph-figure" and view is None
                and checks.mapping(relayout).get("xaxis.autorange") is not True):
            return no_update, no_update, no_update
        fig, order = figure(current().influence, by, per_artist, chosen, view)
        query = {"by": by, "links": per_artist, **({"group": "|".join(chosen)} if chosen
                                                     else {})}
        return fig, order, urlencode(query)

    @app.callback(Output("url", "href", allow_duplicate=True),
                  Input("graph-figure", "clickData"), prevent_initial_call=True)
    def open_artist(click: object) -> str:
        artist = current().influence.artist(checks.text(checks.first_point(click)
                                                        .get("customdata")))
        return f"/artist/{artist['artist_id']}" if artist is not None else no_update
