"""The `train` stage: classifier heads on frozen features (style, genre, artist, nationality).

A head (`make_estimator`, built from `influence.estimators.heads`) is a scikit-learn pipeline: L2
normalisation, standardisation, a PCA to at most `DIMS` components, then a multinomial logistic
regression weighting classes so rare ones count as much as common ones, or a soft vote of
one-hidden-layer MLPs that differ only in their seed (PyTorch, early stopping on a validation
slice), fitted on the training part of a stratified, seeded split that is saved per target
(`RUN/models/split-<target>.parquet`, shared by every feature set so heads compare fairly) and
evaluated on the held-out part. With `head="auto"` both kinds are fitted once on a validation
split of the training part (never the held-out part) and only the better one is refitted on all
of it. Rows without the target label are left out, not guessed; labels with fewer than
`MIN_PER_CLASS` paintings are dropped from that head, and the head says so. Past `TRAIN_MAX`
training rows a head is fitted on a seeded, stratified sample that size and still judged on the
whole held-out part. Besides accuracy, the held-out metrics include the expected calibration
error, so a probability shown can be read as one. A head on features fine-tuned for another
target records how many of its held-out paintings that fine-tuning trained on
(`seen_in_fine_tuning`), since those figures are then optimistic. The step's key is the head's
`get_params()`, this module's constants and `VERSION`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from influence.estimators.heads import AutoHead, MLPHead, fit_quietly, logistic, make_head
from influence.plots import draw_confusion
from influence.readers import TARGETS, head_paths, split_path
from influence.runs import (
    Growth,
    InfluenceError,
    Rows,
    Run,
    Step,
    atomic,
    estimator_step,
    read_json,
    versions,
    write_json,
)

#: Version of this stage's recipe: bump it when a code change changes the heads.
VERSION = "3"
TEST_SIZE = 0.2
SEED = 0
#: Labels with fewer paintings than this are left out of a head (too few to split and judge).
MIN_PER_CLASS = 5
#: Components the head keeps of the standardised features (fewer when the features have fewer).
#: The heads' costs scale with it; on the full run's three-part set (2,660 columns) 256 components
#: keep the held-out accuracy of the whole width (docs/heads-and-clusters.md).
DIMS = 256
#: Inverse regularisation strength of the logistic regression (on standardised features).
C = 0.1
MAX_ITER = 1000
TOP_K = 5
#: Head kinds; "auto" fits both on a validation slice and keeps the better.
HEADS = ("logistic", "mlp")
#: Most training rows a head is fitted on; a larger training part is sampled (stratified, seeded).
TRAIN_MAX = 10_000
#: Share of the training part held back to choose the head kind.
VALIDATION_SIZE = 0.2
#: The MLP: hidden units, L2 penalty, epochs without a better validation accuracy before a member
#: stops, most epochs, minibatch, Adam's learning rate, and the share of its rows it stops on.
MLP_HIDDEN = 512
MLP_ALPHA = 1.0
MLP_PATIENCE = 10
MLP_EPOCHS = 200
MLP_BATCH = 200
MLP_LEARNING_RATE = 1e-3
MLP_VALIDATION = 0.1
#: MLPs in the MLP head's soft vote, seeds SEED.. (trained together as one batched network). One
#: MLP's held-out style accuracy on the three-part set moved by 2.4 points with its seed alone.
#: Unlike the logistic head the MLPs are not class-weighted: balanced sample weights made early
#: stopping quit after a few epochs on some seeds (genre: 0.64 to 0.76 across three seeds) and
#: lowered macro F1 as well.
MLP_SEEDS = 3
#: Threads a head is fitted with (BLAS and PyTorch): the same head on any machine, and on a busy
#: shared one a single thread ran a head 4 to 6 times faster than two (docs/heads-and-clusters.md).
THREADS = 1
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


def make_estimator(kind: str = "logistic") -> Pipeline:
    """The untrained head of one kind ("logistic", "mlp" or "auto"), from this module's
    constants: normalise, standardise, PCA to `DIMS`, then the classifier."""
    models = {"logistic": logistic(C, MAX_ITER, SEED),
              "mlp": MLPHead(MLP_HIDDEN, MLP_ALPHA, MLP_SEEDS, MLP_PATIENCE, MLP_EPOCHS,
                             MLP_BATCH, MLP_LEARNING_RATE, MLP_VALIDATION, THREADS, SEED)}
    if kind == "auto":
        return make_head(AutoHead(models, VALIDATION_SIZE, SEED), DIMS, SEED)
    if kind not in models:
        raise InfluenceError(f"unknown head '{kind}' (heads: {', '.join(HEADS)}, auto)")
    return make_head(models[kind], DIMS, SEED)


def fit_sample(y: np.ndarray, limit: int | None = None, seed: int = SEED) -> np.ndarray:
    """Sorted positions of the rows a head is fitted on: all of y, or a stratified seeded sample
    of `limit` (default `TRAIN_MAX`; every label keeps at least one row)."""
    limit = TRAIN_MAX if limit is None else limit
    rows = np.arange(len(y))
    if len(y) <= limit:
        return rows
    keep, _ = train_test_split(rows, train_size=limit, random_state=seed, stratify=y)
    return np.sort(keep)


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


def run_split(run: Run, target: str, catalog: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """The target's split for this run's catalog, made once and saved (image_id, part).

    A step of the run protocol with the catalog's rows: paintings added since keep out of the
    split (the heads predict them, never train or judge on them) and removed ones leave it,
    until the protocol refits it (then every head of the target is fitted again).
    """
    if target not in catalog.columns:
        raise InfluenceError(f"target '{target}' is not a catalog column "
                             f"(targets: {', '.join(TARGETS)})")
    path = split_path(run, target)
    step = Step("train", f"split-{target}", {"test_size": TEST_SIZE, "seed": SEED,
                                             "min_per_class": MIN_PER_CLASS}, VERSION, {},
                (path,), Rows(catalog[["image_id", target]], fit=(target,)))

    def build() -> dict[str, Any]:
        split, dropped = make_split(catalog["image_id"], catalog[target])
        with atomic(path) as tmp:
            split[["image_id", "part"]].to_parquet(tmp, index=False)
        return {"dropped": dropped, "paintings": len(split)}

    def extend(growth: Growth) -> dict[str, Any]:
        saved = pd.read_parquet(run.verified(path))
        kept = saved[saved["image_id"].isin(growth.after)]
        with atomic(path) as tmp:
            kept.to_parquet(tmp, index=False)
        return {"dropped": growth.record["dropped"],
                "paintings": len(kept)}

    report = run.step(step, build, extend)
    saved = pd.read_parquet(run.verified(path))
    labels = catalog.set_index("image_id")[target].astype("string")
    split = saved.assign(label=labels.loc[saved["image_id"]].to_numpy())
    return split[["image_id", "label", "part"]].reset_index(drop=True), report["dropped"]


def head_step(run: Run, target: str, features: str, catalog: pd.DataFrame, split: pd.DataFrame,
              head: str) -> Step:
    """The step of one head: the head's parameters and this module's constants, its split's
    and its features' fits, and the split's rows (label, part): paintings added since the
    split was made are predicted, not trained on, so they keep the head as it is."""
    return estimator_step("train", f"{target}/{features}", {"head": make_estimator(head)},
                          sys.modules[__name__],
                          {"split": run.fit_key("train", f"split-{target}"),
                           "features": run.fit_key("extract", features)},
                          tuple(head_paths(run, target, features).values()),
                          rows=Rows(split[["image_id", "label", "part"]], fit=("label", "part")))


def train_head(run: Run, target: str, features: str, catalog: pd.DataFrame | None = None,
               head: str = "auto") -> dict[str, Any]:
    """Bring one head up to date: choose (`head="auto"`), fit, evaluate, write; returns its JSON."""
    catalog = run.catalog() if catalog is None else catalog
    split, dropped = run_split(run, target, catalog)
    paths = head_paths(run, target, features)
    if split.empty:
        raise NothingToLearn(f"head {target}/{features}: fewer than 2 labels with at least "
                             f"{MIN_PER_CLASS} paintings each; nothing to learn")
    step = head_step(run, target, features, catalog, split, head)
    report = run.step(step, lambda: _train(run, target, features, catalog, split, dropped,
                                           head),
                      lambda growth: _keep(run, target, features, growth))
    return {**read_json(paths["json"]), "up_to_date": report["up_to_date"]}


def _keep(run: Run, target: str, features: str, growth: Growth) -> dict[str, Any]:
    """Keep a head whose split lost paintings: the removed ones leave its list of wrong
    answers; its model and held-out figures stay those of its fit."""
    paths = head_paths(run, target, features)
    wrong = pd.read_csv(run.verified(paths["wrong"]))
    with atomic(paths["wrong"]) as tmp:
        wrong[wrong["image_id"].astype(str).isin(growth.after)].to_csv(tmp, index=False)
    info = read_json(run.verified(paths["json"]))
    return {k: info[k] for k in ("head", "accuracy", "macro_f1", "top5_accuracy", "ece",
                                 "n_train", "n_test", "timings")}


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
    model = make_estimator(head)
    with threadpool_limits(THREADS):
        converged = fit_quietly(model, x[train], labels[train])
    fit_s = time.perf_counter() - start
    final = model[-1]
    kind, validation = ((final.kind_, final.validation_accuracy_) if head == "auto"
                        else (head, {}))
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
    draw_confusion(matrix, f"{target} from {features} features (held-out part)",
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
            "model": repr(model), "converged": converged,
            "components": int(model[-2].n_components_) if len(model) > 3 else None,
            "timings": {"fit_s": round(fit_s, 3)},
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
