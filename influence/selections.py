"""Sets of paintings, read from a run without changing it: filters, title and artist search,
cluster members, regions of the map, and what a set holds against the whole collection.

The explorer and the `export` stage both go through these functions, so a view and its exported
file always list the same paintings with the same numbers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from influence.catalog import artist_slug as slug
from influence.cluster import profiles
from influence.readers import Clustering
from influence.runs import InfluenceError, Run

#: Catalog fields a filter narrows by, besides the year range.
FILTER_FIELDS = ("artist", "nationality", "style", "genre")
#: The year a filter's range applies to: the painting's own, else estimated from the artist's
#: life (the catalog's era rule).
YEAR = "era_year"
#: Soft members of a GMM cluster: paintings with at least this responsibility.
MIN_P = 0.2
PLOTS = ("elbow", "silhouette")


# ------------------------------------------------------------------------------------- filters
@dataclass(frozen=True)
class Filter:
    """Paintings whose labels are among the chosen values (every field given must match) and
    whose year is in [year_from, year_to]; an empty filter keeps everything."""

    artist: tuple[str, ...] = ()
    nationality: tuple[str, ...] = ()
    style: tuple[str, ...] = ()
    genre: tuple[str, ...] = ()
    year_from: int | None = None
    year_to: int | None = None

    @classmethod
    def from_query(cls, query: Mapping[str, Any]) -> Filter:
        """A filter from URL or CLI values: lists or `|`-separated strings, years as text."""
        def values(name: str) -> tuple[str, ...]:
            raw = query.get(name) or ()
            items = raw.split("|") if isinstance(raw, str) else raw
            if not isinstance(items, (list, tuple, set, frozenset)):
                raise InfluenceError(f"{name} must be a list of values, got {raw!r}"[:200])
            return tuple(sorted({str(v) for v in items if str(v).strip()}))

        def year(name: str) -> int | None:
            raw = query.get(name)
            if raw in (None, ""):
                return None
            try:
                return int(float(raw))
            except (TypeError, ValueError, OverflowError):
                raise InfluenceError(f"{name.replace('_', '-')} must be a year, got {raw!r}") \
                    from None

        return cls(*(values(f) for f in FILTER_FIELDS), year("year_from"), year("year_to"))

    def to_query(self) -> dict[str, str]:
        """The URL parameters of this filter (only those set)."""
        out = {f: "|".join(getattr(self, f)) for f in FILTER_FIELDS if getattr(self, f)}
        out.update({k: str(v) for k in ("year_from", "year_to")
                    if (v := getattr(self, k)) is not None})
        return out

    def __bool__(self) -> bool:
        return bool(self.to_query())

    def mask(self, catalog: pd.DataFrame) -> np.ndarray:
        """Which catalog rows pass (a boolean array in catalog order)."""
        keep = np.ones(len(catalog), dtype=bool)
        for name in FILTER_FIELDS:
            if chosen := getattr(self, name):
                keep &= catalog[name].isin(chosen).fillna(False).to_numpy(dtype=bool)
        years = catalog[YEAR].astype("Float64")
        if self.year_from is not None:
            keep &= (years >= self.year_from).fillna(False).to_numpy(dtype=bool)
        if self.year_to is not None:
            keep &= (years <= self.year_to).fillna(False).to_numpy(dtype=bool)
        return keep

    def describe(self) -> str:
        """A short slug for file names: 'style-impressionism_1870-1890'."""
        parts = [f"{f}-{'-'.join(slug(v) for v in getattr(self, f))}" for f in FILTER_FIELDS
                 if getattr(self, f)]
        if self.year_from is not None or self.year_to is not None:
            parts.append(f"{self.year_from or ''}-{self.year_to or ''}")
        return "_".join(parts)[:80] or "all"


def choices(catalog: pd.DataFrame, name: str) -> list[str]:
    """A field's values, commonest first, for filter menus."""
    return [str(v) for v in catalog[name].dropna().value_counts().index]


def year_span(catalog: pd.DataFrame) -> tuple[int, int]:
    """The first and last year a filter can choose."""
    years = catalog[YEAR].dropna()
    return (int(years.min()), int(years.max())) if len(years) else (0, 0)


# -------------------------------------------------------------------------------------- search
#: What a search reads of its text: the first MAX_QUERY_CHARS characters, MAX_WORDS words.
MAX_QUERY_CHARS = 200
MAX_WORDS = 8


