"""The journey of visual families: where each family's paintings come from, across eras and
across nationalities, against the collection; click a cell to open the family."""

from __future__ import annotations

from urllib.parse import urlencode

import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html, no_update

from dash_app import checks
from dash_app.components import cluster_href, graph, needs
from dash_app.data import current

#: Nationalities shown (the commonest); eras are all shown.
NATIONALITIES = 15
DIMENSIONS = ("era", "nationality")
MEASURES = {"share": "share of the family's paintings",
            "lift": "lift: times the collection's share"}


def layout(dimension: str | None = None, measure: str | None = None, **_: str) -> html.Div:
    data = current()
    if data.influence is None:
        return html.Div([html.H1("The journey of visual families"), needs("influence", data)])
    return html.Div([
        html.H1("The journey of visual families"),
        html.Div([
            html.Label(["Across", dcc.Dropdown(
                [{"label": "eras", "value": "era"},
                 {"label": "nationalities", "value": "nationality"}],
                checks.one_of(dimension, DIMENSIONS, "era"),
                id="journey-dimension", clearable=False)]),
            html.Label(["Colour", dcc.Dropdown(
                [{"label": v, "value": k} for k, v in MEASURES.items()],
                checks.one_of(measure, MEASURES, "share"), id="journey-measure",
                clearable=False)]),
        ], className="controls"),
        html.P("One row per visual family (KMeans, on the "
               f"{data.influence.features} features): where its paintings fall. Click a cell to "
               "open the family.", className="hint"),
        graph(id="journey-figure"),
    ])


def figure(dimension: str, measure: str) -> go.Figure:
    flows = current().influence.flows
    rows = flows[flows["dimension"] == dimension]
    if dimension == "nationality":
        top = rows.groupby("value")["count"].sum().nlargest(NATIONALITIES).index
        rows = rows[rows["value"].isin(top)]
        columns = list(top)
    else:
        columns = sorted(rows["value"].unique())
    families = sorted(rows["family"].unique())
    grid = rows.pivot_table(index="family", columns="value", values=measure, fill_value=0)
    counts = rows.pivot_table(index="family", columns="value", values="count", fill_value=0)
    grid = grid.reindex(index=families, columns=columns, fill_value=0)
    counts = counts.reindex(index=families, columns=columns, fill_value=0)
    fig = go.Figure(go.Heatmap(
        z=grid.to_numpy(), x=columns, y=[f"family {f}" for f in families],
        customdata=counts.to_numpy(), colorscale="Blues",
        colorbar={"title": measure},
        hovertemplate="%{y}, %{x}: %{z:.2f} (%{customdata} paintings)<extra></extra>"))
    fig.update_layout(template="plotly_white", height=120 + 28 * len(families),
                      margin={"l": 10, "r": 10, "t": 10, "b": 60},
                      yaxis={"autorange": "reversed"})
    return fig


def register(app: Dash) -> None:
    @app.callback(Output("journey-figure", "figure"),
                  Output("view-state", "data", allow_duplicate=True),
                  Input("journey-dimension", "value"), Input("journey-measure", "value"),
                  prevent_initial_call="initial_duplicate")
    def show(dimension: object, measure: object) -> tuple:
        dimension = checks.one_of(dimension, DIMENSIONS, "era")
        measure = checks.one_of(measure, MEASURES, "share")
        return figure(dimension, measure), urlencode({"dimension": dimension,
                                                      "measure": measure})

    @app.callback(Output("url", "href", allow_duplicate=True),
                  Input("journey-figure", "clickData"), prevent_initial_call=True)
    def open_family(click: object) -> str:
        label = checks.text(checks.first_point(click).get("y"))
        family = checks.integer(label.removeprefix("family "), 0, 10_000, None)
        if not label.startswith("family ") or family is None:
            return no_update
        return cluster_href(current().influence.features, "kmeans", family)
