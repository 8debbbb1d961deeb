"""Visual families (the clusters of a feature set): for a feature set and method, every family at
a glance, then one in detail. The page says "family" throughout; the path stays /clusters."""

from __future__ import annotations

from urllib.parse import urlencode

from dash import ALL, Dash, Input, Output, State, ctx, dcc, html, no_update

from dash_app import checks, filters
from dash_app.addresses import unknown_features
from dash_app.components import (
    PROFILE_NOTE,
    chart,
    downloads,
    gallery,
    needs,
    problem_note,
    profile_chart,
    send,
)
from dash_app.data import METHODS, RunData, current
from dash_app.routes import thumb_url
from influence.catalog import LABEL_FIELDS
from influence.export import cluster_export
from influence.selections import (
    MIN_P,
    cluster_profile,
    cluster_sizes,
    members_passing,
    top_label,
    typical_members,
)

OVERVIEW_THUMBS = 4
TYPICAL_SHOWN = 18


def _min_p(value: object) -> float:
    """A soft-membership threshold in [0.01, 1] (a number, or one written in a link)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return MIN_P
    return checks.number(value, 0.01, 1.0, MIN_P)


def _shown(sizes: dict[int, int], cluster: object) -> int:
    """The cluster to show: the one asked for, else the largest."""
    return cluster if checks.one_of(cluster, sizes, None) is not None else max(sizes,
                                                                               key=sizes.get)


def problem(data: RunData, features: str | None = None, method: str | None = None,
            cluster: str | None = None, **_: str) -> str | None:
    """What in the page's address names nothing in the run (see dash_app.addresses)."""
    if not data.clusterings:
        return None
    if unknown_features(data, features):
        return unknown_features(data, features)
    if method is not None and method not in METHODS:
        return f"There is no method '{method}' (there are {', '.join(METHODS)})."
    if cluster is not None:
        sizes = cluster_sizes(data.clusterings[data.default_features(features)],
                              checks.one_of(method, METHODS, "kmeans"))
        if checks.integer(cluster, 0, 10_000, None) not in sizes:
            return (f"There is no family '{cluster}' here (the families are numbered "
                    f"{min(sizes)} to {max(sizes)}).")
    return None


def layout(features: str | None = None, method: str | None = None, cluster: str | None = None,
           min_p: str | None = None, **query: str) -> html.Div:
    data = current()
    where = filters.from_url(query)
    wrong = problem(data, features, method, cluster)
    features = data.default_features(features)
    if features is None:
        return html.Div([html.H1("Visual families"), needs("cluster", data)])
    method = checks.one_of(method, METHODS, "kmeans")
    return html.Div([
        html.H1("Visual families"),
        problem_note(wrong, "Showing what the run has instead."),
        html.P("Groups of paintings whose pictures look alike, found from the features alone "
               "(not from their labels). KMeans puts each painting in one family; GMM gives each "
               "a share of membership in every family.", className="hint"),
        dcc.Store(id="clusters-selected", data=checks.integer(cluster, 0, 10_000, None)),
        html.Div([
            html.Label(["Feature set", dcc.Dropdown(data.features, features,
                                                    id="clusters-features", clearable=False)]),
            html.Label(["Method", dcc.Dropdown([{"label": v, "value": k}
                                                for k, v in METHODS.items()], method,
                                               id="clusters-method", clearable=False)]),
            html.Span(id="clusters-summary", className="hint"),
        ], className="controls"),
        html.Div(id="clusters-overview", className="cluster-grid"),
        filters.controls(data, where, "clusters"),
        html.Div([
            # A step of 0.01 so the default (MIN_P) and any two-decimal value are valid.
            html.Label(["GMM soft members: membership at least",
                        dcc.Input(id="clusters-min-p", type="number", min=0.01, max=1,
                                  step=0.01, value=_min_p(min_p), debounce=True)],
                       className="inline", id="clusters-min-p-label",
                       hidden=method != "gmm"),
            downloads("cluster", "this family's members"),
        ], className="controls"),
        dcc.Loading(html.Div(id="clusters-detail"), delay_show=300),
    ])


