"""The map: every painting on the UMAP plane of a feature set, coloured by visual family or
metadata, narrowed by filters; a box or lasso selection opens a panel with what it holds. The
default view spans the 1st to 99th percentile of the points (a few outliers would otherwise
squeeze the rest into a corner); `focus=IMAGE_ID` marks and centres one painting, `at=X,Y` a
place (where an upload lands)."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import plotly.graph_objects as go
from dash import Dash, Input, Output, Patch, State, dcc, html, no_update
from plotly.colors import qualitative

from dash_app import checks, filters
from dash_app.addresses import unknown_features
from dash_app.components import (
    PROFILE_NOTE,
    below_toolbar,
    chart,
    downloads,
    gallery,
    graph,
    message,
    needs,
    painting_href,
    problem_note,
    profile_chart,
    send,
    text,
)
from dash_app.data import METHODS, RunData, current
from dash_app.routes import thumb_url
from influence.catalog import LABEL_FIELDS
from influence.export import filter_export, selection_export
from influence.selections import Filter, family_label, label_shares, region_rows

#: Categories shown in the legend before the rest are pooled as "other".
MAX_GROUPS = 20
COLOURS = qualitative.Dark24 + qualitative.Light24
OTHER = "#c8c8c8"
#: A view holding at most this many paintings draws them as thumbnails.
THUMBS = 300
#: A thumbnail's side as a share of the view's width.
THUMB_SHARE = 0.035
SELECTION_SHOWN = 48
LIKE = 12
#: The callback whose request carries a selection's points (dash_app.guard): Plotly sends
#: every selected point, about 100 bytes each.
LARGE_OUTPUTS = ("map-region.data",)


#: The keys of a hover point's bounding box that the tooltip uses.
BBOX = frozenset({"x0", "x1", "y0", "y1"})
#: The default view: this percentile range of the points, widened by MARGIN of it each side.
VIEW_PERCENTILES = (1, 99)
MARGIN = 0.08
#: A marked painting or place is shown in a view this share of the default one.
CLOSE_UP = 0.35


def colour_options() -> list[dict[str, str]]:
    return ([{"label": f"visual family ({label})", "value": m} for m, label in METHODS.items()]
            + [{"label": name, "value": name} for name in LABEL_FIELDS])


COLOURINGS = frozenset(o["value"] for o in colour_options())


def colouring(value: object) -> str:
    """A known colouring, else the KMeans clusters."""
    return checks.one_of(value, COLOURINGS, "kmeans")


# ---------------------------------------------------------------------------- state in the URL
def parse_region(box: str | None = None, lasso: str | None = None) -> dict | None:
    """A selection from the URL: box=x0,x1,y0,y1 or lasso=x1,y1,x2,y2,... (checked as any
    region from the browser is)."""
    try:
        if box:
            x0, x1, y0, y1 = (float(v) for v in box.split(",", 4))
            return checks.region({"x": [x0, x1], "y": [y0, y1]})
        if lasso and lasso.count(",") < 2 * checks.MAX_VERTICES:
            values = [float(v) for v in lasso.split(",")]
            if len(values) % 2 == 0:
                return checks.region({"lasso_x": values[0::2], "lasso_y": values[1::2]})
    except ValueError:
        pass
    return None


def parse_at(at: object) -> list[float] | None:
    """A place on the map from the URL: at=x,y (two finite numbers), else None."""
    if not isinstance(at, str) or at.count(",") != 1:
        return None
    try:
        return checks.numbers([float(v) for v in at.split(",")], 2)
    except ValueError:
        return None


def problem(data: RunData, features: str | None = None, focus: str | None = None,
            at: str | None = None, **_: str) -> str | None:
    """What in the map's address names nothing in the run (see dash_app.addresses)."""
    if unknown_features(data, features):
        return unknown_features(data, features)
    if focus is not None and data.row_of(focus) is None:
        return f"There is no painting '{focus}' in this run."
    if at is not None and parse_at(at) is None:
        return f"'{at}' is not a place on the map (two numbers: at=x,y)."
    return None


