"""Clusters: for a feature set and method, every cluster at a glance, then one in detail."""

from __future__ import annotations

import plotly.graph_objects as go
from dash import ALL, Dash, Input, Output, ctx, dcc, html, no_update

from dash_app.components import PALETTE, chart, gallery, needs, tidy
from dash_app.data import METHODS, RunData
from dash_app.routes import thumb_url
from influence.catalog import LABEL_FIELDS

OVERVIEW_THUMBS = 4
TYPICAL_SHOWN = 18
BARS = 8


def layout(data: RunData, query: dict[str, str]) -> html.Div:
    features = data.default_features(query.get("features"))
    if features is None:
        return needs("cluster", data)
    method = query.get("method", "kmeans")
    method = method if method in METHODS else "kmeans"
    try:
        cluster = int(query.get("cluster", ""))
    except ValueError:
        cluster = None
    return html.Div([
        dcc.Store(id="clusters-selected", data=cluster),
        html.Div([
            html.Label(["Feature set", dcc.Dropdown(data.features, features,
                                                    id="clusters-features", clearable=False)]),
            html.Label(["Method", dcc.Dropdown([{"label": v, "value": k}
                                                for k, v in METHODS.items()], method,
                                               id="clusters-method", clearable=False)]),
            html.Span(id="clusters-summary", className="hint"),
        ], className="controls"),
        html.Div(id="clusters-overview", className="cluster-grid"),
        dcc.Loading(html.Div(id="clusters-detail"), delay_show=300),
    ])


def _sizes(assignments: object, method: str) -> dict[int, int]:
    counts = assignments[method].value_counts()
    return {int(c): int(n) for c, n in counts.sort_index().items()}


def _top_label(profiles: object, method: str, cluster: int, field: str) -> str | None:
    rows = profiles[(profiles["method"] == method) & (profiles["cluster"] == cluster)
                    & (profiles["field"] == field)]
    if rows.empty:
        return None
    best = rows.sort_values("count", ascending=False).iloc[0]
    return f"{best['value']} {best['share']:.0%}"


def _profile_chart(profiles: object, method: str, cluster: int, field: str) -> go.Figure | None:
    """Shares of the commonest values in the cluster against the whole collection."""
    rows = profiles[(profiles["method"] == method) & (profiles["cluster"] == cluster)
                    & (profiles["field"] == field)]
    if rows.empty:
        return None
    rows = rows.sort_values("share", ascending=False).head(BARS).iloc[::-1]
    labels = [str(v) for v in rows["value"]]
    lift = [f"×{v:.1f}" for v in rows["lift"]]
    fig = go.Figure([
        go.Bar(y=labels, x=rows["collection_share"], orientation="h", name="whole collection",
               marker_color="#c8c8c8", hovertemplate="%{y}: %{x:.1%} of the collection"
               "<extra></extra>"),
        go.Bar(y=labels, x=rows["share"], orientation="h", name="this cluster",
               marker_color=PALETTE[0], text=lift, textposition="outside",
               customdata=rows["count"], hovertemplate="%{y}: %{x:.1%} of the cluster "
               "(%{customdata} paintings), %{text} the collection's share<extra></extra>"),
    ])
    fig.update_layout(barmode="group", bargap=0.25, showlegend=field == LABEL_FIELDS[0])
    fig = tidy(fig, field, 90 + 34 * len(labels), ".0%")
    # Room right of the longest bar for its "×lift" label.
    widest = float(max(rows["share"].max(), rows["collection_share"].max()))
    return fig.update_xaxes(range=[0, widest * 1.25])


def register(app: Dash, data: RunData) -> None:
    @app.callback(Output("clusters-selected", "data"),
                  Input({"type": "cluster-pick", "index": ALL}, "n_clicks"),
                  prevent_initial_call=True)
    def pick(clicks: list[int | None]) -> int:
        if not ctx.triggered_id or not any(clicks):
            return no_update
        return int(ctx.triggered_id["index"])

    @app.callback(Output("clusters-overview", "children"), Output("clusters-summary", "children"),
                  Output("clusters-detail", "children"),
                  Input("clusters-features", "value"), Input("clusters-method", "value"),
                  Input("clusters-selected", "data"))
    def show(features: str, method: str, cluster: int | None) -> tuple:
        clustering = data.clusterings[data.default_features(features)]
        sizes = _sizes(clustering.assignments, method)
        if cluster not in sizes:
            cluster = max(sizes, key=sizes.get)
        typical = clustering.typical[clustering.typical["method"] == method]
        overview = []
        for c, n in sizes.items():
            ids = typical[typical["cluster"] == c].sort_values("rank")["image_id"]
            labels = [t for t in (_top_label(clustering.profiles, method, c, f)
                                  for f in ("style", "artist")) if t]
            overview.append(html.Button([
                html.Div([html.Img(src=thumb_url(i), alt="")
                          for i in ids.head(OVERVIEW_THUMBS)], className="mini-thumbs"),
                html.Div([html.B(f"Cluster {c}"), f" · {n:,}"]),
                html.Div(" · ".join(labels), className="card-note"),
            ], id={"type": "cluster-pick", "index": c},
                className="cluster-tile selected" if c == cluster else "cluster-tile"))
        summary = (f"{len(sizes)} clusters ({METHODS[method]}) over {sum(sizes.values()):,} "
                   "paintings; click one to see it.")
        ids = typical[typical["cluster"] == cluster].sort_values("rank")["image_id"]
        charts = [chart(fig) for fig in (_profile_chart(clustering.profiles, method, cluster, f)
                                         for f in LABEL_FIELDS) if fig is not None]
        detail = html.Div([
            html.H2(f"Cluster {cluster}: {sizes[cluster]:,} paintings "
                    f"({sizes[cluster] / sum(sizes.values()):.1%} of the collection)",
                    id="cluster-title"),
            html.H3("Most typical paintings"),
            gallery(data, ids.head(TYPICAL_SHOWN), id="cluster-gallery"),
            html.H3("Who and what is in it, against the whole collection"),
            html.P("Grey: share in the whole collection; blue: share in this cluster, with how "
                   "many times the collection's share it is (×1 = as common as anywhere).",
                   className="hint"),
            html.Div(charts, className="chart-grid"),
        ])
        return overview, summary, detail
