"""Everything the app shows, loaded once per server process and read-only: shared by all users.

Pages and callbacks reach it with `current()`, through the Flask app serving the request, so
two apps over two runs can live in one process (the tests do). The app reads the run only
through library functions (`Run`, `influence.selections`, loaders of each stage); it builds
no path inside the run itself.

The shared query object: one `influence.similar.Explorer` per process, loaded with the run and
never changed after. Its extractor (a torch model, one thread) is the one part that is not
obviously safe to share, so every use of it goes through RunData's `query`, `neighbours` and
`like`, which take turns behind one lock; pages never call the Explorer directly. A query that
names another indexed feature set (the JSON API's `features`) loads that set's Explorer on first
use, behind the same lock, and keeps it: at most one per indexed set.
"""

from __future__ import annotations

import resource
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from flask import current_app
from PIL import Image

from influence.catalog import LABEL_FIELDS
from influence.index import indexed_features
from influence.influence import load_influence
from influence.readers import (
    HeadEvaluation,
    clustered_features,
    head_paths,
    load_clustering,
    load_evaluation,
    trained_heads,
)
from influence.review import load_review
from influence.runs import InfluenceError, Run, read_json
from influence.selections import (
    FILTER_FIELDS,
    CatalogSearch,
    choices,
    plot_paths,
    read_comparison,
)
from influence.similar import Explorer

#: Where the app keeps its RunData among the Flask app's extensions.
EXTENSION = "influence"

METHODS = {"kmeans": "KMeans", "gmm": "GMM"}


@dataclass
class RunData:
    """The run's catalog, clusterings, search/heads and scores; never mutated after loading."""

    run: Run
    catalog: pd.DataFrame
    clusterings: dict[str, Any]
    explorer: Any | None
    explorer_error: str | None
    comparison: pd.DataFrame | None
    heads: pd.DataFrame | None
    #: The `influence` stage's tables (influence.influence.Influence), None before that stage.
    influence: Any | None = None
    #: The `review` stage's tables (influence.review.Review), None before that stage.
    review: Any | None = None
    #: The process's resident memory before and after loading the run (MB): what the run costs.
    memory_mb: dict[str, float] = field(default_factory=dict)
    #: Feature sets with a search index, any of which a query may name.
    indexed: list[str] = field(default_factory=list)
    #: Every trained head's JSON (target, features, held-out metrics...), in trained_heads order.
    head_info: list[dict[str, Any]] = field(default_factory=list)
    _row: dict[str, int] = field(default_factory=dict)
    _query_lock: threading.Lock = field(default_factory=threading.Lock)
    _search: CatalogSearch | None = None
    _choices: dict[str, frozenset[str]] = field(default_factory=dict)
    _other_explorers: dict[str, Explorer] = field(default_factory=dict)
    _evaluations: dict[tuple[str, str], HeadEvaluation] = field(default_factory=dict)
    _evaluation_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._row = {i: n for n, i in enumerate(self.catalog["image_id"])}
        self._search = CatalogSearch(self.catalog)
        self._choices = {name: frozenset(choices(self.catalog, name)) for name in FILTER_FIELDS}

    def choices(self, field_name: str) -> frozenset[str]:
        """The values a filter menu may hold for a field."""
        return self._choices.get(field_name, frozenset())

    @property
    def name(self) -> str:
        return self.run.root.name

    @property
    def search_features(self) -> str | None:
        """The feature set uploads and neighbours are searched with, None without an index."""
        return self.explorer.features if self.explorer is not None else None

    @property
    def features(self) -> list[str]:
        """The clustered feature sets, the search features first."""
        names = list(self.clusterings)
        return sorted(names, key=lambda n: (n != self.search_features, names.index(n)))

    def default_features(self, wanted: object = None) -> str | None:
        """The feature set asked for if it is clustered, else the first (None: none is)."""
        if isinstance(wanted, str) and wanted in self.clusterings:
            return wanted
        return self.features[0] if self.features else None

    def search(self, text: object, limit: int) -> list[dict[str, str]]:
        """Artists and titles matching a text: one pass over an index made at load."""
        return self._search(text, limit)

    def row_of(self, image_id: object) -> int | None:
        return self._row.get(image_id) if isinstance(image_id, str) else None

    def id_at(self, row: Any) -> str | None:
        """The image_id of a catalog row number (as a map point carries it), or None."""
        if isinstance(row, bool) or not isinstance(row, int):
            return None
        return str(self.catalog["image_id"].iat[row]) if 0 <= row < len(self.catalog) else None

    def painting(self, image_id: object) -> dict[str, Any] | None:
        """The catalog row of a painting as a dict, or None for an unknown id."""
        row = self.row_of(image_id)
        return None if row is None else self.catalog.iloc[row].to_dict()

    def image_file(self, image_id: str) -> Path | None:
        """The full image of a catalogued painting (looked up by id, never a user path)."""
        row = self.row_of(image_id)
        if row is None:
            return None
        root = self.run.image_root().resolve()
        path = self.run.image_path(self.catalog["file"].iat[row]).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def plots(self, features: str) -> dict[str, Path]:
        """The sweep plots of a clustered feature set, by name."""
        return (plot_paths(self.run, features)
                if isinstance(features, str) and features in self.clusterings else {})

    def query(self, image: Image.Image, k: int = 12, features: str | None = None
              ) -> dict[str, Any]:
        """Search with one uploaded image (the Explorer's answer; see the module doc on turns),
        with the search features or another indexed set."""
        with self._query_lock:
            return self._explorer(features).query(image, k=k)

    def neighbours(self, image_id: str, k: int = 12, features: str | None = None
                   ) -> dict[str, Any]:
        """The nearest paintings and artists of an indexed painting, itself left out."""
        with self._query_lock:
            return self._explorer(features).neighbours_of(image_id, k=k)

    def like(self, image_ids: list[str], k: int = 12) -> list[dict[str, Any]]:
        """Paintings like a set of indexed ones, the set left out."""
        with self._query_lock:
            return self._explorer().like(image_ids, k=k)

    def evaluation(self, target: object, features: object) -> HeadEvaluation | None:
        """A trained head's stored held-out evaluation (read on first use, then kept); None for
        a (target, features) the run has no head of."""
        key = (target, features)
        trained = {(i["target"], i["features"]) for i in self.head_info}
        if not (isinstance(target, str) and isinstance(features, str)) or key not in trained:
            return None
        with self._evaluation_lock:
            if key not in self._evaluations:
                self._evaluations[key] = load_evaluation(self.run, *key, self.catalog)
            return self._evaluations[key]

    def closest_pairs(self, a: list[str], b: list[str], k: int = 6) -> list[dict[str, Any]]:
        """The most alike pairs of paintings between two sets, one painting of each."""
        with self._query_lock:
            return self._explorer().closest_pairs(a, b, k=k)

    def _explorer(self, features: str | None = None) -> Explorer:
        """The search features' Explorer, or another indexed set's (loaded once; the caller
        holds the query lock)."""
        if self.explorer is None:
            raise InfluenceError(self.explorer_error or "no search index in this run")
        if features is None or features == self.explorer.features:
            return self.explorer
        if features not in self.indexed:
            raise InfluenceError(f"feature set '{features}' is not indexed in this run")
        if features not in self._other_explorers:
            self._other_explorers[features] = Explorer(self.run, features)
        return self._other_explorers[features]


