"""The start page: what the collection holds, what the tool found in it (visual families,
the strongest influence links and their painting pairs) and where to go next."""

from __future__ import annotations

import pandas as pd
from dash import Dash, dcc, html

from dash_app.components import (
    artist_href,
    cluster_href,
    needs,
    painting_card,
    start_links,
    text,
)
from dash_app.data import RunData, current
from dash_app.routes import thumb_url
from influence.selections import cluster_sizes, family_label, typical_members

#: Strongest links listed, and how many of them show a painting pair.
LINKS = 6
PAIRS = 3

INTRO = ("The explorer reads every painting as a picture. A neural network turns each image "
         "into a list of numbers, its features (a feature set is one such network), so that "
         "paintings that look alike get close numbers. From those it groups the paintings into "
         "visual families, places them on a map where neighbours look alike, and ranks, for "
         "each artist, the earlier artists whose work theirs most resembles. Resemblance "
         "ordered in time is evidence to weigh, not proof of influence.")


def holdings(data: RunData) -> html.P:
    """What the collection holds: paintings, artists, dated years, styles, nationalities."""
    catalog = data.catalog
    years = pd.to_numeric(catalog["year"], errors="coerce").dropna()
    dated = (f"{len(years):,} of them dated, from {int(years.min())} to {int(years.max())}"
             if len(years) else "none of them dated")
    return html.P([
        html.B(f"{len(catalog):,} paintings"), " by ",
        html.B(f"{catalog['artist'].nunique():,} artists"),
        f", {dated}; {catalog['style'].nunique():,} styles, "
        f"{catalog['genre'].nunique():,} genres and "
        f"{catalog['nationality'].nunique():,} nationalities.",
    ], id="home-counts")


def families(data: RunData, features: str) -> html.Div:
    """A tile per visual family: its most typical painting, its size and what sets it apart."""
    clustering = data.clusterings[features]
    tiles = []
    for cluster, size in sorted(cluster_sizes(clustering, "kmeans").items(),
                                key=lambda item: -item[1]):
        typical = typical_members(clustering, "kmeans", cluster)
        label = family_label(clustering, "kmeans", cluster)
        tiles.append(dcc.Link([
            html.Img(src=thumb_url(typical[0]), className="thumb",
                     alt=f"the most typical painting of family {cluster}") if typical else None,
            html.Div(f"Family {cluster} · {size:,}", className="card-title"),
            html.Div(f"{label['value']} ×{label['lift']:.1f}" if label else "mixed",
                     className="card-note"),
        ], href=cluster_href(features, "kmeans", cluster), className="family-tile"))
    return html.Div(tiles, className="family-tiles", id="home-families")


def links(data: RunData) -> list:
    """The strongest influence candidates of the run, and painting pairs of the first few."""
    inf = data.influence
    if inf is None:
        return [needs("influence", data)]
    strongest = inf.strongest(LINKS).to_dict("records")
    if not strongest:
        return [html.P("No candidate in this run rises above the floor.", className="hint")]
    items = [html.Li([
        dcc.Link(p["influenced_by"], href=artist_href(p["influenced_by"])), " → ",
        dcc.Link(p["artist"], href=artist_href(p["artist"])),
        f": closer than {p['percentile']:.0f}% of all artist pairs, {p['relation']}"
        + ("" if pd.isna(p.get("gap")) else f", {abs(p['gap']):.0f} years apart"),
    ]) for p in strongest]
    pairs = []
    for p in strongest[:PAIRS]:
        if not len(p["evidence"]):
            continue
        e = p["evidence"][0]
        pairs.append(html.Div([
            painting_card(data, e["influenced_by_image_id"], small=True),
            html.Div(f"→ {e['similarity']:.2f}", className="pair-arrow"),
            painting_card(data, e["image_id"], small=True),
        ], className="evidence-pair"))
    return [html.Ol(items, id="home-links"),
            html.H3("A few striking pairs: an earlier painting and a later one that resembles it"),
            html.Div(pairs, className="home-pairs", id="home-pairs")]


def layout(**_: str) -> html.Div:
    data = current()
    features = (data.influence.features if data.influence is not None
                and data.influence.features in data.clusterings else data.default_features())
    found: list = ([needs("cluster", data)] if features is None else [
        html.H3(["Visual families (", text(features), " features): ",
                 dcc.Link("all of them", href="/clusters")]),
        html.P("A visual family is a group of paintings whose pictures look alike, found "
               "without reading their labels; under each, the artist, style or era it holds "
               "most often against the whole collection (×: times as often).", className="hint"),
        families(data, features),
    ])
    return html.Div([
        html.H1(f"{data.name}: what the pictures say"),
        html.P(INTRO, className="lead"),
        html.H2("What the collection holds"),
        holdings(data),
        html.H2("What the tool found"),
        *found,
        html.H3("The strongest influence candidates"),
        *links(data),
        html.H2("Where to start"),
        start_links(),
    ])


def register(app: Dash) -> None:
    """The start page is built whole by its layout; it has no callbacks of its own."""
