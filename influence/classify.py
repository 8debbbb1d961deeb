"""Classifier heads on frozen features: which style, genre, artist or nationality a picture has.

A head is a scikit-learn pipeline (L2 normalisation, standardisation, then a multinomial logistic
regression weighting classes so rare ones count as much as common ones, or a soft vote of
one-hidden-layer MLPs that differ only in their seed), fitted on the training part of a
stratified, seeded split that is saved per target
(`RUN/models/split-<target>.parquet`, shared by every feature set so heads compare fairly) and
evaluated on the held-out part. With `head="auto"` the kind is chosen per target and feature set
on a validation slice of the training part (never the held-out part), then refitted on all of it.
Rows without the target label are left out, not guessed; labels with fewer than `MIN_PER_CLASS`
paintings are dropped from that head, and the head says so. Past `TRAIN_MAX` training rows a head
is fitted on a seeded, stratified sample that size (its time and memory stay bounded on a large
collection) and still judged on the whole held-out part. Besides accuracy, the held-out
metrics include the expected calibration error, so a probability shown can be read as one. A head
on features fine-tuned for another target records how many of its held-out paintings that
fine-tuning trained on (`seen_in_fine_tuning`), since those figures are then optimistic.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.ensemble import VotingClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from tqdm.auto import tqdm

from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    column_fingerprints,
    fingerprint,
    read_json,
    versions,
    write_json,
)

#: Version of this stage's recipe: bump it when a code change changes the heads.
VERSION = "2"
TARGETS = ("style", "genre", "artist", "nationality")
TEST_SIZE = 0.2
SEED = 0
#: Labels with fewer paintings than this are left out of a head (too few to split and judge).
MIN_PER_CLASS = 5
#: Inverse regularisation strength of the logistic regression (on standardised features).
C = 0.1
MAX_ITER = 1000
TOP_K = 5
#: Head kinds; "auto" picks one of them per target and feature set on a validation slice.
HEADS = ("logistic", "mlp")
#: Most training rows a head is fitted on; a larger training part is sampled (stratified, seeded).
TRAIN_MAX = 10_000
#: Share of the training part held back to choose the head kind.
VALIDATION_SIZE = 0.2
#: The MLP: hidden units, L2 penalty, and the epochs without improvement before it stops.
MLP_HIDDEN = 512
MLP_ALPHA = 1.0
MLP_PATIENCE = 10
#: MLPs in the MLP head's soft vote, seeds 0.. MLP_SEEDS - 1. One MLP's held-out style accuracy
#: on the three-part set moved by 2.4 points with its seed alone. Unlike the logistic head the
#: MLPs are not class-weighted: balanced sample weights made early stopping quit after a few
#: epochs on some seeds (genre: 0.64 to 0.76 across three seeds) and lowered macro F1 as well.
MLP_SEEDS = 3
#: Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
#: Most confidently wrong test paintings kept per head.
WRONG_ROWS = 50


def make_split(image_ids: Sequence[str], labels: Sequence[Any], test_size: float = TEST_SIZE,
               seed: int = SEED, min_per_class: int = MIN_PER_CLASS
               ) -> tuple[pd.DataFrame, dict[str, int]]:
    """A stratified train/test split of the labelled rows.

    Returns (split, dropped): split has image_id, label, part ('train'|'test'), in input order;
    dropped maps each label with fewer than `min_per_class` rows to its count.
    """
    frame = pd.DataFrame({"image_id": list(image_ids), "label": pd.array(labels, dtype="string")})
    frame = frame[frame["label"].notna()]
    counts = frame["label"].value_counts()
    dropped = {str(k): int(v) for k, v in counts[counts < min_per_class].items()}
    frame = frame[~frame["label"].isin(dropped)].reset_index(drop=True)
    if frame["label"].nunique() < 2:
        return frame.assign(part=pd.Series(dtype="string")).iloc[:0], dropped
    train, _ = train_test_split(np.arange(len(frame)), test_size=test_size, random_state=seed,
                                stratify=frame["label"].to_numpy())
    part = np.full(len(frame), "test", dtype=object)
    part[train] = "train"
    return frame.assign(part=pd.array(part, dtype="string")), dropped


def make_head(kind: str = "logistic", c: float = C) -> Pipeline:
    """The untrained head: normalise, standardise, then a logistic regression or an MLP."""
    if kind == "mlp":
        model = VotingClassifier(
            [(f"seed{seed}", MLPClassifier(hidden_layer_sizes=(MLP_HIDDEN,), alpha=MLP_ALPHA,
                                           early_stopping=True, n_iter_no_change=MLP_PATIENCE,
                                           max_iter=MAX_ITER, random_state=seed))
             for seed in range(MLP_SEEDS)], voting="soft")
    elif kind == "logistic":
        model = LogisticRegression(C=c, class_weight="balanced", max_iter=MAX_ITER,
                                   random_state=SEED)
    else:
        raise InfluenceError(f"unknown head '{kind}' (heads: {', '.join(HEADS)}, auto)")
    return make_pipeline(Normalizer(), StandardScaler(), model)


def fit_sample(y: np.ndarray, limit: int | None = None, seed: int = SEED) -> np.ndarray:
    """Sorted positions of the rows a head is fitted on: all of y, or a stratified seeded sample
    of `limit` (default `TRAIN_MAX`; every label keeps at least one row)."""
    limit = TRAIN_MAX if limit is None else limit
    rows = np.arange(len(y))
    if len(y) <= limit:
        return rows
    keep, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=y)
    return np.sort(keep)


def choose_head(x: np.ndarray, y: np.ndarray) -> tuple[str, dict[str, float]]:
    """The head kind with the best accuracy on a seeded, stratified validation slice of (x, y)."""
    fit, val = train_test_split(np.arange(len(y)), test_size=VALIDATION_SIZE, random_state=SEED,
                                stratify=y)
    scores = {}
    for kind in HEADS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            head = make_head(kind).fit(x[fit], y[fit])
        scores[kind] = round(float(accuracy_score(y[val], head.predict(x[val]))), 4)
    return max(HEADS, key=lambda k: scores[k]), scores


def expected_calibration_error(y_true: Sequence[str], proba: np.ndarray,
                               classes: Sequence[str], bins: int = ECE_BINS) -> float:
    """Top-label ECE: the mean gap between confidence and accuracy over equal-width bins,
    weighted by the share of predictions in each bin (0 = probabilities mean what they say)."""
    confidence = proba.max(axis=1)
    correct = np.asarray(classes, dtype=object)[proba.argmax(axis=1)] == np.asarray(y_true,
                                                                                   dtype=object)
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    gap = 0.0
    for b in np.unique(which):
        inside = which == b
        gap += inside.mean() * abs(correct[inside].mean() - confidence[inside].mean())
    return float(gap)


def evaluate(y_true: Sequence[str], proba: np.ndarray, classes: Sequence[str],
             k: int = TOP_K) -> tuple[dict[str, Any], pd.DataFrame, pd.DataFrame]:
    """Held-out metrics from predicted probabilities (columns = `classes`), all by scikit-learn.

    Returns (metrics, per-class table, confusion matrix with true labels as rows).
    """
    classes = list(classes)
    y_true = np.asarray(y_true, dtype=object)
    y_pred = np.asarray(classes, dtype=object)[proba.argmax(axis=1)]
    p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                 average="macro", zero_division=0)
    k = min(k, len(classes))
    top_k = (1.0 if k >= len(classes)
             else top_k_accuracy_score(y_true, proba, k=k, labels=classes))
    metrics = {"accuracy": float(accuracy_score(y_true, y_pred)), "macro_precision": float(p),
               "macro_recall": float(r), "macro_f1": float(f), "top5_accuracy": float(top_k),
               "top_k": k, "n_test": len(y_true), "chance_accuracy": 1 / len(classes),
               "ece": expected_calibration_error(y_true, proba, classes), "ece_bins": ECE_BINS}
    pc, rc, fc, sc = precision_recall_fscore_support(y_true, y_pred, labels=classes,
                                                     zero_division=0)
    per_class = pd.DataFrame({"label": classes, "precision": pc, "recall": rc, "f1": fc,
                              "support": sc})
    matrix = pd.DataFrame(confusion_matrix(y_true, y_pred, labels=classes),
                          index=pd.Index(classes, name="true"), columns=classes)
    return metrics, per_class, matrix


def fine_tuned_on(info: dict[str, Any]) -> list[str]:
    """The targets a feature set's networks were fine-tuned on (itself or its combined parts)."""
    parts = [info, *info.get("parts", [])]
    return sorted({p["fine_tuned_on"] for p in parts if p.get("fine_tuned_on")})


