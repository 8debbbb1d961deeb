"""Review: what a cataloguer should look at, from the `review` stage: paintings that seem to be
the same picture (their conflicting fields marked), recorded labels the pictures argue against,
and paintings least like the rest of the collection."""

from __future__ import annotations

import math
from typing import Any
from urllib.parse import urlencode

import pandas as pd
from dash import Dash, Input, Output, State, dcc, html, no_update

from dash_app import checks, filters
from dash_app.components import downloads, gallery, message, needs, painting_card, send, text
from dash_app.data import RunData, current
from influence.export import review_export
from influence.review import CONFLICT_FIELDS, CONTEXT, TABLES, Review
from influence.selections import Filter

TABS = {"duplicates": "Possible duplicates", "labels": "Possible misattributions",
        "outliers": "Outliers"}
#: Rows shown per tab (the download has them all).
SHOWN = 30
OUTLIERS_SHOWN = 48


def duplicate_note(data: RunData, image_id: str) -> html.P | None:
    """'Possible duplicate of ...' with links, for the painting page; None when there is none."""
    review = data.review
    others = review.duplicates_of(image_id) if review is not None else []
    if not others:
        return None
    links: list = ["Possible duplicate of "]
    for n, other in enumerate(others):
        row = data.painting(other) or {}
        links += [", " if n else "", dcc.Link(
            f"'{text(row.get('title'), 'untitled')}' by {text(row.get('artist'))}",
            href=f"/painting/{other}")]
    return html.P([*links, " (", dcc.Link("review", href="/review"), ")"],
                  className="message info", id="painting-duplicates")


def layout(tab: str | None = None, target: str | None = None, conflicts: str | None = None,
           **query: str) -> html.Div:
    data = current()
    review = data.review
    if review is None:
        return html.Div([html.H1("Review: what a cataloguer should check"), needs("review", data)])
    targets = list(dict.fromkeys(review.labels["target"])) if len(review.labels) else []
    return html.Div([
        html.H1("Review: what a cataloguer should check"),
        html.P(f"From the {review.summary['features']} features. Most likely first; each is "
               "evidence for a person to weigh.", className="hint"),
        dcc.Tabs([dcc.Tab(label=label, value=key, id=f"review-tab-{key}")
                  for key, label in TABS.items()],
                 value=tab if tab in TABS else "duplicates", id="review-tabs"),
        filters.controls(data, filters.from_url(query), "review"),
        html.Div([
            html.Label(["Target", dcc.Dropdown(targets, target if target in targets else
                                               (targets[0] if targets else None),
                                               id="review-target", clearable=False)],
                       className="inline"),
            dcc.Checklist([{"label": " only pairs whose records conflict", "value": "only"}],
                          ["only"] if conflicts == "only" else [], id="review-conflicts"),
            downloads("review", "this list"),
        ], className="controls"),
        dcc.Loading(html.Div(id="review-content"), delay_show=300),
    ])


def _kept(data: RunData, where: Filter) -> set[str] | None:
    """The ids a filter keeps, or None for no filter."""
    return set(data.catalog["image_id"].to_numpy()[where.mask(data.catalog)]) if where else None


def _fields(data: RunData, image_id: str, conflicts: set[str]) -> html.Table:
    row = data.painting(image_id) or {}
    return html.Table([html.Tr([html.Th(f), html.Td(text(row.get(f), "—"))],
                               className="conflict" if f in conflicts else None)
                       for f in CONFLICT_FIELDS], className="meta")


def duplicates_view(data: RunData, frame: pd.DataFrame) -> list:
    items = []
    for r in frame.head(SHOWN).itertuples(index=False):
        conflicts = set(r.conflicts)
        items.append(html.Div([
            html.Div([painting_card(data, r.image_id_a), _fields(data, r.image_id_a, conflicts)],
                     className="review-side"),
            html.Div([painting_card(data, r.image_id_b), _fields(data, r.image_id_b, conflicts)],
                     className="review-side"),
            html.Div([f"similarity {r.similarity:.3f} · pHash distance {r.phash_distance} of 64",
                      html.Br(), ("records disagree on " + ", ".join(r.conflicts))
                      if conflicts else "records agree"], className="hint"),
        ], className="review-row review-pair"))
    return items


