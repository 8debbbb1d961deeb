"""Everything the app shows, loaded once per server process and read-only: shared by all users.

Pages and callbacks reach it with `current()`, through the Flask app serving the request, so
two apps over two runs can live in one process (the tests do).
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
from influence.influence import load_influence
from influence.readers import clustered_features, head_paths, load_clustering, trained_heads
from influence.runs import InfluenceError, Run, read_json
from influence.selections import plot_paths, read_comparison
from influence.similar import Explorer
from influence.thumbnails import thumbs_dir

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
    #: The process's resident memory before and after loading the run (MB): what the run costs.
    memory_mb: dict[str, float] = field(default_factory=dict)
    _row: dict[str, int] = field(default_factory=dict)
    _query_lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._row = {i: n for n, i in enumerate(self.catalog["image_id"])}

    @property
    def name(self) -> str:
        return self.run.root.name

    @property
    def features(self) -> list[str]:
        """The clustered feature sets, the search features first."""
        names = list(self.clusterings)
        default = self.explorer.features if self.explorer is not None else None
        return sorted(names, key=lambda n: (n != default, names.index(n)))

    def default_features(self, wanted: str | None = None) -> str | None:
        if wanted in self.clusterings:
            return wanted
        return self.features[0] if self.features else None

    def row_of(self, image_id: str) -> int | None:
        return self._row.get(image_id)

    def id_at(self, row: Any) -> str | None:
        """The image_id of a catalog row number (as a map point carries it), or None."""
        try:
            row = int(row)
        except (TypeError, ValueError):
            return None
        return str(self.catalog["image_id"].iat[row]) if 0 <= row < len(self.catalog) else None

    def painting(self, image_id: str) -> dict[str, Any] | None:
        """The catalog row of a painting as a dict, or None for an unknown id."""
        row = self.row_of(image_id)
        return None if row is None else self.catalog.iloc[row].to_dict()

    def image_file(self, image_id: str) -> Path | None:
        """The full image of a catalogued painting (looked up by id, never a user path)."""
        row = self.row_of(image_id)
        if row is None:
            return None
        root = self.run.image_root().resolve()
        path = (root / self.catalog["file"].iat[row]).resolve()
        return path if path.is_relative_to(root) and path.is_file() else None

    def plots(self, features: str) -> dict[str, Path]:
        """The sweep plots of a clustered feature set, by name."""
        return plot_paths(self.run, features) if features in self.clusterings else {}

    def has_thumbnails(self) -> bool:
        return (thumbs_dir(self.run) / "thumbs.json").exists()

    def query(self, image: Image.Image, k: int = 12) -> dict[str, Any]:
        """Search with one uploaded image; queries take turns so two uploads never interleave."""
        if self.explorer is None:
            raise InfluenceError(self.explorer_error or "no search index in this run")
        with self._query_lock:
            return self.explorer.query(image, k=k)


def _heads(run: Run) -> pd.DataFrame | None:
    """One row per trained classifier head with its held-out metrics."""
    rows = []
    for target, features in trained_heads(run):
        info = read_json(head_paths(run, target, features)["json"])
        rows.append({"target": target, "features": features, "head": info.get("head"),
                     **{k: info.get(k) for k in ("accuracy", "macro_f1", "top5_accuracy",
                                                 "ece", "n_train", "n_test")}})
    return pd.DataFrame(rows) if rows else None


def current() -> RunData:
    """The run of the app serving this request."""
    return current_app.extensions[EXTENSION]


def memory_mb() -> dict[str, float]:
    """The process's resident memory now and its peak so far, MB (Linux)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return {"rss": round(pages * resource.getpagesize() / 2**20, 1),
            "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def load_run_data(run_dir: str | Path) -> RunData:
    """Load a run for the app: raises InfluenceError when it has no catalog."""
    before = memory_mb()["rss"]
    run = Run(Path(run_dir))
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
    return RunData(run, catalog, clusterings, explorer, explorer_error, read_comparison(run),
                   _heads(run), influence, {"before_load": before, "loaded": memory_mb()["rss"]})