class CatalogSearch:
    """Artists, then paintings, whose name or title contains every word of a text, over an index
    of the catalog made once: a search is one pass over it, whatever the text.

    Each match is {"kind": "artist" | "painting", "value": artist name or image id, "label"};
    artists come first, the best known (most paintings) first; titles that start with the
    text's first word before others, then by title.
    """

    def __init__(self, catalog: pd.DataFrame) -> None:
        names = catalog["artist"].dropna().value_counts()
        self._artists = [(str(a).lower(), {"kind": "artist", "value": str(a),
                                           "label": f"{a} (artist, {n} paintings)"})
                         for a, n in names.items()]
        titles = catalog["title"].fillna("").astype(str).to_numpy()
        self._titles = [(titles[r].lower(), int(r)) for r in np.argsort(titles, kind="stable")]
        self._catalog = catalog

    @staticmethod
    def words(text: object) -> list[str]:
        """The distinct lower-case words a search looks for (capped, see MAX_WORDS)."""
        words = str(text or "")[:MAX_QUERY_CHARS].lower().split()
        return list(dict.fromkeys(words))[:MAX_WORDS]

    def __call__(self, text: object, limit: int = 12) -> list[dict[str, str]]:
        words = self.words(text)
        if not words or limit < 1:
            return []
        out = [match for name, match in self._artists
               if all(w in name for w in words)][:limit]
        first, rest = [], []
        for title, row in self._titles:
            if len(first) >= limit:
                break
            if all(w in title for w in words):
                (first if title.startswith(words[0]) else rest).append(row)
        for row in (first + rest)[:max(0, limit - len(out))]:
            r = self._catalog.iloc[row]
            out.append({"kind": "painting", "value": str(r["image_id"]),
                        "label": f"{r['title']} — "
                                 f"{r['artist'] if pd.notna(r['artist']) else 'unknown'}"
                                 + (f", {r['year']}" if pd.notna(r["year"]) else "")})
        return out


def search_catalog(catalog: pd.DataFrame, text: str, limit: int = 12) -> list[dict[str, str]]:
    """One search of a catalog (see CatalogSearch; keep one CatalogSearch for many searches)."""
    return CatalogSearch(catalog)(text, limit)


# ------------------------------------------------------------------------ clusters, read back
def cluster_sizes(clustering: Clustering, method: str) -> dict[int, int]:
    """Paintings per cluster, as the cluster stage recorded them."""
    return {c: int(n) for c, n in enumerate(clustering.summary["sizes"][method]) if n}


def cluster_profile(clustering: Clustering, method: str, cluster: int,
                    field: str) -> pd.DataFrame:
    """A cluster's values of one label field (count, share, collection_share, lift), commonest
    first, as the cluster stage stored them."""
    p = clustering.profiles
    rows = p[(p["method"] == method) & (p["cluster"] == cluster) & (p["field"] == field)]
    return rows.sort_values(["count", "value"], ascending=[False, True], kind="stable")


def top_label(clustering: Clustering, method: str, cluster: int, field: str) -> str | None:
    """'Impressionism 64%': a cluster's commonest value of a field and its share."""
    rows = cluster_profile(clustering, method, cluster, field)
    if rows.empty:
        return None
    best = rows.iloc[0]
    return f"{best['value']} {best['share']:.0%}"


#: A family's label is chosen among the values making at least this share of its paintings.
LABEL_SHARE = 0.2
#: The fields a family's label may come from.
FAMILY_LABEL_FIELDS = ("artist", "style", "era")


def family_label(clustering: Clustering, method: str, cluster: int,
                 fields: Sequence[str] = FAMILY_LABEL_FIELDS,
                 min_share: float = LABEL_SHARE) -> dict[str, Any] | None:
    """What sets a cluster apart: among its values of `fields` that make at least `min_share`
    of it, the most over-represented against the collection (largest lift), as
    {field, value, share, lift}; None when no value is that common."""
    p = clustering.profiles
    rows = p[(p["method"] == method) & (p["cluster"] == cluster) & p["field"].isin(fields)
             & (p["share"] >= min_share)]
    if rows.empty:
        return None
    best = rows.sort_values(["lift", "count", "value"], ascending=[False, False, True],
                            kind="stable").iloc[0]
    return {"field": str(best["field"]), "value": str(best["value"]),
            "share": float(best["share"]), "lift": float(best["lift"])}


def typical_members(clustering: Clustering, method: str, cluster: int) -> list[str]:
    """A cluster's stored most typical paintings, most typical first."""
    t = clustering.typical
    return list(t[(t["method"] == method) & (t["cluster"] == cluster)]
                .sort_values("rank")["image_id"])