def region_query(region: dict | None) -> dict[str, str]:
    if not region:
        return {}
    if "lasso_x" in region:
        return {"lasso": ",".join(f"{x:.4f},{y:.4f}" for x, y in
                                  zip(region["lasso_x"], region["lasso_y"], strict=True))}
    return {"box": ",".join(f"{v:.4f}" for v in (*region["x"], *region["y"]))}


def region_of(selected: dict | None) -> dict | None:
    """The region of a Plotly selection event (its box range or lasso outline), None when it
    has none or it does not check out (see checks.region)."""
    selected = checks.mapping(selected)
    if selected.get("lassoPoints"):
        points = checks.mapping(selected["lassoPoints"])
        return checks.region({"lasso_x": points.get("x"), "lasso_y": points.get("y")})
    if selected.get("range"):
        box = checks.mapping(selected["range"])
        return checks.region({"x": box.get("x"), "y": box.get("y")})
    return None


def layout(features: str | None = None, colour: str | None = None, box: str | None = None,
           lasso: str | None = None, focus: str | None = None, at: str | None = None,
           **query: str) -> html.Div:
    data = current()
    wrong = problem(data, features, focus, at)
    features = data.default_features(features)
    if features is None:
        return html.Div([html.H1("Map of the collection"), needs("cluster", data)])
    colour = colouring(colour)
    where = filters.from_url(query)
    marks = {"focus": focus if data.row_of(focus) is not None else None, "at": parse_at(at)}
    return html.Div([
        html.H1("Map of the collection"),
        problem_note(wrong, f"Showing the {features} map instead."),
        dcc.Store(id="map-region", data=parse_region(box, lasso)),
        dcc.Store(id="map-marks", data=marks),
        html.Div([
            html.Label(["Feature set", dcc.Dropdown(data.features, features, id="map-features",
                                                    clearable=False)]),
            html.Label(["Colour by", dcc.Dropdown(colour_options(), colour, id="map-colour",
                                                  clearable=False)]),
            html.Span("Paintings that look alike lie close together. Hover a point to see the "
                      "painting, click to open it; box or lasso select (toolbar) to see what a "
                      "region holds; double-click to see every point.", className="hint"),
        ], className="controls"),
        filters.controls(data, where, "map"),
        html.Div([html.Span(id="map-count"), downloads("map", "these paintings")],
                 className="controls"),
        # The tooltip is placed by the hovered point's box, which is relative to the chart:
        # the two share a positioned parent.
        html.Div([
            dcc.Loading(graph(id="map-graph", clear_on_unhover=True, className="map-graph",
                              config={"scrollZoom": True}), delay_show=300),
            dcc.Tooltip(id="map-tooltip", direction="right"),
        ], className="map-wrap"),
        html.Div(id="selection-panel"),
    ])


# ------------------------------------------------------------------------------------ figures
def shown_rows(data: RunData, where: Filter) -> np.ndarray:
    return np.flatnonzero(where.mask(data.catalog))


def selected_rows(data: RunData, features: str, where: Filter, region: dict | None) -> np.ndarray:
    """Catalog rows inside the region among those the filter keeps."""
    return region_rows(data.clusterings[features], data.catalog, where, region)


def thumbnails(data: RunData, features: str, rows: np.ndarray,
               view: tuple[float, float, float, float] | None = None) -> list[dict]:
    """Layout images drawing each painting (rows) in view as its thumbnail, or [] when the view
    holds more than THUMBS."""
    a = data.clusterings[features].assignments
    x, y = a["umap_x"].to_numpy()[rows], a["umap_y"].to_numpy()[rows]
    if view is not None:
        x0, x1, y0, y1 = view
        inside = (x >= min(x0, x1)) & (x <= max(x0, x1)) & (y >= min(y0, y1)) & (y <= max(y0, y1))
        rows, x, y = rows[inside], x[inside], y[inside]
        width = abs(x1 - x0)
    else:
        width = float(x.max() - x.min()) if len(x) else 1.0
    if len(rows) == 0 or len(rows) > THUMBS:
        return []
    size = max(width, 1e-3) * THUMB_SHARE * (2 if len(rows) < 40 else 1)
    ids = a["image_id"].to_numpy()[rows]
    return [{"source": thumb_url(i), "xref": "x", "yref": "y", "x": float(px), "y": float(py),
             "sizex": size, "sizey": size, "xanchor": "center", "yanchor": "middle",
             "layer": "above"} for i, px, py in zip(ids, x, y, strict=True)]


