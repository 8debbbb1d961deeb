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

#: The default targets, in the order heads are listed (any catalog column can be one; others
#: follow these, by name).
TARGETS = ("style", "genre", "artist", "nationality")
#: How a multi-label row's labels are joined in one cell (never in a label).
JOIN = "\n"
#: The outcomes of one label of a multi-label head on one painting.
OUTCOMES = ("tp", "fn", "fp", "tn")


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
        """Map positions (n, 2) of new raw feature rows, beside their nearest paintings; None
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
    most confidently wrong paintings, the held-out paintings' probabilities)."""
    stem = run.models_dir / f"{target}-{features}"
    # Suffixes appended, not swapped: a feature set's name may hold a dot (`style@0.5`).
    return {"model": Path(f"{stem}.joblib"), "json": Path(f"{stem}.json"),
            "per_class": Path(f"{stem}-per_class.csv"), "confusion": Path(f"{stem}-confusion.csv"),
            "picture": Path(f"{stem}-confusion.png"), "wrong": Path(f"{stem}-wrong.csv"),
            "test": Path(f"{stem}-test.parquet")}


def head_outputs(paths: dict[str, Path], multi_label: bool) -> tuple[Path, ...]:
    """The files a head of that kind writes: a multi-label head has no confusion picture (its
    confusion table holds each label's tn, fp, fn, tp)."""
    skip = {"picture"} if multi_label else set()
    return tuple(p for k, p in paths.items() if k not in skip)


def split_path(run: Run) -> Path:
    """The run's one split (image_id, part: train | validation | test), shared by every head
    and by fine-tuning."""
    return run.models_dir / "split.parquet"


@dataclass(frozen=True)
class Head:
    """A trained head, loaded for prediction (read-only, safe to share between threads).

    A multi-label head (`thresholds` set) gives each label an independent probability and
    predicts every label at or above its threshold."""

    target: str
    features: str
    pipeline: Pipeline
    classes: np.ndarray
    thresholds: np.ndarray | None = None

    @property
    def multi_label(self) -> bool:
        return self.thresholds is not None

    def proba(self, x: np.ndarray, average: bool = False) -> np.ndarray:
        """Probabilities (rows x `classes`); `average`: one row, the mean of all (views of one
        image)."""
        proba = self.pipeline.predict_proba(np.asarray(x, dtype=np.float32).reshape(len(x), -1))
        return proba.mean(axis=0, keepdims=True) if average else proba

    def top(self, x: np.ndarray, k: int = 5, average: bool = False
            ) -> list[list[dict[str, Any]]]:
        """For each row: the k most probable labels, [{label, p}], most probable first.

        `average`: one answer from the mean probabilities of all rows (views of one image).
        """
        proba = self.proba(x, average)
        order = np.argsort(-proba, axis=1, kind="stable")[:, :k]
        return [[{"label": str(self.classes[j]), "p": round(float(p[j]), 4)} for j in o]
                for p, o in zip(proba, order, strict=True)]

    def labels(self, x: np.ndarray, average: bool = False) -> list[list[dict[str, Any]]]:
        """For each row, what the head predicts, most probable first: every label at or above
        its threshold, [{label, p, threshold}] (multi-label), else the most probable label,
        [{label, p}]."""
        if not self.multi_label:
            return self.top(x, 1, average)
        out = []
        for p in self.proba(x, average):
            hit = np.flatnonzero(p >= self.thresholds)
            hit = hit[np.argsort(-p[hit], kind="stable")]
            out.append([{"label": str(self.classes[j]), "p": round(float(p[j]), 4),
                         "threshold": round(float(self.thresholds[j]), 4)} for j in hit])
        return out

    def predict(self, x: np.ndarray, average: bool = False, k: int = 5
                ) -> list[list[dict[str, Any]]]:
        """What a query shows of this head: a multi-label head's labels above their thresholds
        (`labels`), a single-label head's k most probable (`top`)."""
        return self.labels(x, average) if self.multi_label else self.top(x, k, average)


def load_head(run: Run, target: str, features: str) -> Head:
    path = head_paths(run, target, features)["model"]
    run.require(path, f"train --target {target} --features {features}")
    saved = joblib.load(run.verified(path))
    thresholds = saved.get("thresholds")
    return Head(target, features, saved["pipeline"], np.asarray(saved["classes"], dtype=object),
                None if thresholds is None else np.asarray(thresholds, dtype=np.float64))


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


def catalog_labels(catalog: pd.DataFrame, definition: dict[str, Any]) -> pd.Series:
    """Each painting's label under a head's recorded target definition (`columns`,
    `multi_label`, `separator`): the column's value, or a multi-label row's sorted labels
    joined by `JOIN`; NA where it has none."""
    columns = list(definition["columns"])
    if not definition.get("multi_label"):
        return catalog[columns[0]].astype("string").reset_index(drop=True)
    separator = definition["separator"]
    sets: list[set[str]] = [set() for _ in range(len(catalog))]
    for column in columns:
        for i, cell in enumerate(catalog[column].astype("string").to_numpy(dtype=object,
                                                                           na_value=None)):
            if cell is not None:
                sets[i].update(v.strip() for v in cell.split(separator) if v.strip())
    return pd.Series(pd.array([JOIN.join(sorted(s)) if s else pd.NA for s in sets],
                              dtype="string"))