def labels_view(data: RunData, frame: pd.DataFrame) -> list:
    items = []
    for r in frame.head(SHOWN).itertuples(index=False):
        closest = [painting_card(data, i, note, small=True) for i, note in
                   ((r.closest_recorded, f"closest {r.recorded}"),
                    (r.closest_suggested, f"closest {r.suggested}")) if isinstance(i, str)]
        items.append(html.Div([
            painting_card(data, r.image_id),
            html.Div([
                html.Div(["recorded: ", html.B(r.recorded), f" (p {r.p_recorded:.2f})"]),
                html.Div(["suggested: ", html.B(r.suggested), f" (p {r.p_suggested:.2f})"]),
                html.Div(f"{r.neighbour_agreement:.0%} of its nearest paintings agree with the "
                         "record" + (" · likely issue (confident learning)" if r.issue else ""),
                         className="hint"),
                *context_note(r),
            ], className="review-labels"),
            *closest,
        ], className="review-row"))
    return items


def context_note(row: Any) -> list:
    """How likely the picture is in the coarser labels (styles) its label's other paintings are
    recorded in, where the stage scored that (`CONTEXT`)."""
    coarse = CONTEXT.get(row.target)
    value = getattr(row, f"{coarse}_agreement", None) if coarse else None
    if value is None or pd.isna(value):
        return []
    return [html.Div(f"{math.exp(value):.0%} likely in a {coarse} the other paintings of "
                     f"{row.recorded} are recorded in", className="hint")]


def outliers_view(data: RunData, frame: pd.DataFrame) -> list:
    shown = frame.head(OUTLIERS_SHOWN)
    return [gallery(data, shown["image_id"], list(shown["reason"]), id="review-outliers")]


def filtered(data: RunData, review: Review, tab: str, where: Filter, target: str | None,
             only_conflicts: bool) -> Any:
    """The export of a tab's table as the page shows it (filter, target, conflicts)."""
    export = review_export(data.run, tab, where, review)
    frame = export.frame
    if tab == "labels" and target:
        frame = frame[frame["target"] == target]
        export.name += f"_{target}"
    if tab == "duplicates" and only_conflicts:
        frame = frame[frame["conflict"]]
        export.name += "_conflicts"
    export.frame = frame.reset_index(drop=True)
    return export


def _asked(data: RunData, tab: object, target: object, conflicts: object
           ) -> tuple[str, str | None, bool]:
    """The tab, target and conflicts-only choice a request names, checked (unknown ones fall
    back to the defaults)."""
    targets = set(data.review.table("labels")["target"]) if data.review is not None else set()
    return (checks.one_of(tab, TABLES, TABLES[0]), checks.one_of(target, targets, None),
            "only" in checks.chosen(conflicts, {"only"}))


def register(app: Dash) -> None:
    views = dict(zip(TABLES, (duplicates_view, labels_view, outliers_view), strict=True))

    @app.callback(Output("review-content", "children"), Input("review-tabs", "value"),
                  Input("review-target", "value"), Input("review-conflicts", "value"),
                  *filters.inputs("review"))
    def show(tab: str, target: str | None, conflicts: list[str], *values: object) -> list:
        data = current()
        if data.review is None:
            return [needs("review", data)]
        tab, target, only = _asked(data, tab, target, conflicts)
        export = filtered(data, data.review, tab, filters.read(data, *values), target, only)
        if export.frame.empty:
            return [message("Nothing to review here with these filters.", id="review-count")]
        return [html.P(f"{len(export.frame):,} rows, most likely first"
                       + (f" (the first {SHOWN if tab != 'outliers' else OUTLIERS_SHOWN} shown)"
                          if len(export.frame) > SHOWN else ""), className="hint",
                       id="review-count"),
                *views[tab](data, export.frame)]

    @app.callback(Output("view-state", "data", allow_duplicate=True),
                  Input("review-tabs", "value"), Input("review-target", "value"),
                  Input("review-conflicts", "value"), *filters.inputs("review"),
                  prevent_initial_call=True)
    def state(tab: str, target: str | None, conflicts: list[str], *values: object) -> str:
        data = current()
        tab, target, only = _asked(data, tab, target, conflicts)
        query = {"tab": tab, **filters.read(data, *values).to_query()}
        if target:
            query["target"] = target
        if only:
            query["conflicts"] = "only"
        return urlencode(query)

    @app.callback(Output("review-download", "data"), Input("review-csv", "n_clicks"),
                  Input("review-parquet", "n_clicks"), State("review-tabs", "value"),
                  State("review-target", "value"), State("review-conflicts", "value"),
                  *filters.states("review"), prevent_initial_call=True)
    def export(_csv: int, _parquet: int, tab: str, target: str | None, conflicts: list[str],
               *values: object) -> dict:
        data = current()
        if data.review is None:
            return no_update
        tab, target, only = _asked(data, tab, target, conflicts)
        return send(filtered(data, data.review, tab, filters.read(data, *values), target, only))