def seen_in_fine_tuning(run: Run, features: str, target: str, held_out: Sequence[str]
                        ) -> dict[str, int]:
    """Per other target the feature set was fine-tuned on: how many of this head's held-out
    paintings were among that fine-tuning's training pictures. Their labels differ, but they
    correlate (style and genre), so a non-zero count makes the held-out figures optimistic."""
    seen = {}
    for other in fine_tuned_on(run.features_info(features)):
        path = split_path(run, other)
        if other != target and path.exists():
            other_split = pd.read_parquet(path)
            trained = other_split.loc[other_split["part"] == "train", "image_id"]
            seen[other] = int(pd.Index(held_out).isin(trained).sum())
    return seen


def head_paths(run: Run, target: str, features: str) -> dict[str, Path]:
    stem = run.models_dir / f"{target}-{features}"
    # Suffixes appended, not swapped: a feature set's name may hold a dot (`style@0.5`).
    return {"model": Path(f"{stem}.joblib"), "json": Path(f"{stem}.json"),
            "per_class": Path(f"{stem}-per_class.csv"), "confusion": Path(f"{stem}-confusion.csv"),
            "picture": Path(f"{stem}-confusion.png"), "wrong": Path(f"{stem}-wrong.csv")}


def split_path(run: Run, target: str) -> Path:
    return run.models_dir / f"split-{target}.parquet"