@dataclass(frozen=True)
class HeadEvaluation:
    """A head's held-out evaluation as `train` stored it: its JSON, per-class (per-label) table,
    confusion table, most confidently wrong paintings and each held-out painting's probabilities,
    with the paintings' true labels read from the catalog under the recorded target definition.

    `truth` is each held-out painting's label (single-label) or a painting x label indicator
    (multi-label); `predicted` the head's answer the same way (the most probable label, or every
    label at or above its threshold)."""

    info: dict[str, Any]
    per_class: pd.DataFrame
    confusion: pd.DataFrame
    wrong: pd.DataFrame | None
    test: pd.DataFrame
    truth: np.ndarray

    @property
    def multi_label(self) -> bool:
        return bool(self.info.get("multi_label"))

    @property
    def classes(self) -> list[str]:
        return list(self.info["classes"])

    @property
    def proba(self) -> np.ndarray:
        return self.test[self.classes].to_numpy(dtype=np.float64)

    @property
    def thresholds(self) -> np.ndarray:
        return np.array([self.info["thresholds"][c] for c in self.classes], dtype=np.float64)

    @cached_property
    def predicted(self) -> np.ndarray:
        if self.multi_label:
            return self.proba >= self.thresholds
        return np.asarray(self.classes, dtype=object)[self.proba.argmax(axis=1)]

    def cell(self, row: str, column: str) -> pd.DataFrame:
        """The held-out paintings behind one confusion cell, most probable first: (true label,
        predicted label) for a single-label head, (label, outcome in OUTCOMES) for a multi-label
        one; columns image_id and p (the probability of the predicted label, or of the label)."""
        if row not in self.classes:
            raise InfluenceError(f"head {self.info['target']}: no label '{row}'")
        if self.multi_label:
            if column not in OUTCOMES:
                raise InfluenceError(f"outcome must be one of {', '.join(OUTCOMES)}")
            j = self.classes.index(row)
            truth, predicted = self.truth[:, j], self.predicted[:, j]
            inside = {"tp": truth & predicted, "fn": truth & ~predicted,
                      "fp": ~truth & predicted, "tn": ~truth & ~predicted}[column]
            p = self.proba[:, j]
        else:
            if column not in self.classes:
                raise InfluenceError(f"head {self.info['target']}: no label '{column}'")
            inside = (self.truth == row) & (self.predicted == column)
            p = self.proba[:, self.classes.index(column)]
        found = pd.DataFrame({"image_id": self.test["image_id"].to_numpy()[inside],
                              "p": p[inside]})
        return found.sort_values("p", ascending=False, kind="stable").reset_index(drop=True)

    def at_threshold(self, label: str, threshold: float) -> dict[str, float | None]:
        """A multi-label head's held-out precision and recall for one label at another
        threshold, read from its stored precision-recall curve (the curve's first point at or
        above the threshold; precision None where nothing would be predicted)."""
        curve = (self.info.get("pr_curves") or {}).get(label)
        if curve is None:
            return {"threshold": threshold, "precision": None, "recall": None}
        at = int(np.searchsorted(np.asarray(curve["threshold"]), threshold, side="left"))
        if at >= len(curve["threshold"]):
            return {"threshold": threshold, "precision": None, "recall": 0.0}
        return {"threshold": float(curve["threshold"][at]),
                "precision": float(curve["precision"][at]), "recall": float(curve["recall"][at])}


def load_evaluation(run: Run, target: str, features: str,
                    catalog: pd.DataFrame | None = None) -> HeadEvaluation:
    """A trained head's stored held-out evaluation (nothing refitted or re-predicted); the
    catalog gives the held-out paintings' true labels. `wrong` is None for a head trained before
    multi-label heads stored theirs."""
    paths = head_paths(run, target, features)
    run.require(paths["json"], f"train --target {target} --features {features}")
    info = read_json(run.verified(paths["json"]))
    multi = bool(info.get("multi_label"))
    test = pd.read_parquet(run.verified(paths["test"]))
    confusion = pd.read_csv(run.verified(paths["confusion"]), index_col=0, keep_default_na=False)
    per_class = pd.read_csv(run.verified(paths["per_class"]), keep_default_na=False,
                            na_values=[""], dtype={"label": str})
    wrong = (pd.read_csv(run.verified(paths["wrong"]), keep_default_na=False, na_values=[""])
             if paths["wrong"].exists() else None)
    catalog = run.catalog() if catalog is None else catalog
    labels = catalog_labels(catalog, info["definition"])
    by_id = pd.Series(labels.to_numpy(dtype=object, na_value=None),
                      index=catalog["image_id"].to_numpy())
    truth = by_id.reindex(test["image_id"].to_numpy()).to_numpy(dtype=object)
    if multi:
        classes = list(info["classes"])
        sets = [set(v.split(JOIN)) if isinstance(v, str) else set() for v in truth]
        truth = np.array([[c in s for c in classes] for s in sets], dtype=bool).reshape(
            len(sets), len(classes))
    return HeadEvaluation(info, per_class, confusion, wrong, test, truth)
