"""An artist: their paintings, active years and visual families, and the artists they most
resemble, earlier (possible influences) and later (possibly influenced), each with the painting
pairs that make the case. Resemblance ordered by time is evidence to weigh, not proof."""

from __future__ import annotations

from urllib.parse import urlencode

import pandas as pd
from dash import Dash, dcc, html

from dash_app.components import (
    cluster_href,
    gallery,
    message,
    needs,
    painting_card,
    start_links,
    text,
)
from dash_app.data import RunData, current

PAINTINGS_SHOWN = 24
CANDIDATES = 5


def _years(row: dict, start: str, end: str) -> str:
    first, last = row.get(start), row.get(end)
    if pd.isna(first) and pd.isna(last):
        return "unknown"
    return f"{'?' if pd.isna(first) else int(first)}–{'?' if pd.isna(last) else int(last)}"


def _mix(items: object, shown: int = 4) -> str:
    return ", ".join(f"{i['label']} {i['share']:.0%}" for i in list(items)[:shown]) or "—"


def _when(pair: dict, kind: str) -> str:
    """How the candidate stands in time to the artist of the page."""
    if pair["relation"] == "undated":
        return "undated: resemblance only"
    years = "" if pd.isna(pair.get("gap")) else f", {abs(pair['gap']):.0f} years apart"
    if kind == "later":
        return ("later" if pair["relation"] == "earlier" else "alongside, later") + years
    return pair["relation"] + years


def problem(data: RunData, artist_id: str | None = None, **_: str) -> str | None:
    """What in the artist page's address names nothing in the run (a run without the influence
    stage has no artist pages yet: that is said, not a wrong address)."""
    if data.influence is None or data.influence.artist(artist_id or "") is not None:
        return None
    return f"There is no artist '{artist_id}' in this run."


def candidate(data: RunData, pair: dict, other: str, kind: str, me: str) -> html.Div:
    """One candidate artist with its standing and its evidence: earlier painting, later one."""
    inf = data.influence
    other_row = inf.artists[inf.artists["artist"] == other].iloc[0]
    pairs = [html.Div([
        painting_card(data, e["influenced_by_image_id"], small=True),
        html.Div(f"→ {e['similarity']:.2f}", className="pair-arrow"),
        painting_card(data, e["image_id"], small=True),
    ], className="evidence-pair") for e in pair["evidence"]]
    return html.Div([
        html.Div([
            dcc.Link(other, href=f"/artist/{other_row['artist_id']}", className="candidate-name"),
            " · ",
            html.Span(f"closer than {pair['percentile']:.0f}% of all pairs",
                      title=f"score {pair['score']:.2f} (resemblance in standard deviations "
                            f"above an average artist, with the time part)"),
            f" · {_when(pair, kind)}",
            html.Span("recorded influence", className="chip on") if pair.get("recorded")
            else None,
            " · ",
            dcc.Link("compare", href="/compare?" + urlencode({"a": other_row["artist_id"],
                                                               "b": me})),
        ]),
        html.Div(pairs, className="evidence"),
    ], className=f"candidate {kind}")


def _candidates(data: RunData, pairs: list[dict], other: str, kind: str, me: str) -> list:
    return ([candidate(data, p, p[other], kind, me) for p in pairs]
            or [html.P("None in this run.", className="hint")])


def layout(artist_id: str | None = None, **_: str) -> html.Div:
    data = current()
    if data.influence is None:
        return html.Div([html.H1("Artist"), needs("influence", data)])
    row = data.influence.artist(artist_id or "")
    if row is None:
        return html.Div([html.H1("No such artist"),
                         message(problem(data, artist_id), "error", id="address-problem"),
                         html.P("Search for an artist above, or start from:"), start_links()])
    name = row["artist"]
    features = data.influence.features
    ids = data.catalog.loc[data.catalog["artist"] == name, "image_id"]
    families = [dcc.Link(f"family {f['cluster']} · {f['share']:.0%}", className="chip",
                         href=cluster_href(features, "kmeans", f["cluster"]))
                for f in list(row["families"])[:6]]
    earlier = data.influence.earlier(name, CANDIDATES).to_dict("records")
    later = data.influence.later(name, CANDIDATES).to_dict("records")
    undated = data.influence.undated(name, CANDIDATES).to_dict("records")
    recorded = data.influence.evaluation is not None
    return html.Div([
        html.H1(name, id="artist-name"),
        html.Table([html.Tr([html.Th(k), html.Td(v)]) for k, v in (
            ("nationality", text(row.get("nationality"), "—")),
            ("life", _years(row, "birth_year", "death_year")),
            ("active", f"{_years(row, 'active_start', 'active_end')} (from "
                       f"{text(row.get('active_source'), 'nothing known')})"),
            ("paintings", f"{row['paintings']:,}"),
            ("styles", _mix(row["styles"])), ("genres", _mix(row["genres"])))],
            className="meta"),
        html.Div(["Visual families (KMeans, ", features, " features): ", *families],
                 className="hint"),
        html.H3(["Paintings ", dcc.Link("(all on the map)", href="/map?" + urlencode(
            {"artist": name}))]),
        gallery(data, ids[:PAINTINGS_SHOWN], id="artist-paintings"),
        html.P("Who this artist's work most resembles, ordered by time: a candidate is active "
               "before or alongside the later artist, and was born before the later one died. "
               "Each comes with the painting pairs that link them most closely and respect time "
               "(earlier painting → later painting, with their similarity; where both are dated "
               "the earlier one is not the later work). A candidate's standing is the share of "
               "all artist pairs it is closer than; pairs no closer than an average artist are "
               "not offered. Evidence to weigh, not proof of influence."
               + (" Pairs named in the recorded influences table are marked." if recorded
                  else ""), className="hint"),
        html.Div([
            html.Div([html.H3("Earlier: possible influences"),
                      *_candidates(data, earlier, "influenced_by", "earlier", artist_id)],
                     id="artist-earlier"),
            html.Div([html.H3("Later: possibly influenced"),
                      *_candidates(data, later, "artist", "later", artist_id)],
                     id="artist-later"),
        ], className="two-columns"),
        html.Div([html.H3("Undated: resemblance only"),
                  html.P("Look-alikes where one of the two has no known years: no order in "
                         "time can be read from them.", className="hint"),
                  *_candidates(data, undated, "influenced_by", "undated", artist_id)],
                 id="artist-undated") if undated else None,
    ])


def register(app: Dash) -> None:
    """The artist page is built whole by its layout; it has no callbacks of its own."""