def default_view(x: np.ndarray, y: np.ndarray) -> tuple[list[float], list[float]] | None:
    """The x and y ranges of the default view: the VIEW_PERCENTILES range of the points,
    widened by MARGIN; None without points."""
    if not len(x):
        return None
    ranges = []
    for v in (x, y):
        low, high = (float(q) for q in np.percentile(v, VIEW_PERCENTILES))
        pad = max(high - low, 1e-3) * MARGIN
        ranges.append([low - pad, high + pad])
    return ranges[0], ranges[1]


def close_up(point: tuple[float, float], view: tuple[list[float], list[float]]
             ) -> tuple[list[float], list[float]]:
    """A view CLOSE_UP the size of `view`, centred on a point."""
    return tuple([c - (v[1] - v[0]) * CLOSE_UP / 2, c + (v[1] - v[0]) * CLOSE_UP / 2]
                 for c, v in zip(point, view, strict=True))


def family_name(data: RunData, features: str, method: str, cluster: int) -> str:
    """'family 3 · Rembrandt': a family and what it holds most often against the collection."""
    label = family_label(data.clusterings[features], method, cluster)
    return f"family {cluster}" + (f" · {label['value']}" if label else "")


def figure(data: RunData, features: str, colour: str, where: Filter,
           region: dict | None, marks: dict | None = None) -> go.Figure:
    """The scatter of the paintings the filter keeps, one trace per colour group; families
    labelled at their middle; a marked painting or place (see the module doc) as a star."""
    assignments = data.clusterings[features].assignments
    rows = shown_rows(data, where)
    if colour in METHODS:
        groups = assignments[colour].astype(int)
        order = list(groups.value_counts().index)
        names = {g: family_name(data, features, colour, g) for g in order}
    else:
        groups = data.catalog[colour].fillna("unknown")
        counts = groups.value_counts()
        order = list(counts.index[:MAX_GROUPS])
        groups = groups.where(groups.isin(order), "other")
        if len(counts) > MAX_GROUPS:
            order.append("other")
        names = {g: str(g) for g in order}
    groups = groups.to_numpy()[rows]
    x, y = assignments["umap_x"].to_numpy()[rows], assignments["umap_y"].to_numpy()[rows]
    fig = go.Figure()
    labels = []
    for n, group in enumerate(order):
        mask = groups == group
        if not mask.any():
            continue
        if colour in METHODS:
            labels.append({"x": float(np.median(x[mask])), "y": float(np.median(y[mask])),
                           "text": names[group].replace(" · ", "<br>"), "showarrow": False,
                           "font": {"size": 12, "color": "#1f2630"},
                           "bgcolor": "rgba(255,255,255,0.8)", "borderpad": 2})
        fig.add_trace(go.Scattergl(
            x=x[mask], y=y[mask], mode="markers", name=f"{names[group]} ({mask.sum():,})",
            # Row numbers, not ids: 100k ids are 2 MB of text. A plain list, not an array: plotly
            # would send an array in binary, which Dash's hover and click events cannot read.
            customdata=rows[mask].tolist(), hoverinfo="none",
            marker={"size": 5 if len(rows) > THUMBS else 9, "opacity": 0.8,
                    "color": OTHER if group == "other" else COLOURS[n % len(COLOURS)]}))
    view = default_view(x, y)
    marks = checks.mapping(marks)
    marked = []
    focus = data.row_of(marks.get("focus"))
    if focus is not None:
        marked.append(("this painting", float(assignments["umap_x"].iat[focus]),
                       float(assignments["umap_y"].iat[focus])))
    at = checks.numbers(marks.get("at"), 2)
    if at is not None:
        marked.append(("your image", *at))
    for name, px, py in marked:
        fig.add_trace(go.Scatter(x=[px], y=[py], mode="markers", name=name, hoverinfo="skip",
                                 marker={"symbol": "star", "size": 22, "color": "#111",
                                         "line": {"width": 2, "color": "#fff"}}))
    if marked and view is not None:
        view = close_up(marked[-1][1:], view)
    fig.update_layout(template="plotly_white", height=680, margin={"l": 0, "r": 0, "t": 10,
                      "b": 0}, legend={"itemsizing": "constant", "font": {"size": 11}},
                      xaxis={"visible": False, **({"range": view[0]} if view else {})},
                      yaxis={"visible": False, **({"range": view[1]} if view else {})},
                      dragmode="pan", uirevision=f"{features}|{where}|{marks}",
                      images=thumbnails(data, features, rows), annotations=labels)
    below_toolbar(fig)
    if region and "lasso_x" in region:
        path = "M" + "L".join(f"{a},{b}" for a, b in zip(region["lasso_x"], region["lasso_y"],
                                                         strict=True)) + "Z"
        fig.update_layout(selections=[{"type": "path", "path": path}])
    elif region:
        fig.update_layout(selections=[{"type": "rect", "x0": region["x"][0],
                                       "x1": region["x"][1], "y0": region["y"][0],
                                       "y1": region["y"][1]}])
    return fig


