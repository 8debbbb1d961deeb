"""Compare two artists: their labels, years and visual families side by side, and the closest
painting pairs between them (one painting of each, by the search features)."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from dash import Dash, Input, Output, dcc, html

from dash_app import checks
from dash_app.components import (
    PALETTE,
    artist_href,
    chart,
    message,
    needs,
    painting_card,
    problem_note,
    tidy,
)
from dash_app.data import RunData, current
from influence.catalog import artist_slug

FIELDS = ("style", "genre", "nationality")
#: Values of a field drawn (the commonest over both artists).
BARS = 8
PAIRS = 6
#: Years are counted per bin of this many.
DECADE = 10


def artists(data: RunData) -> dict[str, str]:
    """Every artist of the catalog by id (see `artist_slug`), in name order."""
    names = sorted(data.catalog["artist"].dropna().astype(str).unique())
    return {artist_slug(name): name for name in names}


def problem(data: RunData, a: str | None = None, b: str | None = None, **_: str) -> str | None:
    """What in the compare page's address names nothing in the run."""
    known = artists(data)
    wrong = [v for v in (a, b) if v is not None and v not in known]
    return f"There is no artist '{wrong[0]}' in this run." if wrong else None


def defaults(data: RunData) -> tuple[str | None, str | None]:
    """Two artists worth comparing: the run's strongest influence link, else the two artists
    with the most paintings."""
    if data.influence is not None:
        strongest = data.influence.strongest(1)
        if len(strongest):
            pair = strongest.iloc[0]
            return artist_slug(pair["influenced_by"]), artist_slug(pair["artist"])
    top = data.catalog["artist"].value_counts().index[:2]
    first, second, *_ = [*(artist_slug(str(name)) for name in top), None, None]
    return first, second


def layout(a: str | None = None, b: str | None = None, **_: str) -> html.Div:
    data = current()
    known = artists(data)
    wrong = problem(data, a, b)
    first, second = defaults(data)
    a = a if a in known else first
    b = b if b in known else second
    options = [{"label": name, "value": slug} for slug, name in known.items()]
    return html.Div([
        html.H1("Compare two artists"),
        problem_note(wrong, "Showing two other artists instead."),
        html.Div([
            html.Label(["First artist", dcc.Dropdown(options, a, id="compare-a",
                                                     clearable=False)]),
            html.Label(["Second artist", dcc.Dropdown(options, b, id="compare-b",
                                                      clearable=False)]),
        ], className="controls"),
        dcc.Loading(html.Div(id="compare-content"), delay_show=300),
    ])


def shares(rows: pd.DataFrame, field: str) -> pd.Series:
    return rows[field].dropna().astype(str).value_counts(normalize=True)


def side_by_side(values: list[str], left: pd.Series, right: pd.Series, names: tuple[str, str],
                 title: str, value_format: str = ".0%") -> go.Figure:
    """Two artists' shares of the same values as paired bars."""
    fig = go.Figure([go.Bar(x=values, y=[float(s.get(v, 0.0)) for v in values], name=name,
                            marker_color=PALETTE[n], hovertemplate=f"{name}: %{{x}}, "
                            "%{y:.0%} of their paintings<extra></extra>")
                     for n, (name, s) in enumerate(zip(names, (left, right), strict=True))])
    fig.update_layout(barmode="group", legend={"orientation": "h", "y": -0.3})
    fig = tidy(fig, title, 300)
    return fig.update_yaxes(tickformat=value_format)


def years_chart(a_rows: pd.DataFrame, b_rows: pd.DataFrame, names: tuple[str, str]
                ) -> go.Figure | None:
    """Paintings per decade, the two artists side by side; None when neither is dated."""
    decades = [pd.to_numeric(r["year"], errors="coerce").dropna() // DECADE * DECADE
               for r in (a_rows, b_rows)]
    if not any(len(d) for d in decades):
        return None
    span = np.concatenate([d.to_numpy() for d in decades])
    values = [str(int(v)) for v in np.arange(span.min(), span.max() + DECADE, DECADE)]
    counts = [d.astype(int).astype(str).value_counts(normalize=True) for d in decades]
    return side_by_side(values, *counts, names, "paintings per decade (dated ones)")


def closest(data: RunData, a_ids: list[str], b_ids: list[str]) -> list:
    if data.search_features is None:
        return [needs("index", data)]
    pairs = data.closest_pairs(a_ids, b_ids, PAIRS)
    return [html.Div([
        painting_card(data, p["a"], small=True),
        html.Div(f"↔ {p['score']:.2f}", className="pair-arrow"),
        painting_card(data, p["b"], small=True),
    ], className="evidence-pair") for p in pairs]


def comparison(data: RunData, a: str, b: str) -> list:
    known = artists(data)
    names = (known[a], known[b])
    catalog = data.catalog
    rows = [catalog[catalog["artist"] == name] for name in names]
    heads = []
    for name, part in zip(names, rows, strict=True):
        href = artist_href(name)
        years = pd.to_numeric(part["year"], errors="coerce").dropna()
        heads.append(html.Div([
            html.H2(dcc.Link(name, href=href) if href else name),
            html.P(f"{len(part):,} paintings"
                   + (f", dated {int(years.min())}–{int(years.max())}" if len(years) else "")),
        ]))
    charts = []
    for field in FIELDS:
        left, right = shares(rows[0], field), shares(rows[1], field)
        values = list((left.add(right, fill_value=0)).sort_values(ascending=False).index[:BARS])
        if values:
            charts.append(chart(side_by_side(values, left, right, names, field),
                                id=f"compare-{field}"))
    features = (data.influence.features if data.influence is not None else None) \
        or data.default_features()
    if features in data.clusterings:
        families = data.clusterings[features].assignments["kmeans"]
        left, right = (families[part.index].astype(str).value_counts(normalize=True)
                       for part in rows)
        values = sorted(set(left.index) | set(right.index), key=int)
        fig = side_by_side(values, left, right, names, f"visual families ({features})")
        charts.append(chart(fig.update_xaxes(tickprefix="family ", type="category"),
                            id="compare-families"))
    years = years_chart(*rows, names)
    if years is not None:
        charts.append(chart(years, id="compare-years"))
    ids = [list(part["image_id"]) for part in rows]
    pairs = closest(data, *ids)
    return [
        html.Div(heads, className="two-columns"),
        html.Div(charts, className="chart-grid"),
        html.H3(f"Their closest painting pairs ({data.search_features or 'no'} features)"),
        html.P("One painting of each artist per pair, most alike first; each painting is in "
               "one pair at most.", className="hint"),
        html.Div(pairs or [message("No pairs to show.")], className="compare-pairs",
                 id="compare-pairs"),
    ]


def register(app: Dash) -> None:
    @app.callback(Output("compare-content", "children"),
                  Output("view-state", "data", allow_duplicate=True),
                  Input("compare-a", "value"), Input("compare-b", "value"),
                  prevent_initial_call="initial_duplicate")
    def show(a: object, b: object) -> tuple:
        data = current()
        known = artists(data)
        a, b = checks.one_of(a, known, None), checks.one_of(b, known, None)
        if a is None or b is None:
            return [message("Choose two artists.")], urlencode({})
        return comparison(data, a, b), urlencode({"a": a, "b": b})
