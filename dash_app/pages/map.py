"""The map: every painting on the UMAP plane of a feature set, coloured by cluster or metadata."""

from __future__ import annotations

from functools import lru_cache

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html, no_update
from plotly.colors import qualitative

from dash_app.components import needs, painting_href, text
from dash_app.data import METHODS, RunData
from dash_app.routes import thumb_url
from influence.catalog import LABEL_FIELDS

#: Categories shown in the legend before the rest are pooled as "other".
MAX_GROUPS = 20
COLOURS = qualitative.Dark24 + qualitative.Light24
OTHER = "#c8c8c8"


def colour_options() -> list[dict[str, str]]:
    return ([{"label": f"cluster ({label})", "value": m} for m, label in METHODS.items()]
            + [{"label": name, "value": name} for name in LABEL_FIELDS])


def layout(data: RunData, query: dict[str, str]) -> html.Div:
    features = data.default_features(query.get("features"))
    if features is None:
        return needs("cluster", data)
    colour = query.get("colour", "kmeans")
    colour = colour if colour in {o["value"] for o in colour_options()} else "kmeans"
    return html.Div([
        html.Div([
            html.Label(["Feature set", dcc.Dropdown(data.features, features, id="map-features",
                                                    clearable=False)]),
            html.Label(["Colour by", dcc.Dropdown(colour_options(), colour, id="map-colour",
                                                  clearable=False)]),
            html.Span("Hover a point to see the painting, click to open it.", className="hint"),
        ], className="controls"),
        dcc.Loading(dcc.Graph(id="map-graph", clear_on_unhover=True, className="map-graph",
                              config={"displaylogo": False, "scrollZoom": True}),
                    delay_show=300),
        dcc.Tooltip(id="map-tooltip", direction="right"),
    ])


def register(app: Dash, data: RunData) -> None:
    @lru_cache(maxsize=32)
    def figure(features: str, colour: str) -> go.Figure:
        """The scatter for one (feature set, colouring); shared read-only by every user."""
        assignments = data.clusterings[features].assignments
        if colour in METHODS:
            groups = assignments[colour].astype(int)
            order = groups.value_counts().index
            names = {g: f"cluster {g}" for g in order}
        else:
            groups = data.catalog[colour].fillna("unknown")
            counts = groups.value_counts()
            order = list(counts.index[:MAX_GROUPS])
            groups = groups.where(groups.isin(order), "other")
            if len(counts) > MAX_GROUPS:
                order.append("other")
            names = {g: str(g) for g in order}
        fig = go.Figure()
        for n, group in enumerate(order):
            mask = (groups == group).to_numpy()
            fig.add_trace(go.Scattergl(
                x=assignments["umap_x"].to_numpy()[mask], y=assignments["umap_y"].to_numpy()[mask],
                mode="markers", name=f"{names[group]} ({mask.sum():,})",
                customdata=assignments["image_id"].to_numpy()[mask], hoverinfo="none",
                marker={"size": 5, "opacity": 0.8,
                        "color": OTHER if group == "other" else COLOURS[n % len(COLOURS)]}))
        fig.update_layout(template="plotly_white", height=680, margin={"l": 0, "r": 0, "t": 10,
                          "b": 0}, legend={"itemsizing": "constant", "font": {"size": 11}},
                          xaxis={"visible": False}, yaxis={"visible": False},
                          dragmode="pan", uirevision=features)
        return fig

    @app.callback(Output("map-graph", "figure"), Input("map-features", "value"),
                  Input("map-colour", "value"))
    def show(features: str, colour: str) -> go.Figure:
        return figure(data.default_features(features), colour)

    @app.callback(Output("map-tooltip", "show"), Output("map-tooltip", "bbox"),
                  Output("map-tooltip", "children"), Input("map-graph", "hoverData"))
    def hover(hover_data: dict | None) -> tuple:
        if not hover_data:
            return False, no_update, no_update
        point = hover_data["points"][0]
        row = data.painting(str(point.get("customdata")))
        if row is None:
            return False, no_update, no_update
        year = text(row["year"], "")
        return True, point.get("bbox", no_update), html.Div([
            html.Img(src=thumb_url(row["image_id"]), className="tooltip-thumb"),
            html.Div(text(row["title"], "untitled"), className="card-title"),
            html.Div(f"{text(row['artist'])}{', ' + year if year else ''}",
                     className="card-artist"),
            html.Div(" · ".join(text(row[f]) for f in ("style", "genre")), className="card-note"),
        ], className="tooltip")

    @app.callback(Output("url", "href", allow_duplicate=True), Input("map-graph", "clickData"),
                  prevent_initial_call=True)
    def open_painting(click_data: dict | None) -> str:
        if not click_data:
            return no_update
        image_id = click_data["points"][0].get("customdata")
        return painting_href(image_id) if data.row_of(str(image_id)) is not None else no_update