def selection_panel(data: RunData, features: str, where: Filter, region: dict | None) -> list:
    rows = selected_rows(data, features, where, region)
    if not region:
        return []
    if len(rows) == 0:
        return [message("The selection holds no paintings.", id="selection-title")]
    ids = data.catalog["image_id"].to_numpy()[rows]
    shares = label_shares(data.catalog, rows)
    charts = [chart(fig) for fig in (profile_chart(shares[shares["field"] == f], f,
                                                   "the selection") for f in LABEL_FIELDS)
              if fig is not None]
    parts = [
        html.H2(f"Selection: {len(rows):,} paintings", id="selection-title"),
        downloads("selection", "the selection"),
        gallery(data, ids[:SELECTION_SHOWN], id="selection-gallery"),
        html.P(f"Showing {SELECTION_SHOWN} of {len(rows):,}; the download has them all."
               if len(rows) > SELECTION_SHOWN else "", className="hint"),
        html.H3("Who and what is in it, against the whole collection"),
        html.P(PROFILE_NOTE, className="hint"),
        html.Div(charts, className="chart-grid"),
    ]
    if data.search_features is not None:
        like = data.like(list(ids), k=LIKE)
        parts += [html.H3(f"Paintings like these (the selection's mean {data.search_features} "
                          "vector)"),
                  gallery(data, [p["image_id"] for p in like],
                          [f"similarity {p['score']:.2f}" for p in like], id="selection-like")]
    return parts


