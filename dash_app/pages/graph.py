"""The influence graph: artists placed by time (the middle of their active years), in bands by
nationality or style, with each artist's strongest earlier candidates drawn as links.

Plotly rather than dash-cytoscape: the x axis must be time, which a Plotly scatter gives with
a real year axis, zoom and hover for free, while cytoscape's layouts place nodes by the graph's
shape (time would have to be forced through preset positions) and it is one more dependency.
"""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html, no_update
from plotly.colors import qualitative

from dash_app import checks
from dash_app.components import needs
from dash_app.data import current

#: Groups (nationalities or styles) given a band of their own; the rest share "other".
BANDS = 12
COLOURS = qualitative.Dark24
BY = {"nationality": "nationality", "style": "main style"}


#: Links per artist the slider offers.
LINKS = (1, 5)


def layout(by: str | None = None, links: str | None = None, group: str | None = None,
           **_: str) -> html.Div:
    data = current()
    if data.influence is None:
        return needs("influence", data)
    by = checks.one_of(by, BY, "nationality")
    return html.Div([
        html.H2("Who resembles whom, earlier to later"),
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
        html.P("Each artist sits at the middle of their active years; a line joins an artist to "
               "their strongest earlier or contemporary look-alikes (darker = stronger). Click "
               "an artist to open their page.", className="hint"),
        dcc.Graph(id="graph-figure", config={"displaylogo": False}, className="map-graph"),
    ])


def _groups(artists: pd.DataFrame, by: str) -> pd.Series:
    if by == "style":
        return artists["styles"].map(lambda s: s[0]["label"] if len(s) else "unknown")
    return artists["nationality"].fillna("unknown").astype(str)


def figure(by: str, per_artist: int, chosen: list[str]) -> tuple[go.Figure, list[str]]:
    """The graph, and every group's name (commonest first) for the filter menu."""
    inf = current().influence
    artists = inf.artists.dropna(subset=["active_mid"]).reset_index(drop=True)
    groups = _groups(artists, by)
    order = list(groups.value_counts().index)
    banded = groups.where(groups.isin(order[:BANDS]), "other")
    bands = order[:BANDS] + (["other"] if len(order) > BANDS else [])
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
            xs, ys = [], []
            for a, b in zip(part["artist"], part["influenced_by"], strict=True):
                xs += [at[b][0], at[a][0], None]
                ys += [at[b][1], at[a][1], None]
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip",
                                     showlegend=False, line={"width": 0.6 + level * 0.8,
                                     "color": f"rgba(60,60,60,{0.15 + 0.25 * level})"}))
    for n, band in enumerate(bands):
        rows = np.flatnonzero((banded.to_numpy() == band) & keep)
        if not len(rows):
            continue
        part = artists.iloc[rows]
        fig.add_trace(go.Scatter(
            x=part["active_mid"], y=y[rows], mode="markers", name=f"{band} ({len(rows)})",
            customdata=part["artist_id"], text=part["artist"],
            hovertemplate="%{text}<br>active around %{x:.0f}<extra></extra>",
            marker={"size": 6 + 10 * np.sqrt(part["paintings"] / artists["paintings"].max()),
                    "color": COLOURS[n % len(COLOURS)], "line": {"width": 0.5,
                                                                 "color": "white"}}))
    fig.update_layout(template="plotly_white", height=720, margin={"l": 10, "r": 10, "t": 10,
                      "b": 40}, xaxis={"title": "middle of active years"},
                      yaxis={"tickvals": list(range(len(bands))), "ticktext": bands,
                             "zeroline": False},
                      legend={"itemsizing": "constant"}, uirevision=by)
    return fig, order


def register(app: Dash) -> None:
    @app.callback(Output("graph-figure", "figure"), Output("graph-group", "options"),
                  Output("view-state", "data", allow_duplicate=True),
                  Input("graph-by", "value"), Input("graph-links", "value"),
                  Input("graph-group", "value"), prevent_initial_call="initial_duplicate")
    def show(by: object, per_artist: object, chosen: object) -> tuple:
        by, per_artist = checks.one_of(by, BY, "nationality"), checks.integer(per_artist, *LINKS, 2)
        chosen = checks.chosen(chosen)
        fig, order = figure(by, per_artist, chosen)
        query = {"by": by, "links": per_artist, **({"group": "|".join(chosen)} if chosen
                                                     else {})}
        return fig, order, urlencode(query)

    @app.callback(Output("url", "href", allow_duplicate=True),
                  Input("graph-figure", "clickData"), prevent_initial_call=True)
    def open_artist(click: object) -> str:
        artist = current().influence.artist(checks.text(checks.first_point(click)
                                                        .get("customdata")))
        return f"/artist/{artist['artist_id']}" if artist is not None else no_update