def run_split(run: Run, target: str, catalog: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The target's split for this run's catalog, made once and saved (image_id, part)."""
    if target not in catalog.columns:
        raise InfluenceError(f"target '{target}' is not a catalog column "
                             f"(targets: {', '.join(TARGETS)})")
    split, dropped = make_split(catalog["image_id"], catalog[target])
    path = split_path(run, target)
    saved = pd.read_parquet(path) if path.exists() else None
    if saved is None or not saved[["image_id", "part"]].equals(split[["image_id", "part"]]):
        with run.writing("train"), atomic(path) as tmp:
            split[["image_id", "part"]].to_parquet(tmp, index=False)
    return split, dropped


def _draw_confusion(matrix: pd.DataFrame, title: str, path: Path) -> None:
    """Row-normalised confusion matrix as a picture (counts written in when there is room)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = matrix.to_numpy()
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(matrix)
    side = min(40.0, max(6.0, 0.22 * n + 3))
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ticks = np.arange(n)
    size = max(3, min(10, 400 / max(n, 1)))
    ax.set_xticks(ticks, matrix.columns, rotation=90, fontsize=size)
    ax.set_yticks(ticks, matrix.index, fontsize=size)
    if n <= 25:
        for i in range(n):
            for j in range(n):
                if counts[i, j]:
                    ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=size,
                            color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true (rows sum to 1)")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def train_head(run: Run, target: str, features: str, catalog: pd.DataFrame | None = None,
               head: str = "auto") -> dict[str, Any]:
    """Bring one head up to date: choose (`head="auto"`), fit, evaluate, write; returns its JSON."""
    catalog = run.catalog() if catalog is None else catalog
    split, dropped = run_split(run, target, catalog)
    paths = head_paths(run, target, features)
    if split.empty:
        raise NothingToLearn(f"head {target}/{features}: fewer than 2 labels with at least "
                             f"{MIN_PER_CLASS} paintings each; nothing to learn")
    step = Step("train", f"{target}/{features}",
                {"c": C, "max_iter": MAX_ITER, "min": MIN_PER_CLASS, "seed": SEED,
                 "train_max": TRAIN_MAX, "test": TEST_SIZE, "head": head,
                 "mlp": [MLP_HIDDEN, MLP_ALPHA, MLP_PATIENCE, MLP_SEEDS],
                 "validation": VALIDATION_SIZE, "ece_bins": ECE_BINS}, VERSION,
                {**column_fingerprints(catalog, [target]),
                 "split": fingerprint(split["image_id"] + "\0" + split["label"] + "\0"
                                      + split["part"]),
                 "features": run.step_key("extract", features)},
                tuple(paths.values()))
    report = run.step(step, lambda: _train(run, target, features, catalog, split, dropped,
                                           head))
    return {**read_json(paths["json"]), "up_to_date": report["up_to_date"]}