def _heads(run: Run) -> pd.DataFrame | None:
    """One row per trained classifier head with its held-out metrics."""
    rows = []
    for target, features in trained_heads(run):
        info = read_json(head_paths(run, target, features)["json"])
        rows.append({"target": target, "features": features, "head": info.get("head"),
                     **{k: info.get(k) for k in ("accuracy", "macro_f1", "top5_accuracy",
                                                 "ece", "n_train", "n_test")}})
    return pd.DataFrame(rows) if rows else None


def _head_info(run: Run) -> list[dict[str, Any]]:
    """Every trained head's JSON as `train` wrote it."""
    return [read_json(head_paths(run, target, features)["json"])
            for target, features in trained_heads(run)]


def current() -> RunData:
    """The run of the app serving this request."""
    return current_app.extensions[EXTENSION]


def memory_mb() -> dict[str, float]:
    """The process's resident memory now and its peak so far, MB (Linux)."""
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return {"rss": round(pages * resource.getpagesize() / 2**20, 1),
            "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def load_run_data(run_dir: str | Path) -> RunData:
    """Load a run for the app: raises InfluenceError when it has no catalog."""
    before = memory_mb()["rss"]
    run = Run(run_dir)
    if not run.root.is_dir():
        raise InfluenceError(f"no run directory at {run.root}")
    catalog = run.catalog().reset_index(drop=True)
    for name in LABEL_FIELDS:
        catalog[name] = catalog[name].astype("string")
    clusterings = {name: load_clustering(run, name) for name in clustered_features(run)}
    explorer, explorer_error = None, None
    try:
        explorer = Explorer(run)
    except InfluenceError as e:
        explorer_error = str(e)
    try:
        influence = load_influence(run)
    except InfluenceError:
        influence = None
    try:
        review = load_review(run)
    except InfluenceError:
        review = None
    return RunData(run, catalog, clusterings, explorer, explorer_error, read_comparison(run),
                   _heads(run), influence, review,
                   {"before_load": before, "loaded": memory_mb()["rss"]},
                   indexed=indexed_features(run), head_info=_head_info(run))