# ---------------------------------------------------------------------------------- callbacks
def register(app: Dash) -> None:
    @app.callback(Output("map-graph", "figure"), Output("map-count", "children"),
                  Input("map-features", "value"), Input("map-colour", "value"),
                  *filters.inputs("map"), State("map-region", "data"), State("map-marks", "data"))
    def show(features: object, colour: object, *values: object) -> tuple:
        *values, region, marks = values
        data = current()
        where = filters.read(data, *values)
        features, colour = data.default_features(features), colouring(colour)
        region = checks.region(region)
        shown = int(where.mask(data.catalog).sum())
        count = (f"{shown:,} of {len(data.catalog):,} paintings" if where
                 else f"all {shown:,} paintings")
        return figure(data, features, colour, where, region, marks), count

    @app.callback(Output("map-graph", "figure", allow_duplicate=True),
                  Input("map-graph", "relayoutData"), State("map-features", "value"),
                  *filters.states("map"),
                  prevent_initial_call=True)
    def zoom(relayout: object, features: object, *values: object) -> Patch:
        """Thumbnails instead of dots once the view holds few enough paintings."""
        relayout = checks.mapping(relayout)
        keys = ("xaxis.range[0]", "xaxis.range[1]", "yaxis.range[0]", "yaxis.range[1]")
        view = checks.numbers([relayout.get(k) for k in keys], 4)
        if not (view or relayout.get("xaxis.autorange") is True):
            return no_update
        data = current()
        rows = shown_rows(data, filters.read(data, *values))
        view = None if relayout.get("xaxis.autorange") is True else tuple(view)
        patch = Patch()
        patch["layout"]["images"] = thumbnails(data, data.default_features(features), rows, view)
        return patch

    @app.callback(Output("map-region", "data"), Input("map-graph", "selectedData"),
                  prevent_initial_call=True)
    def select(selected: object) -> dict | None:
        # Plotly may report a selection restored from the figure (a shared link) without its
        # outline: keep the region then; a cleared selection (double-click) clears it.
        if selected is None:
            return None
        region = region_of(selected)
        return no_update if region is None else region

    @app.callback(Output("selection-panel", "children"), Input("map-region", "data"),
                  Input("map-features", "value"), *filters.inputs("map"))
    def panel(region: object, features: object, *values: object) -> list:
        data = current()
        return selection_panel(data, data.default_features(features),
                               filters.read(data, *values), checks.region(region))

    @app.callback(Output("view-state", "data", allow_duplicate=True),
                  Input("map-features", "value"), Input("map-colour", "value"),
                  *filters.inputs("map"), Input("map-region", "data"),
                  State("map-marks", "data"), prevent_initial_call=True)
    def state(features: object, colour: object, *values: object) -> str:
        *values, region, marks = values
        data = current()
        where = filters.read(data, *values)
        marks = checks.mapping(marks)
        focus, at = data.id_at(data.row_of(marks.get("focus"))), checks.numbers(marks.get("at"), 2)
        return urlencode({"features": data.default_features(features),
                          "colour": colouring(colour), **where.to_query(),
                          **region_query(checks.region(region)),
                          **({"focus": focus} if focus else {}),
                          **({"at": f"{at[0]:.4f},{at[1]:.4f}"} if at else {})})

    @app.callback(Output("selection-download", "data"), Input("selection-csv", "n_clicks"),
                  Input("selection-parquet", "n_clicks"), State("map-region", "data"),
                  State("map-features", "value"),
                  *filters.states("map"),
                  prevent_initial_call=True)
    def export_selection(_csv: int, _parquet: int, region: object, features: object,
                         *values: object) -> dict:
        data = current()
        features = data.default_features(features)
        where = filters.read(data, *values)
        rows = selected_rows(data, features, where, checks.region(region))
        if len(rows) == 0:
            return no_update
        export = selection_export(data.name, data.catalog,
                                  data.catalog["image_id"].to_numpy()[rows],
                                  f"{features}-map-selection")
        return send(export)

    @app.callback(Output("map-download", "data"), Input("map-csv", "n_clicks"),
                  Input("map-parquet", "n_clicks"), *filters.states("map"),
                  prevent_initial_call=True)
    def export_filter(_csv: int, _parquet: int, *values: object) -> dict:
        data = current()
        export = filter_export(data.name, data.catalog, filters.read(data, *values))
        return send(export)

    @app.callback(Output("map-tooltip", "show"), Output("map-tooltip", "bbox"),
                  Output("map-tooltip", "children"), Input("map-graph", "hoverData"))
    def hover(hover_data: object) -> tuple:
        point = checks.first_point(hover_data)
        data = current()
        row = data.painting(data.id_at(point.get("customdata")))
        if row is None:
            return False, no_update, no_update
        year = text(row["year"], "")
        bbox = checks.mapping(point.get("bbox"))
        bbox = {k: v for k, v in bbox.items() if k in BBOX
                and checks.number(v, -1e6, 1e6, None) is not None} or no_update
        return True, bbox, html.Div([
            html.Img(src=thumb_url(row["image_id"]), className="tooltip-thumb",
                     alt=f"{text(row['title'], 'untitled')} by {text(row['artist'])}"),
            html.Div(text(row["title"], "untitled"), className="card-title"),
            html.Div(f"{text(row['artist'])}{', ' + year if year else ''}",
                     className="card-artist"),
            html.Div(" · ".join(text(row[f]) for f in ("style", "genre")), className="card-note"),
        ], className="tooltip")

    @app.callback(Output("url", "href", allow_duplicate=True), Input("map-graph", "clickData"),
                  prevent_initial_call=True)
    def open_painting(click_data: object) -> str:
        image_id = current().id_at(checks.first_point(click_data).get("customdata"))
        return painting_href(image_id) if image_id is not None else no_update
