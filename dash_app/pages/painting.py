"""One painting: the image, its metadata with a link to its artist, the heads' predictions, the
visual families it belongs to, "show on map", and its nearest neighbours."""

from __future__ import annotations

from urllib.parse import urlencode

import numpy as np
from dash import Dash, dcc, html

from dash_app.addresses import unknown_features
from dash_app.components import (
    artist_href,
    chart,
    cluster_href,
    gallery,
    hbar,
    message,
    needs,
    painting_href,
    problem_note,
    similar_artists,
    start_links,
    text,
)
from dash_app.data import RunData, current
from dash_app.pages.review import duplicate_note
from dash_app.routes import image_url
from influence.runs import InfluenceError

FIELDS = ("artist", "year", "nationality", "style", "genre", "era")
#: Families with at least this membership are shown with their typical paintings.
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
    """For each family the painting belongs to, its most typical paintings."""
    typical = data.clusterings[features].typical
    typical = typical[typical["method"] == "gmm"]
    out = []
    for cluster, p in [m for m in memberships if m[1] >= MIN_P][:INFLUENCES]:
        ids = typical[typical["cluster"] == cluster].sort_values("rank")["image_id"]
        out.append(html.Div([
            html.Div([dcc.Link(f"Family {cluster}", href=cluster_href(features, "gmm", cluster)),
                      f" · {p:.0%}"], className="influence-label"),
            gallery(data, ids.head(EXEMPLARS), small=True),
        ], className="influence"))
    return out


def predictions(answer: dict) -> list:
    """The trained heads' top labels for the painting, one chart per target."""
    found = answer.get("predictions", {})
    if not found:
        return []
    return [html.H3("What the trained heads predict"),
            html.P("The classifiers' most probable labels from the picture alone (the painting "
                   "may have been among those they were trained on).", className="hint"),
            html.Div([html.Div([html.H4(target), chart(hbar(
                [p["label"] for p in labels], [p["p"] for p in labels]),
                id=f"painting-predict-{target}")]) for target, labels in found.items()],
                className="predictions", id="painting-predictions")]


def problem(data: RunData, image_id: str | None = None, features: str | None = None,
            **_: str) -> str | None:
    """What in the painting page's address names nothing in the run."""
    if data.row_of(image_id) is None:
        return f"There is no painting '{image_id}' in this run."
    return unknown_features(data, features)


def neighbours(data: RunData, image_id: str) -> tuple[list, list]:
    """The nearest paintings and artists, and the heads' predictions."""
    if data.search_features is None:
        return [needs("index", data)], []
    try:
        answer = data.neighbours(image_id, k=NEIGHBOURS)
    except InfluenceError as e:
        return [message(str(e), "error")], []
    paintings, artists = answer.get("paintings", []), answer.get("artists", [])
    return [
        html.H3(f"Nearest paintings ({data.search_features})"),
        gallery(data, [p["image_id"] for p in paintings],
                [f"similarity {p['score']:.2f}" for p in paintings], id="painting-neighbours"),
        html.H3("Nearest artists"),
        *similar_artists(artists, "painting-artists"),
    ], predictions(answer)


def layout(image_id: str | None = None, features: str | None = None, **_: str) -> html.Div:
    data = current()
    row = data.painting(image_id or "")
    if row is None:
        return html.Div([html.H1("No such painting"),
                         message(problem(data, image_id), "error", id="address-problem"),
                         html.P("Search for a title or an artist above, or start from:"),
                         start_links()])
    wrong = problem(data, image_id, features)
    href = artist_href(text(row["artist"])) if text(row["artist"], "") else None
    meta = [html.Tr([html.Th(f), html.Td(
        dcc.Link(text(row[f]), href=href, id="painting-artist") if f == "artist" and href
        else text(row[f], "—"))]) for f in FIELDS]
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
            dcc.Link("Show on the map", className="button", id="painting-on-map",
                     href="/map?" + urlencode({"features": features, "colour": "kmeans",
                                               "focus": image_id})),
            html.Div(["Feature set: ", *[
                html.Span(name, className="chip on") if name == features else
                dcc.Link(name, href=painting_href(image_id) + f"?features={name}",
                         className="chip") for name in data.features]], className="hint"),
            html.H3("Visual families it belongs to (GMM membership)"),
            chart(hbar([f"family {c}" for c, _ in memberships[:8]],
                       [p for _, p in memberships[:8]]), id="painting-responsibilities"),
            html.P(["KMeans family: ", dcc.Link(f"family {kmeans}",
                                                 href=cluster_href(features, "kmeans", kmeans))]),
            html.H3("The most typical paintings of those families"),
            *influences(data, features, memberships),
        ]
    near, predicted = neighbours(data, image_id)
    return html.Div([
        html.H1(text(row["title"], "untitled"), id="painting-title"),
        problem_note(wrong, "Showing what the run has instead."),
        duplicate_note(data, image_id),
        html.Div([
            html.Div([
                html.Img(src=image_url(image_id), className="painting-image",
                         alt=text(row["title"], "untitled")),
                html.Table(meta, className="meta"),
            ], className="painting-left"),
            html.Div([*predicted, *side], className="painting-right"),
        ], className="painting-columns"),
        *near,
    ])


def register(app: Dash) -> None:
    """The painting page is built whole by the router; it has no callbacks of its own."""
