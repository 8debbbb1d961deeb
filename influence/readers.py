"""Reading back what the `cluster` and `train` stages stored, for the app and the queries.

Nothing here fits or recomputes: a `Clustering` or a `Head` is the stored result, loaded once
and safe to share between threads.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.pipeline import Pipeline

from influence.runs import InfluenceError, Run, read_json

#: Targets a head can learn, in the order heads are listed.
TARGETS = ("style", "genre", "artist", "nationality")


# ----------------------------------------------------------------------------------- clusterings
def clustered_features(run: Run) -> list[str]:
    """Feature sets with a finished clustering in the run, in a stable order."""
    if not run.clusters_dir.exists():
        return []
    return sorted(p.parent.name for p in run.clusters_dir.glob("*/summary.json"))


@dataclass
class Clustering:
    """A feature set's stored clustering; the fitted models load only when first needed."""

    features: str
    summary: dict[str, Any]
    assignments: pd.DataFrame
    profiles: pd.DataFrame
    typical: pd.DataFrame
    sweep: pd.DataFrame
    path: Path

    @cached_property
    def _responsibilities(self) -> np.ndarray:
        return np.load(self.path / "responsibilities.npy", mmap_mode="r")

    @cached_property
    def _model(self) -> dict[str, Any]:
        return joblib.load(self.path / "model.joblib")

    def responsibilities_of(self, rows: np.ndarray) -> np.ndarray:
        """Stored GMM responsibilities (n, gmm_k) of catalog rows (an index array)."""
        return np.asarray(self._responsibilities[np.asarray(rows)])

    def _reduce(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        return self._model["reducer"].transform(x).astype(np.float32)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """KMeans cluster of new raw feature rows."""
        return self._model["kmeans"].predict(self._reduce(x)).astype(np.int32)

    def responsibilities(self, x: np.ndarray) -> np.ndarray:
        """GMM soft membership of new raw feature rows, each row summing to one."""
        return self._model["gmm"].predict_proba(self._reduce(x)).astype(np.float32)

    def place(self, x: np.ndarray) -> np.ndarray | None:
        """Map positions (n, 2) of new raw feature rows, by the stored UMAP's transform; None
        for a clustering stored before the projection was kept (run `cluster` again)."""
        projection = self._model.get("projection")
        return None if projection is None else projection.transform(self._reduce(x))


def load_clustering(run: Run, features: str) -> Clustering:
    """The stored clustering of one feature set; InfluenceError if it has not been clustered."""
    path = run.clusters_dir / features
    if not (path / "summary.json").exists():
        done = ", ".join(clustered_features(run)) or "none"
        raise InfluenceError(f"features '{features}' are not clustered in run {run.root} "
                             f"(clustered: {done}): run `cluster` first")
    return Clustering(
        features=features,
        summary=read_json(run.verified(path / "summary.json")),
        assignments=pd.read_parquet(run.verified(path / "assignments.parquet")),
        profiles=pd.read_parquet(run.verified(path / "profiles.parquet")),
        typical=pd.read_parquet(run.verified(path / "typical.parquet")),
        sweep=pd.read_csv(run.verified(path / "sweep.csv")),
        path=path,
    )


# ----------------------------------------------------------------------------------------- heads
def head_paths(run: Run, target: str, features: str) -> dict[str, Path]:
    """The files of one head (model, JSON, per-class table, confusion table and picture, the
    most confidently wrong paintings)."""
    stem = run.models_dir / f"{target}-{features}"
    # Suffixes appended, not swapped: a feature set's name may hold a dot (`style@0.5`).
    return {"model": Path(f"{stem}.joblib"), "json": Path(f"{stem}.json"),
            "per_class": Path(f"{stem}-per_class.csv"), "confusion": Path(f"{stem}-confusion.csv"),
            "picture": Path(f"{stem}-confusion.png"), "wrong": Path(f"{stem}-wrong.csv")}


def split_path(run: Run, target: str) -> Path:
    return run.models_dir / f"split-{target}.parquet"


@dataclass(frozen=True)
class Head:
    """A trained head, loaded for prediction (read-only, safe to share between threads)."""

    target: str
    features: str
    pipeline: Pipeline
    classes: np.ndarray

    def top(self, x: np.ndarray, k: int = 5, average: bool = False
            ) -> list[list[dict[str, Any]]]:
        """For each row: the k most probable labels, [{label, p}], most probable first.

        `average`: one answer from the mean probabilities of all rows (views of one image).
        """
        proba = self.pipeline.predict_proba(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
        if average:
            proba = proba.mean(axis=0, keepdims=True)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [[{"label": str(self.classes[j]), "p": round(float(p[j]), 4)} for j in o]
                for p, o in zip(proba, order, strict=True)]


def load_head(run: Run, target: str, features: str) -> Head:
    path = head_paths(run, target, features)["model"]
    run.require(path, f"train --target {target} --features {features}")
    saved = joblib.load(run.verified(path))
    return Head(target, features, saved["pipeline"], np.asarray(saved["classes"], dtype=object))


def trained_heads(run: Run) -> list[tuple[str, str]]:
    """(target, features) of every head trained in the run, in a stable order."""
    if not run.models_dir.exists():
        return []
    heads = []
    for path in sorted(run.models_dir.glob("*.json")):
        info = read_json(path)
        if isinstance(info, dict) and {"target", "features"} <= info.keys() \
                and head_paths(run, info["target"], info["features"])["model"].exists():
            heads.append((info["target"], info["features"]))
    order = {t: i for i, t in enumerate(TARGETS)}
    return sorted(heads, key=lambda h: (h[1], order.get(h[0], len(order)), h[0]))