def register(app: Dash) -> None:
    @app.callback(Output("clusters-min-p-label", "hidden"), Input("clusters-method", "value"),
                  prevent_initial_call=True)
    def threshold_shown(method: object) -> bool:
        """The soft-membership threshold only means something for GMM."""
        return checks.one_of(method, METHODS, "kmeans") != "gmm"

    @app.callback(Output("clusters-selected", "data"),
                  Input({"type": "cluster-pick", "index": ALL}, "n_clicks"),
                  prevent_initial_call=True)
    def pick(clicks: object) -> int:
        picked = checks.mapping(ctx.triggered_id).get("index")
        if not isinstance(clicks, list) or not any(clicks):
            return no_update
        picked = checks.integer(picked, 0, 10_000, None)
        return no_update if picked is None else picked

    @app.callback(Output("clusters-overview", "children"), Output("clusters-summary", "children"),
                  Output("clusters-detail", "children"),
                  Input("clusters-features", "value"), Input("clusters-method", "value"),
                  Input("clusters-selected", "data"), Input("clusters-min-p", "value"),
                  *filters.inputs("clusters"))
    def show(features: object, method: object, cluster: object, min_p: object,
             *values: object) -> tuple:
        data = current()
        where = filters.read(data, *values)
        method, min_p = checks.one_of(method, METHODS, "kmeans"), _min_p(min_p)
        clustering = data.clusterings[data.default_features(features)]
        sizes = cluster_sizes(clustering, method)
        cluster = _shown(sizes, cluster)
        overview = []
        for c, n in sizes.items():
            labels = [t for t in (top_label(clustering, method, c, f)
                                  for f in ("style", "artist")) if t]
            overview.append(html.Button([
                html.Div([html.Img(src=thumb_url(i), alt="") for i in
                          typical_members(clustering, method, c)[:OVERVIEW_THUMBS]],
                         className="mini-thumbs"),
                html.Div([html.B(f"Family {c}"), f" · {n:,}"]),
                html.Div(" · ".join(labels), className="card-note"),
            ], id={"type": "cluster-pick", "index": c},
                className="cluster-tile selected" if c == cluster else "cluster-tile"))
        summary = (f"{len(sizes)} visual families ({METHODS[method]}) over "
                   f"{sum(sizes.values()):,} paintings; click one to see it.")
        charts = [chart(fig) for fig in (profile_chart(cluster_profile(
            clustering, method, cluster, f), f, "this family") for f in LABEL_FIELDS)
            if fig is not None]
        members = members_passing(clustering, data.catalog, method, cluster, min_p, where)
        soft = int((members["member"] == "soft").sum())
        if where:
            shown = html.H3(f"Members that pass the filter, most central first "
                            f"({len(members):,})")
            ids = list(members["image_id"][:TYPICAL_SHOWN])
        else:
            shown = html.H3("Most typical paintings")
            ids = typical_members(clustering, method, cluster)[:TYPICAL_SHOWN]
        detail = html.Div([
            html.H2(f"Family {cluster}: {sizes[cluster]:,} paintings "
                    f"({sizes[cluster] / sum(sizes.values()):.1%} of the collection)",
                    id="cluster-title"),
            html.P(f"The download lists {len(members):,} paintings"
                   + (f", {soft:,} of them soft members (membership ≥ {min_p or MIN_P:g} "
                      "without being assigned)" if method == "gmm" else "")
                   + ", most central first, with their scores.", className="hint",
                   id="cluster-members"),
            shown,
            gallery(data, ids, id="cluster-gallery"),
            html.H3("Who and what is in it, against the whole collection"),
            html.P(PROFILE_NOTE, className="hint"),
            html.Div(charts, className="chart-grid"),
        ])
        return overview, summary, detail

    @app.callback(Output("view-state", "data", allow_duplicate=True),
                  Input("clusters-features", "value"), Input("clusters-method", "value"),
                  Input("clusters-selected", "data"), Input("clusters-min-p", "value"),
                  *filters.inputs("clusters"), prevent_initial_call=True)
    def state(features: object, method: object, cluster: object, min_p: object,
              *values: object) -> str:
        data = current()
        query = {"features": data.default_features(features),
                 "method": checks.one_of(method, METHODS, "kmeans"),
                 **filters.read(data, *values).to_query()}
        cluster, min_p = checks.integer(cluster, 0, 10_000, None), _min_p(min_p)
        if cluster is not None:
            query["cluster"] = cluster
        if min_p != MIN_P:
            query["min_p"] = min_p
        return urlencode(query)

    @app.callback(Output("cluster-download", "data"), Input("cluster-csv", "n_clicks"),
                  Input("cluster-parquet", "n_clicks"), State("clusters-features", "value"),
                  State("clusters-method", "value"), State("clusters-selected", "data"),
                  State("clusters-min-p", "value"),
                  *filters.states("clusters"), prevent_initial_call=True)
    def export(_csv: int, _parquet: int, features: object, method: object, cluster: object,
               min_p: object, *values: object) -> dict:
        data = current()
        clustering = data.clusterings[data.default_features(features)]
        method = checks.one_of(method, METHODS, "kmeans")
        cluster = _shown(cluster_sizes(clustering, method), cluster)
        return send(cluster_export(data.name, data.catalog, clustering, method, cluster,
                                   _min_p(min_p), filters.read(data, *values)))