def cluster_members(clustering: Clustering, method: str, cluster: int,
                    min_p: float = MIN_P) -> pd.DataFrame:
    """A cluster's paintings: `image_id`, `member` ("hard" when assigned to it, "soft" for a GMM
    responsibility of at least `min_p` without the assignment) and the stored scores: the
    distance to the centre (KMeans) or the responsibility `p` (GMM); most central first."""
    a = clustering.assignments
    if method == "kmeans":
        rows = a.index[a["kmeans"] == cluster].to_numpy()
        out = pd.DataFrame({"row": rows, "image_id": a["image_id"].to_numpy()[rows],
                            "member": "hard",
                            "kmeans_distance": a["kmeans_distance"].to_numpy()[rows]})
        return out.sort_values("kmeans_distance", kind="stable").reset_index(drop=True)
    if method != "gmm":
        raise InfluenceError(f"unknown clustering method '{method}' (kmeans or gmm)")
    p = clustering.responsibilities_of(np.arange(len(a)))[:, cluster]
    hard = (a["gmm"] == cluster).to_numpy()
    rows = np.flatnonzero(hard | (p >= min_p))
    out = pd.DataFrame({"row": rows, "image_id": a["image_id"].to_numpy()[rows],
                        "member": np.where(hard[rows], "hard", "soft"), "p": p[rows]})
    return out.sort_values(["member", "p"], ascending=[True, False],
                           kind="stable").reset_index(drop=True)


def members_passing(clustering: Clustering, catalog: pd.DataFrame, method: str, cluster: int,
                    min_p: float, where: Filter) -> pd.DataFrame:
    """`cluster_members` that pass a filter, in the same order."""
    members = cluster_members(clustering, method, cluster, min_p)
    return members[where.mask(catalog)[members["row"].to_numpy()]]


def plot_paths(run: Run, features: str) -> dict[str, Path]:
    """The cluster stage's sweep plots of a feature set that exist, by name."""
    folder = run.clusters_dir / features
    return {p: folder / f"{p}.png" for p in PLOTS if (folder / f"{p}.png").is_file()}


def read_comparison(run: Run) -> pd.DataFrame | None:
    """The cluster stage's table comparing feature sets, or None before clustering."""
    path = run.clusters_dir / "comparison.csv"
    return pd.read_csv(path) if path.exists() else None


# --------------------------------------------------------------------------- regions and sets
def in_region(x: np.ndarray, y: np.ndarray, region: Mapping[str, Sequence[float]]) -> np.ndarray:
    """Points inside a map region: a box {"x": [x0, x1], "y": [y0, y1]} or a lasso
    {"lasso_x": [...], "lasso_y": [...]} (a closed polygon)."""
    if "lasso_x" in region:
        from matplotlib.path import Path as Polygon

        polygon = Polygon(np.column_stack([region["lasso_x"], region["lasso_y"]]))
        return polygon.contains_points(np.column_stack([x, y]))
    (x0, x1), (y0, y1) = sorted(region["x"]), sorted(region["y"])
    return (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)


def region_rows(clustering: Clustering, catalog: pd.DataFrame, where: Filter,
                region: Mapping[str, Sequence[float]] | None) -> np.ndarray:
    """Catalog rows on the clustering's map inside a region (see `in_region`) among those the
    filter keeps, in catalog order; none without a region."""
    if not region:
        return np.array([], dtype=int)
    a = clustering.assignments
    rows = np.flatnonzero(where.mask(catalog))
    return rows[in_region(a["umap_x"].to_numpy()[rows], a["umap_y"].to_numpy()[rows], region)]


def label_shares(catalog: pd.DataFrame, rows: np.ndarray) -> pd.DataFrame:
    """For a set of catalog rows, each label value's count, share, collection_share and lift
    (the same numbers the cluster stage stores for a cluster), commonest first per field."""
    member = np.zeros(len(catalog), dtype=int)
    member[np.asarray(rows, dtype=int)] = 1
    out = profiles(member, catalog, "selection")
    return out[out["cluster"] == 1].drop(columns=["method", "cluster"]).reset_index(drop=True)


def normalise_ids(run_ids: Iterable[str], wanted: Iterable[str]) -> list[str]:
    """The wanted image ids that are in the run, in the order given; InfluenceError for others."""
    known = set(run_ids)
    wanted = list(dict.fromkeys(str(w).strip() for w in wanted if str(w).strip()))
    unknown = [w for w in wanted if w not in known]
    if unknown:
        raise InfluenceError(f"{len(unknown)} image id(s) not in the run, e.g. {unknown[0]!r}")
    return wanted

