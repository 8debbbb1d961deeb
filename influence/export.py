"""Tables of paintings to take away (CSV and Parquet), read from a run without changing it.

Each export is the catalog columns a curator needs to find the paintings again, plus the scores
the explorer shows for that set (a cluster's distances or memberships, similarities); its file
name says what it holds. The `export` stage and the explorer's download buttons both call
`export_table` and `table_bytes`, so both give identical files.

CSV cells a spreadsheet would run as a formula are made inert (see `inert`); Parquet files and
the run keep the data as it is.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from influence.readers import Clustering
from influence.runs import InfluenceError, Run
from influence.selections import MIN_P, Filter, cluster_members, normalise_ids, slug

CATALOG_COLUMNS = ("image_id", "title", "artist", "nationality", "style", "genre", "year",
                   "era", "file")
FORMATS = ("csv", "parquet")
INFLUENCE_TABLES = ("artists", "pairs")
#: The filter that keeps every painting.
EVERYTHING = Filter()
#: What a spreadsheet reads as the start of a formula (OWASP, CSV injection).
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


@dataclass
class Export:
    """A table to write and the file name (without suffix) that says what it is."""

    frame: pd.DataFrame
    name: str


def paintings_table(catalog: pd.DataFrame, image_ids: Sequence[str],
                    scores: pd.DataFrame | None = None) -> pd.DataFrame:
    """Catalog columns of the paintings, in the order given, and their scores (matched on
    `image_id`) after them."""
    by_id = catalog.set_index("image_id", drop=False)
    frame = by_id.loc[list(image_ids), [c for c in CATALOG_COLUMNS if c in catalog]]
    frame = frame.reset_index(drop=True)
    if scores is not None and len(scores.columns) > 1:
        frame = frame.merge(scores.drop(columns=["row"], errors="ignore"), on="image_id",
                            how="left", validate="one_to_one")
    return frame


def cluster_export(run_name: str, catalog: pd.DataFrame, clustering: Clustering, method: str,
                   cluster: int, min_p: float = MIN_P, where: Filter = EVERYTHING) -> Export:
    """A cluster's hard members (and GMM soft members with p >= min_p), most central first."""
    members = cluster_members(clustering, method, cluster, min_p)
    members = members[where.mask(catalog)[members["row"].to_numpy()]]
    name = f"{run_name}_{clustering.features}_{method}-cluster-{cluster}"
    if method == "gmm":
        name += f"_p{min_p:g}"
    return Export(paintings_table(catalog, members["image_id"], members), _named(name, where))


def filter_export(run_name: str, catalog: pd.DataFrame, where: Filter) -> Export:
    """Every painting a filter keeps, in catalog order."""
    ids = catalog["image_id"].to_numpy()[where.mask(catalog)]
    return Export(paintings_table(catalog, ids), f"{run_name}_filter_{where.describe()}")


def selection_export(run_name: str, catalog: pd.DataFrame, image_ids: Sequence[str],
                     label: str = "selection", where: Filter = EVERYTHING) -> Export:
    """Chosen paintings (ids in the run), in the order given."""
    ids = normalise_ids(catalog["image_id"], image_ids)
    keep = set(catalog["image_id"].to_numpy()[where.mask(catalog)])
    ids = [i for i in ids if i in keep]
    return Export(paintings_table(catalog, ids),
                  _named(f"{run_name}_{slug(label)}-{len(ids)}", where))


def answer_export(run_name: str, catalog: pd.DataFrame, answer: Mapping[str, Any]) -> Export:
    """An upload's (or `similar`'s) answer: its nearest paintings with their similarity."""
    paintings = answer.get("paintings", [])
    scores = pd.DataFrame({"image_id": [p["image_id"] for p in paintings],
                           "rank": np.arange(1, len(paintings) + 1),
                           "similarity": [p["score"] for p in paintings]})
    query = Path(str(answer.get("query") or "upload")).stem
    return Export(paintings_table(catalog, scores["image_id"], scores),
                  f"{run_name}_similar-to-{slug(query)}_{answer.get('features', '')}")


def influence_export(run: Run, table: str) -> Export:
    """The `influence` stage's artists or pairs table."""
    if table not in INFLUENCE_TABLES:
        raise InfluenceError(f"unknown table '{table}' (one of {', '.join(INFLUENCE_TABLES)})")
    from influence.influence import load_influence

    inf = load_influence(run)
    return Export(getattr(inf, table), f"{run.root.name}_influence-{table}_{inf.features}")


def review_export(run: Run, table: str, where: Filter = EVERYTHING,
                  review: Any = None) -> Export:
    """One of the `review` stage's tables (duplicates, labels or outliers), as stored; with a
    filter, the rows with a painting it keeps (either painting of a duplicate pair)."""
    from influence.review import load_review

    review = review or load_review(run)
    frame = review.table(table)
    if where:
        catalog = run.catalog()
        keep = set(catalog["image_id"].to_numpy()[where.mask(catalog)])
        columns = [c for c in ("image_id", "image_id_a", "image_id_b") if c in frame]
        frame = frame[frame[columns].isin(keep).any(axis=1)].reset_index(drop=True)
    return Export(frame, _named(f"{run.root.name}_review-{table}_{review.summary['features']}",
                                where))


def _named(name: str, where: Filter) -> str:
    return f"{name}_filter_{where.describe()}" if where else name


def table_bytes(frame: pd.DataFrame, fmt: str) -> bytes:
    """The file contents of a table: CSV (lists and dicts as JSON text) or Parquet."""
    if fmt not in FORMATS:
        raise InfluenceError(f"unknown format '{fmt}' (one of {', '.join(FORMATS)})")
    buffer = io.BytesIO()
    if fmt == "parquet":
        frame.to_parquet(buffer, index=False)
    else:
        flat = frame.copy()
        for column in flat.columns:
            if flat[column].map(lambda v: isinstance(v, (list, dict, np.ndarray))).any():
                flat[column] = flat[column].map(_json_text)
            if not pd.api.types.is_numeric_dtype(flat[column]):
                flat[column] = flat[column].map(inert)
        # RFC 4180 line ends: the csv writer then quotes every cell holding a carriage return,
        # which would otherwise split its row in a reader.
        flat.to_csv(buffer, index=False, lineterminator="\r\n")
    return buffer.getvalue()


def inert(value: Any) -> Any:
    """A text cell a spreadsheet shows as text: one that starts like a formula (`=`, `+`, `-`,
    `@`, tab, carriage return) gets a leading `'`, as OWASP's CSV-injection guidance says.

    A plain number written as text (`-12`, `+3.5`) is left alone: it is data, not a formula. A
    cell that already starts with `'` before such a character gets one more, so removing one
    leading `'` from cells that start with `'` and a formula character gives the text back.
    """
    if not isinstance(value, str) or not value:
        return value
    body = value.lstrip("'")
    if body.startswith(FORMULA_START) and not _NUMBER.fullmatch(body):
        return "'" + value
    return value


def _json_text(value: Any) -> str:
    if isinstance(value, np.ndarray):
        value = value.tolist()
    return json.dumps(value, ensure_ascii=False, default=_plain)


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return str(value)


def write_export(export: Export, folder: Path, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Write the table as `folder/<name>.<format>` for each format; returns the paths."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        data = table_bytes(export.frame, fmt)
        path = folder / f"{export.name}.{fmt}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        paths.append(path)
    return paths
