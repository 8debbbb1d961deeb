"""Filter controls shared by the map and the clusters page: artist, nationality, style, genre
(several values each) and a year range. The URL carries them, so a link reopens the same view."""

from __future__ import annotations

from dash import Input, State, dcc, html

from dash_app import checks
from dash_app.data import RunData
from influence.runs import InfluenceError
from influence.selections import FILTER_FIELDS, Filter, choices, year_span


def controls(data: RunData, where: Filter, prefix: str) -> html.Div:
    """The filter menus (ids PREFIX-artist, ...) and the year range (PREFIX-years)."""
    first, last = year_span(data.catalog)
    years = [where.year_from or first, where.year_to or last]
    marks = {y: str(y) for y in range(first - first % 100 + 100, last + 1, 100)}
    return html.Div([
        *[html.Label([name.capitalize(), dcc.Dropdown(
            choices(data.catalog, name), [v for v in getattr(where, name)
                                          if v in data.choices(name)], id=f"{prefix}-{name}",
            multi=True, placeholder=f"any {name}")], className="filter")
          for name in FILTER_FIELDS],
        html.Label(["Years (dated, or estimated from the artist's life)", dcc.RangeSlider(
            first, last, 1, value=years, id=f"{prefix}-years", marks=marks,
            tooltip={"placement": "bottom"}, allow_direct_input=False)],
            className="filter years"),
    ], className="filters")


def from_url(query: dict[str, str]) -> Filter:
    """The filter in a page's URL values; one that does not parse is no filter."""
    try:
        return Filter.from_query(query)
    except InfluenceError:
        return Filter()


def inputs(prefix: str) -> list[Input]:
    """The callback inputs of the controls, in the order `read` takes them."""
    return [Input(f"{prefix}-{name}", "value") for name in (*FILTER_FIELDS, "years")]


def states(prefix: str) -> list[State]:
    """The same as callback states."""
    return [State(f"{prefix}-{name}", "value") for name in (*FILTER_FIELDS, "years")]


def read(data: RunData, *values: object) -> Filter:
    """The filter the controls show, from whatever the browser sent: values that are not among
    a field's choices are dropped; a year range spanning every year is no filter."""
    *labels, years = values
    first, last = year_span(data.catalog)
    low, high = checks.years(years, first, last)
    return Filter.from_query({**{name: checks.chosen(value, data.choices(name))
                                 for name, value in zip(FILTER_FIELDS, labels, strict=True)},
                              "year_from": low if low > first else None,
                              "year_to": high if high < last else None})
