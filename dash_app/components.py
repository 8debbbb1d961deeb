"""Small building blocks shared by the pages: painting cards, galleries, charts, messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

import plotly.graph_objects as go
from dash import dcc, html

from dash_app.data import RunData
from dash_app.routes import thumb_url

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c", "#ccb974", "#64b5cd")


def painting_href(image_id: str) -> str:
    return f"/painting/{image_id}"


def cluster_href(features: str, method: str, cluster: int) -> str:
    return "/clusters?" + urlencode({"features": features, "method": method,
                                     "cluster": int(cluster)})


def text(value: object, missing: str = "unknown") -> str:
    """A catalog value for display: <NA>/None/NaN become `missing`."""
    if value is None or value != value or str(value) == "<NA>":
        return missing
    return str(value)


def painting_card(data: RunData, image_id: str, note: str | None = None,
                  small: bool = False) -> html.Div:
    """A thumbnail linking to the painting's page, with its title and artist."""
    row = data.painting(image_id) or {}
    title, artist = text(row.get("title"), "untitled"), text(row.get("artist"))
    year = text(row.get("year"), "")
    caption = [html.Div(title, className="card-title")] if not small else []
    caption.append(html.Div(f"{artist}{', ' + year if year else ''}", className="card-artist"))
    if note:
        caption.append(html.Div(note, className="card-note"))
    return html.Div(dcc.Link([
        html.Img(src=thumb_url(image_id), alt=f"{title} by {artist}",
                 className="thumb"),
        *caption,
    ], href=painting_href(image_id), title=f"{title} by {artist}"),
        className="card small" if small else "card")


def gallery(data: RunData, image_ids: Iterable[str], notes: Sequence[str] | None = None,
            small: bool = False, **kwargs: object) -> html.Div:
    ids = list(image_ids)
    notes = list(notes) if notes is not None else [None] * len(ids)
    return html.Div([painting_card(data, i, n, small) for i, n in zip(ids, notes, strict=True)],
                    className="gallery small" if small else "gallery", **kwargs)


def message(text_: str, kind: str = "info", **kwargs: object) -> html.Div:
    """A one-line notice in the page (kind: info, error)."""
    return html.Div(text_, className=f"message {kind}", role="alert" if kind == "error" else None,
                    **kwargs)


def hbar(labels: Sequence[str], values: Sequence[float], title: str | None = None,
         value_format: str = ".0%", height: int | None = None,
         hover: Sequence[str] | None = None) -> go.Figure:
    """A horizontal bar chart, largest on top."""
    fig = go.Figure(go.Bar(x=list(values)[::-1], y=list(labels)[::-1], orientation="h",
                           marker_color=PALETTE[0], texttemplate=f"%{{x:{value_format}}}",
                           textposition="auto", hovertext=list(hover)[::-1] if hover else None))
    return tidy(fig, title, height or 60 + 26 * len(labels), value_format)


def tidy(fig: go.Figure, title: str | None, height: int, tick_format: str = "") -> go.Figure:
    """The house style for small charts: white, tight margins, no toolbar clutter."""
    fig.update_layout(title=title, height=height, margin={"l": 10, "r": 10, "t": 40 if title
                      else 10, "b": 30}, template="plotly_white", font={"size": 12},
                      xaxis={"tickformat": tick_format}, yaxis={"automargin": True},
                      legend={"orientation": "h", "y": -0.15})
    return fig


def chart(fig: go.Figure, **kwargs: object) -> dcc.Graph:
    return dcc.Graph(figure=fig, config={"displayModeBar": False}, **kwargs)


def needs(stage: str, data: RunData) -> html.Div:
    """What to run when a view has no data yet."""
    return message(f"This run has no {stage} results yet: run "
                   f"`python -m influence.pipeline {stage} --run {data.run.root}` first.")