def _train(run: Run, target: str, features: str, catalog: pd.DataFrame, split: pd.DataFrame,
           dropped: dict, head: str) -> dict[str, Any]:
    """Fit, evaluate and write one head; returns what run.json records of it."""
    paths = head_paths(run, target, features)
    x_all = run.features(features)
    row = pd.Series(np.arange(len(catalog)), index=catalog["image_id"].to_numpy())
    rows = row.loc[split["image_id"].to_numpy()].to_numpy()
    train, test = (split["part"] == "train").to_numpy(), (split["part"] == "test").to_numpy()
    labels = split["label"].to_numpy(dtype=object)
    n_train_part = int(train.sum())
    sampled = np.flatnonzero(train)[fit_sample(labels[train])]
    train = np.zeros(len(split), dtype=bool)
    train[sampled] = True
    x = np.asarray(x_all[rows], dtype=np.float32)
    start = time.perf_counter()
    kind, validation = ((head, {}) if head != "auto" else choose_head(x[train], labels[train]))
    choose_s = time.perf_counter() - start
    start = time.perf_counter()
    model = make_head(kind)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConvergenceWarning)
        model.fit(x[train], labels[train])
    fit_s = time.perf_counter() - start
    classes = [str(c) for c in model.classes_]
    proba = model.predict_proba(x[test])
    metrics, per_class, matrix = evaluate(labels[test], proba, classes)
    seen = seen_in_fine_tuning(run, features, target, split.loc[test, "image_id"])
    for other, count in seen.items():
        if count:
            print(f"note: head {target}/{features}: {count} of {int(test.sum())} held-out "
                  f"paintings were training pictures of the {other} fine-tuning; its held-out "
                  f"figures are optimistic", file=sys.stderr)
    n_train = pd.Series(labels[train]).value_counts()
    per_class["n_train"] = per_class["label"].map(n_train).fillna(0).astype(int)

    with atomic(paths["model"]) as tmp:
        joblib.dump({"pipeline": model, "classes": classes, "target": target,
                     "features": features}, tmp)
    with atomic(paths["per_class"]) as tmp:
        per_class.to_csv(tmp, index=False)
    with atomic(paths["confusion"]) as tmp:
        matrix.to_csv(tmp)
    _draw_confusion(matrix, f"{target} from {features} features (held-out part)",
                    paths["picture"])
    with atomic(paths["wrong"]) as tmp:
        _wrong(catalog, rows[test], labels[test], proba, classes, target).to_csv(tmp,
                                                                                index=False)
    info = {"target": target, "features": features,
            "weights": run.features_info(features).get("weights"), **metrics,
            "n_train": int(train.sum()), "train_part": n_train_part, "classes": classes,
            "unlabelled": int(catalog[target].isna().sum()),
            "dropped_classes": dropped, "min_per_class": MIN_PER_CLASS,
            "seen_in_fine_tuning": seen,
            "split": {"file": split_path(run, target).name, "test_size": TEST_SIZE, "seed": SEED,
                      "stratified": True},
            "head": kind, "head_choice": {"asked": head, "validation_accuracy": validation,
                                          "validation_size": VALIDATION_SIZE},
            "model": repr(model), "converged": not any(issubclass(w.category, ConvergenceWarning)
                                                       for w in caught),
            "timings": {"fit_s": round(fit_s, 3), "choose_s": round(choose_s, 3)},
            "versions": versions()}
    write_json(paths["json"], info)
    return {k: info[k] for k in ("head", "accuracy", "macro_f1", "top5_accuracy", "ece",
                                 "n_train", "n_test", "timings")}


def _wrong(catalog: pd.DataFrame, rows: np.ndarray, truth: np.ndarray, proba: np.ndarray,
           classes: list[str], target: str) -> pd.DataFrame:
    """The held-out paintings the head got wrong with the most confidence."""
    position = {c: i for i, c in enumerate(classes)}
    best = proba.argmax(axis=1)
    p_pred = proba[np.arange(len(best)), best]
    p_true = proba[np.arange(len(best)), [position[t] for t in truth]]
    wrong = np.flatnonzero(np.asarray(classes, dtype=object)[best] != truth)
    order = wrong[np.argsort(-p_pred[wrong], kind="stable")][:WRONG_ROWS]
    meta = catalog.iloc[rows[order]]
    return pd.DataFrame({"image_id": meta["image_id"].to_numpy(), "file": meta["file"].to_numpy(),
                         "title": meta["title"].to_numpy(), "artist": meta["artist"].to_numpy(),
                         f"true_{target}": truth[order],
                         "predicted": np.asarray(classes, dtype=object)[best[order]],
                         "p_predicted": p_pred[order].round(4), "p_true": p_true[order].round(4)})


def train_heads(run: Run, targets: Sequence[str], features: Sequence[str],
                progress: bool = True, head: str = "auto") -> list[dict[str, Any]]:
    """`train` stage: one head per (target, feature set), each kept if up to date."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise InfluenceError(f"unknown target(s) {', '.join(unknown)} "
                             f"(targets: {', '.join(TARGETS)})")
    if head not in (*HEADS, "auto"):
        raise InfluenceError(f"unknown head '{head}' (heads: {', '.join(HEADS)}, auto)")
    catalog = run.catalog()
    jobs = [(t, f) for f in features for t in targets]
    out, skipped = [], []
    for target, name in tqdm(jobs, desc="train", unit="head", disable=not progress):
        try:
            out.append(train_head(run, target, name, catalog, head))
        except NothingToLearn as e:
            skipped.append(str(e))
    if not out and skipped:
        raise InfluenceError(skipped[0])
    for reason in dict.fromkeys(skipped):
        print(f"note: skipped {reason}", file=sys.stderr)
    return out


class NothingToLearn(InfluenceError):
    """A head whose target has too few labelled paintings: skipped when others can be trained."""


@dataclass(frozen=True)
class Head:
    """A trained head, loaded for prediction (read-only, safe to share between threads)."""

    target: str
    features: str
    pipeline: Pipeline
    classes: np.ndarray

    def top(self, x: np.ndarray, k: int = TOP_K, average: bool = False
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
