"""One painting: the image, its metadata, the clusters it belongs to, and its nearest neighbours."""

from __future__ import annotations

import numpy as np
from dash import Dash, dcc, html

from dash_app.components import (
    chart,
    cluster_href,
    gallery,
    hbar,
    message,
    needs,
    painting_href,
    similar_artists,
    text,
)
from dash_app.data import RunData, current
from dash_app.pages.review import duplicate_note
from dash_app.routes import image_url
from influence.runs import InfluenceError

FIELDS = ("artist", "year", "nationality", "style", "genre", "era")
#: Clusters with at least this responsibility count as an influence.
MIN_P = 0.05
INFLUENCES = 4
EXEMPLARS = 5
NEIGHBOURS = 12


def responsibilities(data: RunData, features: str, row: int) -> list[tuple[int, float]]:
    """The painting's GMM memberships (cluster, p), largest first."""
    p = data.clusterings[features].responsibilities_of(np.array([row]))[0]
    order = np.argsort(-p)
    return [(int(c), float(p[c])) for c in order if p[c] >= 0.01]


def influences(data: RunData, features: str, memberships: list[tuple[int, float]]) -> list:
    """For each cluster the painting belongs to, its most typical paintings."""
    typical = data.clusterings[features].typical
    typical = typical[typical["method"] == "gmm"]
    out = []
    for cluster, p in [m for m in memberships if m[1] >= MIN_P][:INFLUENCES]:
        ids = typical[typical["cluster"] == cluster].sort_values("rank")["image_id"]
        out.append(html.Div([
            html.Div([dcc.Link(f"Cluster {cluster}", href=cluster_href(features, "gmm", cluster)),
                      f" · {p:.0%}"], className="influence-label"),
            gallery(data, ids.head(EXEMPLARS), small=True),
        ], className="influence"))
    return out


def neighbours(data: RunData, image_id: str) -> list:
    if data.search_features is None:
        return [needs("index", data)]
    try:
        answer = data.neighbours(image_id, k=NEIGHBOURS)
    except InfluenceError as e:
        return [message(str(e), "error")]
    paintings, artists = answer.get("paintings", []), answer.get("artists", [])
    return [
        html.H3(f"Nearest paintings ({data.search_features})"),
        gallery(data, [p["image_id"] for p in paintings],
                [f"similarity {p['score']:.2f}" for p in paintings], id="painting-neighbours"),
        html.H3("Nearest artists"),
        *similar_artists(artists, "painting-artists"),
    ]


def layout(image_id: str | None = None, features: str | None = None, **_: str) -> html.Div:
    data = current()
    row = data.painting(image_id or "")
    if row is None:
        return message("No painting with this id in the run.", "error")
    meta = [html.Tr([html.Th(f), html.Td(text(row[f], "—"))]) for f in FIELDS]
    meta.append(html.Tr([html.Th("size"), html.Td(f"{row['width']} × {row['height']} px")]))
    features = data.default_features(features)
    side: list = []
    if features is None:
        side.append(needs("cluster", data))
    else:
        position = data.row_of(image_id)
        memberships = responsibilities(data, features, position)
        kmeans = int(data.clusterings[features].assignments["kmeans"].iat[position])
        side += [
            html.Div(["Feature set: ", *[
                html.Span(name, className="chip on") if name == features else
                dcc.Link(name, href=painting_href(image_id) + f"?features={name}",
                         className="chip") for name in data.features]], className="hint"),
            html.H3("Belongs to (GMM responsibilities)"),
            chart(hbar([f"cluster {c}" for c, _ in memberships[:8]],
                       [p for _, p in memberships[:8]]), id="painting-responsibilities"),
            html.P(["KMeans cluster: ", dcc.Link(f"cluster {kmeans}",
                                                  href=cluster_href(features, "kmeans", kmeans))]),
            html.H3("Influences: typical paintings of those clusters"),
            *influences(data, features, memberships),
        ]
    return html.Div([
        html.H2(text(row["title"], "untitled"), id="painting-title"),
        duplicate_note(data, image_id),
        html.Div([
            html.Div([
                html.Img(src=image_url(image_id), className="painting-image",
                         alt=text(row["title"], "untitled")),
                html.Table(meta, className="meta"),
            ], className="painting-left"),
            html.Div(side, className="painting-right"),
        ], className="painting-columns"),
        *neighbours(data, image_id),
    ])


def register(app: Dash) -> None:
    """The painting page is built whole by the router; it has no callbacks of its own."""
