"""Small building blocks shared by the pages: painting cards, galleries, charts, messages."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import urlencode

import dash_ag_grid as dag
import pandas as pd
import plotly.graph_objects as go
from dash import ctx, dcc, html, no_update

from dash_app.data import RunData, current
from dash_app.routes import thumb_url
from influence.catalog import LABEL_FIELDS, artist_slug
from influence.export import FORMATS, Export, table_bytes

PALETTE = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3",
           "#8c8c8c", "#ccb974", "#64b5cd")


def painting_href(image_id: str) -> str:
    return f"/painting/{image_id}"


def artist_href(artist: str) -> str | None:
    """The artist's page, where the run has the influence stage's artist table."""
    return f"/artist/{artist_slug(artist)}" if current().influence is not None else None


def similar_artists(artists: Sequence[dict], chart_id: str, shown: int = 10) -> list:
    """The similar artists of a `similar` answer: a bar chart of their scores and, where the run
    has artist pages, links to them (by the answer's `artist_id`)."""
    artists = list(artists)[:shown]
    parts: list = [chart(hbar([a["artist"] for a in artists], [a["score"] for a in artists],
                              value_format=".2f", hover=[f"{a['paintings']} of the nearest "
                                                         "paintings" for a in artists]),
                         id=chart_id)]
    if current().influence is not None:
        parts.append(html.Div([dcc.Link(a["artist"], href=f"/artist/{a['artist_id']}",
                                        className="chip") for a in artists],
                              className="artist-links", id=f"{chart_id}-links"))
    return parts


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


#: The one configuration of every interactive chart: no Plotly logo and no "share" button,
#: which would upload the chart's data (the collection's) to a third-party service.
GRAPH_CONFIG = {"displaylogo": False, "showSendToCloud": False, "showEditInChartStudio": False,
                "modeBarButtonsToRemove": ["sendChartToCloud", "sendDataToCloud"]}
#: Room above a full-size chart's plot for its toolbar, so the legend starts below it.
TOOLBAR_PX = 36


def graph(config: dict | None = None, **kwargs: object) -> dcc.Graph:
    """An interactive chart (toolbar shown) with GRAPH_CONFIG and any extra settings."""
    return dcc.Graph(config={**GRAPH_CONFIG, **(config or {})}, **kwargs)


def chart(fig: go.Figure, **kwargs: object) -> dcc.Graph:
    """A small static chart: no toolbar at all."""
    return dcc.Graph(figure=fig, config={**GRAPH_CONFIG, "displayModeBar": False}, **kwargs)


def below_toolbar(fig: go.Figure) -> go.Figure:
    """A full-size chart's legend (a vertical one, right of the plot) starts below the toolbar
    rather than under it."""
    top = max(fig.layout.margin.t or 0, TOOLBAR_PX)
    return fig.update_layout(margin={"t": top}, legend={"y": 1, "yanchor": "top"})


def profile_chart(rows: pd.DataFrame, field: str, what: str, bars: int = 8) -> go.Figure | None:
    """Shares of a field's commonest values in a set of paintings (`what`: "this cluster")
    against the whole collection, with the lift written beside each bar."""
    if rows.empty:
        return None
    rows = rows.sort_values("share", ascending=False).head(bars).iloc[::-1]
    labels = [str(v) for v in rows["value"]]
    lift = [f"×{v:.1f}" for v in rows["lift"]]
    fig = go.Figure([
        go.Bar(y=labels, x=rows["collection_share"], orientation="h", name="whole collection",
               marker_color="#c8c8c8", hovertemplate="%{y}: %{x:.1%} of the collection"
               "<extra></extra>"),
        go.Bar(y=labels, x=rows["share"], orientation="h", name=what,
               marker_color=PALETTE[0], text=lift, textposition="outside",
               customdata=rows["count"], hovertemplate=f"%{{y}}: %{{x:.1%}} of {what} "
               "(%{customdata} paintings), %{text} the collection's share<extra></extra>"),
    ])
    fig.update_layout(barmode="group", bargap=0.25, showlegend=field == LABEL_FIELDS[0])
    fig = tidy(fig, field, 90 + 34 * len(labels), ".0%")
    # Room right of the longest bar for its "×lift" label.
    widest = float(max(rows["share"].max(), rows["collection_share"].max()))
    return fig.update_xaxes(range=[0, widest * 1.25])


PROFILE_NOTE = ("Grey: share in the whole collection; blue: share here, with how many times the "
                "collection's share it is (×1 = as common as anywhere).")


def grid(frame: pd.DataFrame, grid_id: str, height: int | None = None,
         links: dict[str, str] | None = None) -> dag.AgGrid:
    """A sortable, filterable table; numbers rounded for reading. `links` maps a column to a
    URL prefix: its cells become links (prefix + the cell's value)."""
    shown = frame.copy()
    for column in shown.select_dtypes("number").columns:
        if not pd.api.types.is_integer_dtype(shown[column]):
            shown[column] = shown[column].round(3)
    columns = []
    for column in shown.columns:
        spec: dict = {"field": column, "filter": True, "sortable": True}
        if column in (links or {}):
            spec["cellRenderer"] = "markdown"
            shown[column] = [f"[{v}]({links[column]}{v})" for v in shown[column]]
        columns.append(spec)
    return dag.AgGrid(id=grid_id, rowData=shown.to_dict("records"), columnDefs=columns,
                      columnSize="autoSize", className="ag-theme-alpine",
                      dashGridOptions={"domLayout": "autoHeight"} if height is None else {},
                      style={"height": height} if height else None)


def downloads(prefix: str, what: str) -> html.Div:
    """CSV and Parquet buttons (ids PREFIX-csv, PREFIX-parquet) and their dcc.Download."""
    return html.Div([
        html.Span(f"Download {what}:", className="hint"),
        html.Button("CSV", id=f"{prefix}-csv", className="button"),
        html.Button("Parquet", id=f"{prefix}-parquet", className="button"),
        dcc.Download(id=f"{prefix}-download"),
    ], className="downloads")


def send(export: Export) -> dict:
    """The download of an export in the format of the button that was clicked (PREFIX-csv or
    PREFIX-parquet): the same bytes the `export` stage writes."""
    fmt = str(ctx.triggered_id).rsplit("-", 1)[-1]
    if fmt not in FORMATS:
        return no_update
    return dcc.send_bytes(table_bytes(export.frame, fmt), f"{export.name}.{fmt}")


def needs(stage: str, data: RunData) -> html.Div:
    """What to run when a view has no data yet (the run by its name: a page never shows a path
    on the server)."""
    return message(f"This run has no {stage} results yet: run `python -m influence.pipeline "
                   f"{stage} --run RUN` first, RUN being the directory of the run "
                   f"'{data.name}'.")


#: Where a newcomer can start: (path, name, what it shows).
START = (
    ("/map", "Map", "every painting placed by visual resemblance; hover, zoom, select"),
    ("/clusters", "Visual families", "groups of paintings that look alike, with who and what "
                                     "is in each"),
    ("/influence", "Influence graph", "who resembles whom, from earlier to later"),
    ("/compare", "Compare", "two artists side by side, with their closest painting pairs"),
    ("/upload", "Upload", "which paintings and artists an image of yours resembles"),
    ("/journey", "Journey", "where each family's paintings come from, across eras"),
    ("/review", "Review", "possible duplicates, misattributions and outliers"),
    ("/scores", "Scores", "how the feature sets compare"),
)


def start_links() -> html.Ul:
    """The START list as links with a line each."""
    return html.Ul([html.Li([dcc.Link(name, href=path), f": {what}"])
                    for path, name, what in START], className="start-links")


def problem_note(problem: str | None, instead: str = "") -> html.Div | None:
    """A wrong address said at the top of the page (see dash_app.addresses), with what is shown
    instead; None when the address is fine."""
    if problem is None:
        return None
    return message(f"{problem}{' ' + instead if instead else ''}", "error", id="address-problem")
