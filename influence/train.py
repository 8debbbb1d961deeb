"""The `train` stage: classifier heads on frozen features, for any label column of the catalog.

A target (`Target`) is one catalog column (single-label: style, genre, a column of the user's
own) or labels from one or more columns split by a separator (multi-label: `tags` declared with
`--multi-label tags`, or `genre+style`). Every target is judged on ONE image-level split of the
run (`RUN/models/split.parquet`, `shared_split`): a `split` column in the catalog fixes a
painting's part (train / validation / test); the others are split seeded, stratified by the
first target the run's `train` (or `finetune`) was asked for, once, and kept whatever is trained
later, so no target's held-out painting is another target's (or a fine-tuning's) training one.
Paintings added to the run since are in no part (predicted, not trained on) and removed ones
leave it, until the run protocol makes it again (and with it every head).

A single-label head (`make_estimator`, built from `influence.estimators.heads`) is a
scikit-learn pipeline: the reduction (L2 normalisation, standardisation, a PCA to at most `DIMS`
components), then a multinomial logistic regression on the whitened components weighting
classes so rare ones count as much as common ones, or a soft vote of one-hidden-layer MLPs that
differ only in their seed (PyTorch, a few epochs under a one-cycle learning rate, each member
keeping its best epoch on a validation slice), fitted on the training
part and evaluated on the held-out part. The reduction learns no label: it is fitted once per
feature set, on the training and validation parts of the run's split (`shared_reduction`), and
every head of that set is fitted on its output, so the data crosses it once. With `head="auto"`
both kinds are fitted once and judged on the validation part (the split's, else a seeded,
stratified tenth of the training part the MLP keeps its epochs on; never the held-out part); a
chosen MLP is kept as fitted, a chosen logistic regression refitted on all of it. A multi-label head
(`make_multi_label_estimator`) is the same reduction then one class-balanced logistic regression
per label (one-vs-rest), fitted on the training part; each label's threshold is chosen on the
validation part (the one with the best F1, or the lowest that reaches a target precision) and its
held-out precision, recall, F1, average precision and precision-recall curve are recorded with
the held-out probabilities and the most confidently wrong held-out paintings.

Rows without the target label are left out, not guessed. Labels with fewer than `MIN_PER_CLASS`
labelled paintings (or none in the training part) are too small: `train` names them with their
counts and stops, or leaves them out when asked to (`drop_small_classes`), and the head says so.
Past `TRAIN_MAX` training rows a head is fitted on a seeded sample that size and still judged on
the whole held-out part. Besides accuracy, a single-label head's held-out metrics include the
expected calibration error, so a probability shown can be read as one. The step's key is the
head's `get_params()`, the target's definition, this module's constants and `VERSION`.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import joblib
import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    confusion_matrix,
    multilabel_confusion_matrix,
    precision_recall_curve,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.model_selection import train_test_split
from sklearn.multiclass import OneVsRestClassifier
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import MultiLabelBinarizer
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from influence.catalog import LABEL_SEPARATOR
from influence.estimators.heads import (
    AutoHead,
    MLPHead,
    fit_quietly,
    logistic,
    make_head,
    make_reduction,
    whitened_logistic,
)
from influence.plots import draw_confusion
from influence.readers import JOIN, TARGETS, catalog_labels, head_outputs, head_paths, split_path
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
VERSION = "6"
TEST_SIZE = 0.2
SEED = 0
#: Labels with fewer labelled paintings than this (or none in the training part) are too small
#: to learn and judge: `train` names them and stops, or leaves them out if asked to.
MIN_PER_CLASS = 5
#: Components the head keeps of the standardised features (fewer when the features have fewer).
#: The heads' costs scale with it; on the full run's three-part set (2,660 columns) 256 components
#: keep the held-out accuracy of the whole width (docs/heads-and-clusters.md).
DIMS = 256
#: Inverse regularisation strength of the logistic regression (on the whitened components).
C = 0.1
MAX_ITER = 1000
#: The logistic regression's components are whitened shrunk towards their mean variance
#: (`ShrunkWhitening`): lbfgs then takes a tenth of the iterations, at the same accuracy.
WHITEN_SHRINK = 1.0
TOP_K = 5
#: Head kinds; "auto" fits both once and keeps the better on a validation slice.
HEADS = ("logistic", "mlp")
#: Most training rows a head is fitted on; a larger training part is sampled (stratified, seeded).
TRAIN_MAX = 10_000
#: Share of the training part a multi-label head's thresholds are chosen on (the head kind is
#: chosen on the MLP's own validation slice, `MLP_VALIDATION`).
VALIDATION_SIZE = 0.2
#: The MLP: hidden units, L2 penalty, epochs (a one-cycle learning rate over them; each member
#: keeps its best epoch on the validation slice), minibatch, Adam's peak learning rate, and the
#: share of its rows it keeps its epoch on. Ten epochs at 3e-3 on batches of 256 matched the
#: previous recipe (early stopping with patience 10 at 1e-3 on batches of 200: 15 to 65 epochs)
#: within a point on every head, for a fifth of its epochs (docs/heads-and-clusters.md).
MLP_HIDDEN = 512
MLP_ALPHA = 1.0
MLP_EPOCHS = 10
MLP_BATCH = 256
MLP_LEARNING_RATE = 3e-3
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
#: Most points of each label's stored precision-recall curve (evenly spaced along it).
PR_POINTS = 200
#: A multi-label head's threshold for a label with no positive painting in the validation part.
DEFAULT_THRESHOLD = 0.5
#: The parts a painting can be in (a catalog `split` column uses the same words).
PARTS = ("train", "validation", "test")


@dataclass(frozen=True)
class Target:
    """What a head learns: one catalog column's value (single-label), or the labels of one or
    more columns, each cell split at `separator` (multi-label: one probability per label)."""

    name: str
    columns: tuple[str, ...]
    multi_label: bool = False
    separator: str = LABEL_SEPARATOR

    def describe(self) -> dict[str, Any]:
        """The definition recorded with the head (and in its step's key)."""
        out: dict[str, Any] = {"name": self.name, "columns": list(self.columns),
                               "multi_label": self.multi_label}
        if self.multi_label:
            out["separator"] = self.separator
        return out


def as_target(target: str | Target) -> Target:
    """A target from its name: `a+b` is multi-label over columns a and b, any other name the
    single-label column of that name."""
    if isinstance(target, Target):
        return target
    columns = tuple(c.strip() for c in target.split("+"))
    return Target(target, columns, multi_label=len(columns) > 1)


def parse_targets(targets: str | Sequence[str] | None,
                  multi_label: str | Sequence[str] | None = None) -> list[Target]:
    """The targets of `--target` (comma-separated; `a+b` multi-label) and `--multi-label
    COLUMN[:SEP]` (`;` by default); a name in both is multi-label. Default: `TARGETS`."""
    def items(value: str | Sequence[str] | None) -> list[str]:
        if value is None:
            return []
        parts = value.split(",") if isinstance(value, str) else value
        return [v.strip() for v in parts if v.strip()]

    declared = {}
    for spec in items(multi_label):
        name, _, sep = spec.partition(":")
        declared[name.strip()] = Target(name.strip(), tuple(c.strip() for c in name.split("+")),
                                        True, sep or LABEL_SEPARATOR)
    names = items(targets) or ([] if declared else list(TARGETS))
    out = [declared.pop(n) if n in declared else as_target(n) for n in names]
    return out + list(declared.values())


def check_targets(targets: Sequence[Target], catalog: pd.DataFrame) -> None:
    """A one-line error for a target naming no catalog column or one no file name can hold."""
    unknown = sorted({c for t in targets for c in t.columns if c not in catalog.columns})
    if unknown:
        raise InfluenceError(f"unknown target(s) {', '.join(unknown)} (catalog columns: "
                             f"{', '.join(c for c in catalog.columns if c != 'image_id')})")
    for t in targets:
        if not re.fullmatch(r"[^/\\\0]+", t.name) or t.name.startswith("."):
            raise InfluenceError(f"target '{t.name}' cannot name a head's files (no '/', '\\' "
                                 "or leading '.'): rename the column")


def make_split(image_ids: Sequence[str], strata: Sequence[Any] | None = None,
               given: Sequence[Any] | None = None, test_size: float = TEST_SIZE,
               seed: int = SEED) -> pd.DataFrame:
    """One image-level split: (image_id, part) in input order, part train | validation | test.

    A `given` part (a catalog `split` column) is kept; the other paintings are split seeded into
    train and test, stratified by `strata` where it allows (unlabelled paintings and labels with
    a single painting are strata of their own), else plainly.
    """
    ids = pd.array(list(image_ids), dtype="string")
    part = pd.Series(pd.array(list(given) if given is not None else [pd.NA] * len(ids),
                              dtype="string"))
    free = np.flatnonzero(part.isna().to_numpy())
    if len(free) >= 2:
        by = None
        if strata is not None:
            s = pd.Series(pd.array(list(strata), dtype="string")).iloc[free].fillna("\0none")
            counts = s.value_counts()
            s = s.where(s.map(counts) >= 2, "\0rare")
            if (s == "\0rare").sum() == 1:
                s = s.replace("\0rare", counts.index[0])
            n_test = int(np.ceil(test_size * len(free)))
            if s.nunique() <= min(n_test, len(free) - n_test):
                by = s.to_numpy()
        train, _ = train_test_split(free, test_size=test_size, random_state=seed, stratify=by)
        part.iloc[free] = "test"
        part.iloc[train] = "train"
    elif len(free):
        part.iloc[free] = "train"
    return pd.DataFrame({"image_id": ids, "part": pd.array(part, dtype="string")})


def shared_split(run: Run, catalog: pd.DataFrame, first: Target | None = None) -> pd.DataFrame:
    """The run's one split (image_id, part), made once and recorded: the catalog's `split`
    column where it says, else seeded and stratified by `first`'s labels.

    A step of the run protocol with the catalog's rows: paintings split when it was made keep
    their part, paintings added since get none (every head predicts them, none trains or is
    judged on them) and removed ones leave it, until the protocol refits it (grown past
    REFIT_SHARE, a fitted painting's `split` changed, or `--refit`), which fits every head again.
    """
    path = split_path(run)
    given = catalog.get("split")
    step = Step("train", "split", {"test_size": TEST_SIZE, "seed": SEED}, VERSION, {}, (path,),
                Rows(catalog[["image_id", *(["split"] if given is not None else [])]],
                     fit=("split",) if given is not None else ()))

    def build() -> dict[str, Any]:
        strata = None if first is None else target_labels(catalog, first)
        split = make_split(catalog["image_id"], strata, given)
        with atomic(path) as tmp:
            split.to_parquet(tmp, index=False)
        return {"stratified_by": None if first is None else first.name,
                "from_split_column": int(given.notna().sum()) if given is not None else 0,
                "parts": split["part"].value_counts().to_dict()}

    def extend(growth: Growth) -> dict[str, Any]:
        saved = pd.read_parquet(run.verified(path))
        kept = saved[saved["image_id"].astype(str).isin(growth.after)].reset_index(drop=True)
        with atomic(path) as tmp:
            kept.to_parquet(tmp, index=False)
        return {"stratified_by": growth.record.get("stratified_by"),
                "from_split_column": growth.record.get("from_split_column", 0),
                "parts": kept["part"].value_counts().to_dict(),
                "unsplit": int(growth.new.sum())}

    run.step(step, build, extend)
    return pd.read_parquet(run.verified(path))


def target_labels(catalog: pd.DataFrame, target: Target) -> pd.Series:
    """Each painting's label (single-label) or sorted labels joined by `JOIN` (multi-label), NA
    where it has none."""
    return catalog_labels(catalog, target.describe())


def label_sets(labels: Sequence[str]) -> list[list[str]]:
    """The labels of each row of a multi-label split's `label` column."""
    return [str(v).split(JOIN) for v in labels]


def run_split(run: Run, target: str | Target, catalog: pd.DataFrame,
              drop_small_classes: bool = True, first: Target | None = None
              ) -> tuple[pd.DataFrame, dict[str, int]]:
    """The target's labelled paintings with their part of the run's shared split.

    Returns (split, too small): split has image_id, label, part in catalog order; too small maps
    each label with fewer than `MIN_PER_CLASS` paintings (or none to train on) to its count.
    Those are left out with `drop_small_classes`, else a `SmallClasses` error names them.
    """
    target = as_target(target)
    check_targets([target], catalog)
    parts = shared_split(run, catalog, first or target).set_index("image_id")["part"]
    ids = catalog["image_id"].astype(str).to_numpy()
    frame = pd.DataFrame({"image_id": catalog["image_id"].to_numpy(),
                          "label": target_labels(catalog, target).to_numpy(),
                          "part": parts.reindex(ids).to_numpy()})
    # Paintings added since the split was made are in no part: predicted, never trained on.
    frame = frame[frame["label"].notna() & frame["part"].notna()].reset_index(drop=True)
    sets = pd.Series(label_sets(frame["label"]) if target.multi_label
                     else [[v] for v in frame["label"]])
    each = sets.explode()
    counts = each.value_counts()
    trained = each[(frame["part"] != "test").to_numpy()[each.index]].value_counts()
    small = counts[(counts < MIN_PER_CLASS) | (trained.reindex(counts.index).fillna(0) == 0)]
    too_small = {str(k): int(v) for k, v in small.sort_values(kind="stable").items()}
    if too_small and not drop_small_classes:
        shown = ", ".join(f"'{k}' {v}" for k, v in list(too_small.items())[:20])
        raise SmallClasses(
            f"target {target.name}: {len(too_small)} label(s) with fewer than {MIN_PER_CLASS} "
            f"labelled paintings or none to train on ({shown}"
            f"{', ...' if len(too_small) > 20 else ''}); add --drop-small-classes to train on "
            f"the other {len(counts) - len(too_small)}")
    kept = sets.map(lambda labels: [v for v in labels if v not in too_small])
    frame["label"] = pd.array([JOIN.join(v) if v else pd.NA for v in kept], dtype="string")
    frame = frame[frame["label"].notna()].reset_index(drop=True)
    frame["part"] = frame["part"].astype("string")
    return frame, too_small


def make_estimator(kind: str = "logistic") -> Pipeline:
    """The untrained head of one kind ("logistic", "mlp" or "auto"), from this module's
    constants: normalise, standardise, PCA to `DIMS` (`make_reduction`), then the classifier."""
    models = {"logistic": whitened_logistic(C, MAX_ITER, SEED, WHITEN_SHRINK),
              "mlp": MLPHead(MLP_HIDDEN, MLP_ALPHA, MLP_SEEDS, MLP_EPOCHS, MLP_BATCH,
                             MLP_LEARNING_RATE, MLP_VALIDATION, THREADS, SEED)}
    if kind == "auto":
        return make_head(AutoHead(models, MLP_VALIDATION, SEED), DIMS, SEED)
    if kind not in models:
        raise InfluenceError(f"unknown head '{kind}' (heads: {', '.join(HEADS)}, auto)")
    return make_head(models[kind], DIMS, SEED)


def make_multi_label_estimator() -> Pipeline:
    """The untrained multi-label head: the same reduction as `make_estimator`, then one
    class-balanced logistic regression per label (one-vs-rest)."""
    return make_head(OneVsRestClassifier(logistic(C, MAX_ITER, SEED)), DIMS, SEED)


def shared_reduction(run: Run, features: str, catalog: pd.DataFrame,
                     cache: dict[str, Any] | None = None) -> tuple[Pipeline, np.ndarray, float]:
    """The feature set's reduction (`make_reduction`), fitted on the paintings of the run's
    split that are not held out (its training and validation parts, whatever their labels; a
    seeded sample of `TRAIN_MAX` past that), every catalog row through it, and the seconds that
    took. It learns no label, so every target's head starts from the same fit; `cache` (one per
    `train` run) keeps it for the feature set's next head, so the data crosses it once."""
    if cache is not None and features in cache:
        reduction, reduced, _ = cache[features]
        return reduction, reduced, 0.0
    start = time.perf_counter()
    x = run.features(features)
    catalog_ids = pd.Index(catalog["image_id"].astype(str).to_numpy())
    parts = pd.read_parquet(run.verified(split_path(run)))
    kept = parts.loc[parts["part"] != "test", "image_id"].astype(str).to_numpy()
    rows = np.sort(catalog_ids.get_indexer(kept))
    rows = rows[rows >= 0]
    rows = rows[fit_sample(rows, stratify=False)]
    reduction = make_reduction(DIMS, SEED)
    with threadpool_limits(THREADS):
        reduction.fit(np.asarray(x[rows], dtype=np.float32))
        reduced = np.asarray(reduction.transform(np.asarray(x, dtype=np.float32)),
                             dtype=np.float32)
    seconds = time.perf_counter() - start
    if cache is not None:
        cache[features] = (reduction, reduced, seconds)
    return reduction, reduced, seconds


def fit_sample(y: np.ndarray, limit: int | None = None, seed: int = SEED,
               stratify: bool = True) -> np.ndarray:
    """Sorted positions of the rows a head is fitted on: all of y, or a seeded sample of `limit`
    (default `TRAIN_MAX`), stratified by y (every label keeps at least one row) unless not
    asked to."""
    limit = TRAIN_MAX if limit is None else limit
    rows = np.arange(len(y))
    if len(y) <= limit:
        return rows
    keep, _ = train_test_split(rows, train_size=limit, random_state=seed,
                               stratify=y if stratify else None)
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
    paintings are in the training part of the run's split it learnt from. The split is shared,
    so this is 0 unless the split was made again (a changed catalog) after the fine-tuning; a
    non-zero count makes the held-out figures optimistic."""
    seen = {}
    path = split_path(run)
    for other in fine_tuned_on(run.features_info(features)):
        if other != target and path.exists():
            split = pd.read_parquet(path)
            trained = split.loc[split["part"] != "test", "image_id"]
            seen[other] = int(pd.Index(held_out).isin(trained).sum())
    return seen


def head_step(run: Run, target: str | Target, features: str, catalog: pd.DataFrame,
              split: pd.DataFrame, head: str, target_precision: float | None = None) -> Step:
    """The step of one head: the head's parameters, the target's definition and this module's
    constants, the split's and its features' fits, and the rows of the run's split with their
    label (NA where the head has none) and part: a changed label or part of a painting it was
    fitted on fits it again, a painting removed keeps it, and paintings added since the split
    was made are in none of its rows (predicted, not trained on), so they keep it as it is."""
    target = as_target(target)
    chosen = ({"threshold_precision": target_precision} if target.multi_label else {})
    estimator = make_multi_label_estimator() if target.multi_label else make_estimator(head)
    paths = head_paths(run, target.name, features)
    parts = pd.read_parquet(run.verified(split_path(run)))
    label = split.set_index("image_id")["label"].reindex(parts["image_id"].to_numpy())
    rows = pd.DataFrame({"image_id": parts["image_id"].to_numpy(),
                         "label": pd.array(label.to_numpy(), dtype="string"),
                         "part": parts["part"].to_numpy()})
    return estimator_step("train", f"{target.name}/{features}", {"head": estimator},
                          sys.modules[__name__],
                          {"split": run.fit_key("train", "split"),
                           "features": run.fit_key("extract", features)},
                          head_outputs(paths, target.multi_label),
                          {"target": target.describe(), **chosen},
                          rows=Rows(rows, fit=("label", "part")))


def train_head(run: Run, target: str | Target, features: str,
               catalog: pd.DataFrame | None = None, head: str = "auto",
               drop_small_classes: bool = True, target_precision: float | None = None,
               first: Target | None = None, reductions: dict[str, Any] | None = None,
               split: tuple[pd.DataFrame, dict[str, int]] | None = None) -> dict[str, Any]:
    """Bring one head up to date: choose (`head="auto"`), fit, evaluate, write; returns its JSON.
    `reductions`: the feature sets' fitted reductions of this `train` run (`shared_reduction`);
    `split`: the target's `run_split`, where the caller has made it."""
    target = as_target(target)
    if target.multi_label and head == "mlp":
        raise InfluenceError(f"target {target.name} is multi-label: its head is a one-vs-rest "
                             "logistic regression (--head mlp is for single-label targets)")
    catalog = run.catalog() if catalog is None else catalog
    split, dropped = split or run_split(run, target, catalog, drop_small_classes, first)
    paths = head_paths(run, target.name, features)
    n_labels = split["label"].str.split(JOIN).explode().nunique() if len(split) else 0
    if n_labels < 2:
        raise NothingToLearn(f"head {target.name}/{features}: fewer than 2 labels with at least "
                             f"{MIN_PER_CLASS} paintings each; nothing to learn")
    step = head_step(run, target, features, catalog, split, head, target_precision)
    build = (_train_multi if target.multi_label else _train)
    report = run.step(step, lambda: build(run, target, features, catalog, split, dropped, head,
                                          target_precision, reductions),
                      lambda growth: _keep(run, target, features, growth))
    return {**read_json(paths["json"]), "up_to_date": report["up_to_date"]}


def _keep(run: Run, target: Target, features: str, growth: Growth) -> dict[str, Any]:
    """Keep a head whose split lost paintings: the removed ones leave its most confidently
    wrong paintings and its held-out probabilities; its model and held-out figures stay those
    of its fit."""
    paths = head_paths(run, target.name, features)
    wrong = pd.read_csv(run.verified(paths["wrong"]), keep_default_na=False, na_values=[""])
    with atomic(paths["wrong"]) as tmp:
        wrong[wrong["image_id"].astype(str).isin(growth.after)].to_csv(tmp, index=False)
    test = pd.read_parquet(run.verified(paths["test"]))
    with atomic(paths["test"]) as tmp:
        test[test["image_id"].astype(str).isin(growth.after)].to_parquet(tmp, index=False)
    return _recorded(read_json(run.verified(paths["json"])))


def _recorded(info: dict[str, Any]) -> dict[str, Any]:
    """What run.json records of a head, from its JSON."""
    keys = (("head", "accuracy", "macro_f1", "micro_f1", "macro_average_precision", "n_train",
             "n_test", "timings") if info.get("multi_label") else
            ("head", "accuracy", "macro_f1", "top5_accuracy", "ece", "n_train", "n_test",
             "timings"))
    return {k: info[k] for k in keys}


def _common(run: Run, target: Target, features: str, catalog: pd.DataFrame,
            split: pd.DataFrame, dropped: dict, reductions: dict[str, Any] | None
            ) -> tuple[Pipeline, np.ndarray, np.ndarray, float, dict[str, Any]]:
    """(the feature set's fitted reduction, the rows' reduced features, their catalog rows, the
    seconds the reduction took here (0 when an earlier head of the run fitted it), what every
    head's JSON says of its data)."""
    row = pd.Series(np.arange(len(catalog)), index=catalog["image_id"].to_numpy())
    rows = row.loc[split["image_id"].to_numpy()].to_numpy()
    reduction, reduced, reduction_s = shared_reduction(run, features, catalog, reductions)
    z = reduced[rows]
    labelled = target_labels(catalog, target).notna()
    info = {"target": target.name, "features": features, "definition": target.describe(),
            "multi_label": target.multi_label,
            "weights": run.features_info(features).get("weights"),
            "unlabelled": int((~labelled).sum()), "dropped_classes": dropped,
            "min_per_class": MIN_PER_CLASS,
            "split": {"file": split_path(run).name, "test_size": TEST_SIZE, "seed": SEED,
                      "stratified_by": (run.step_record("train", "split") or {})
                      .get("stratified_by"),
                      "parts": {p: int((split["part"] == p).sum()) for p in PARTS}},
            "reduction": {"fitted_on": "the split's training and validation parts (every "
                                       "target's; shared by the feature set's heads)",
                          "components": int(reduction.named_steps["cappedpca"].n_components_)}}
    return reduction, z, rows, reduction_s, info


def _store_test(path: Any, image_ids: Sequence[str], proba: np.ndarray,
                classes: Sequence[str]) -> None:
    """The held-out paintings' probabilities (image_id, one column per label), so anyone can
    recompute every held-out figure."""
    frame = pd.DataFrame(proba.astype(np.float64), columns=list(classes))
    frame.insert(0, "image_id", pd.array(list(image_ids), dtype="string"))
    with atomic(path) as tmp:
        frame.to_parquet(tmp, index=False)


def _train(run: Run, target: Target, features: str, catalog: pd.DataFrame, split: pd.DataFrame,
           dropped: dict, head: str, _precision: float | None,
           reductions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit, evaluate and write one single-label head; returns what run.json records of it."""
    paths = head_paths(run, target.name, features)
    reduction, x, rows, reduction_s, common = _common(run, target, features, catalog, split,
                                                      dropped, reductions)
    part = split["part"].to_numpy(dtype=object)
    train, test = part != "test", part == "test"
    labels = split["label"].to_numpy(dtype=object)
    n_train_part = int(train.sum())
    sampled = np.flatnonzero(train)[fit_sample(labels[train])]
    train = np.zeros(len(split), dtype=bool)
    train[sampled] = True
    validation = part[train] == "validation"
    fit_params = ({"autohead__validation": validation}
                  if head == "auto" and validation.any() and not validation.all() else {})
    start = time.perf_counter()
    model = make_estimator(head)
    with threadpool_limits(THREADS):
        converged = fit_quietly(model, x[train], labels[train], reduction, **fit_params)
    fit_s = time.perf_counter() - start
    final = model[-1]
    kind, chosen_on = ((final.kind_, final.validation_accuracy_) if head == "auto"
                       else (head, {}))
    classes = [str(c) for c in model.classes_]
    proba = model[len(reduction.steps):].predict_proba(x[test])
    metrics, per_class, matrix = evaluate(labels[test], proba, classes)
    seen = seen_in_fine_tuning(run, features, target.name, split.loc[test, "image_id"])
    for other, count in seen.items():
        if count:
            print(f"note: head {target.name}/{features}: {count} of {int(test.sum())} held-out "
                  f"paintings were training pictures of the {other} fine-tuning; its held-out "
                  f"figures are optimistic", file=sys.stderr)
    n_train = pd.Series(labels[train]).value_counts()
    per_class["n_train"] = per_class["label"].map(n_train).fillna(0).astype(int)

    with atomic(paths["model"]) as tmp:
        joblib.dump({"pipeline": model, "classes": classes, "target": target.name,
                     "features": features, "multi_label": False}, tmp)
    with atomic(paths["per_class"]) as tmp:
        per_class.to_csv(tmp, index=False)
    with atomic(paths["confusion"]) as tmp:
        matrix.to_csv(tmp)
    draw_confusion(matrix, f"{target.name} from {features} features (held-out part)",
                   paths["picture"])
    with atomic(paths["wrong"]) as tmp:
        _wrong(catalog, rows[test], labels[test], proba, classes, target.name).to_csv(
            tmp, index=False)
    _store_test(paths["test"], split.loc[test, "image_id"], proba, classes)
    info = {**common, **metrics,
            "n_train": int(train.sum()), "train_part": n_train_part, "classes": classes,
            "seen_in_fine_tuning": seen,
            "head": kind, "head_choice": {"asked": head, "validation_accuracy": chosen_on,
                                          "validation": ("the split's validation part"
                                                         if fit_params else
                                                         "a seeded, stratified slice of the "
                                                         "training part"),
                                          "validation_size": MLP_VALIDATION},
            "test_predictions": paths["test"].name,
            "model": repr(model), "converged": converged,
            "components": common["reduction"]["components"],
            "timings": {"fit_s": round(fit_s, 3), "reduction_s": round(reduction_s, 3)},
            "versions": versions()}
    write_json(paths["json"], info)
    return _recorded(info)


def choose_threshold(truth: np.ndarray, proba: np.ndarray,
                     target_precision: float | None = None) -> float:
    """A label's threshold from validation rows: the one with the best F1, or with a target
    precision the lowest that reaches it (the most recall); if none does, the most precise.
    `DEFAULT_THRESHOLD` when the rows hold no positive."""
    if not truth.any():
        return DEFAULT_THRESHOLD
    precision, recall, thresholds = precision_recall_curve(truth, proba)
    precision, recall = precision[:-1], recall[:-1]
    if target_precision is None:
        f1 = np.divide(2 * precision * recall, precision + recall,
                       out=np.zeros_like(precision), where=precision + recall > 0)
        return float(thresholds[int(np.argmax(f1))])
    reached = np.flatnonzero(precision >= target_precision)
    return float(thresholds[reached[0] if len(reached) else int(np.argmax(precision))])


def pr_curve(truth: np.ndarray, proba: np.ndarray, points: int = PR_POINTS
             ) -> dict[str, list[float]] | None:
    """A label's held-out precision-recall curve at most `points` thresholds (evenly spaced
    along it, both ends kept); None when the part holds no positive."""
    if not truth.any():
        return None
    precision, recall, thresholds = precision_recall_curve(truth, proba)
    keep = np.unique(np.linspace(0, len(thresholds) - 1, min(points, len(thresholds)))
                     .round().astype(int))
    return {"threshold": thresholds[keep].round(5).tolist(),
            "precision": precision[keep].round(4).tolist(),
            "recall": recall[keep].round(4).tolist()}


def evaluate_multi_label(truth: np.ndarray, proba: np.ndarray, thresholds: np.ndarray,
                         labels: Sequence[str]) -> tuple[dict[str, Any], pd.DataFrame]:
    """Held-out metrics of a multi-label head at its thresholds, all by scikit-learn: (overall,
    per-label table with precision, recall, F1, average precision, support)."""
    predicted = proba >= thresholds
    p, r, f, support = precision_recall_fscore_support(truth, predicted, average=None,
                                                       zero_division=0)
    ap = [float(average_precision_score(truth[:, j], proba[:, j])) if truth[:, j].any()
          else None for j in range(len(labels))]
    per_label = pd.DataFrame({"label": list(labels), "threshold": thresholds, "precision": p,
                              "recall": r, "f1": f, "average_precision": ap,
                              "support": support})
    overall: dict[str, Any] = {"subset_accuracy": float(accuracy_score(truth, predicted))}
    for average in ("micro", "macro"):
        pa, ra, fa, _ = precision_recall_fscore_support(truth, predicted, average=average,
                                                        zero_division=0)
        overall.update({f"{average}_precision": float(pa), f"{average}_recall": float(ra),
                        f"{average}_f1": float(fa)})
    scored = [v for v in ap if v is not None]
    overall["macro_average_precision"] = float(np.mean(scored)) if scored else None
    overall["n_test"] = len(truth)
    return overall, per_label


def _train_multi(run: Run, target: Target, features: str, catalog: pd.DataFrame,
                 split: pd.DataFrame, dropped: dict, head: str,
                 target_precision: float | None,
                 reductions: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fit one-vs-rest heads on the training part, choose each label's threshold on the
    validation part, judge on the held-out part, write; returns what run.json records."""
    paths = head_paths(run, target.name, features)
    reduction, x, rows, reduction_s, common = _common(run, target, features, catalog, split,
                                                      dropped, reductions)
    binarizer = MultiLabelBinarizer()
    y = binarizer.fit_transform(label_sets(split["label"]))
    labels = [str(c) for c in binarizer.classes_]
    part = split["part"].to_numpy(dtype=object)
    test = np.flatnonzero(part == "test")
    validation = np.flatnonzero(part == "validation")
    train = np.flatnonzero(part == "train")
    given = len(validation) > 0
    if not given:
        train, validation = train_test_split(train, test_size=VALIDATION_SIZE,
                                             random_state=SEED)
        train, validation = np.sort(train), np.sort(validation)
    train = train[fit_sample(y[train], stratify=False)]
    start = time.perf_counter()
    model = make_multi_label_estimator()
    with threadpool_limits(THREADS):
        converged = fit_quietly(model, x[train], y[train], reduction)
    fit_s = time.perf_counter() - start
    after = model[len(reduction.steps):]
    thresholds = np.array([choose_threshold(y[validation, j], p, target_precision)
                           for j, p in enumerate(after.predict_proba(x[validation]).T)])
    proba = after.predict_proba(x[test])
    overall, per_label = evaluate_multi_label(y[test], proba, thresholds, labels)
    per_label["n_train"] = y[train].sum(axis=0)
    per_label["n_validation"] = y[validation].sum(axis=0)
    counts = multilabel_confusion_matrix(y[test], proba >= thresholds)
    confusion = pd.DataFrame({"label": labels, "tn": counts[:, 0, 0], "fp": counts[:, 0, 1],
                              "fn": counts[:, 1, 0], "tp": counts[:, 1, 1]})

    with atomic(paths["model"]) as tmp:
        joblib.dump({"pipeline": model, "classes": labels, "target": target.name,
                     "features": features, "multi_label": True,
                     "thresholds": thresholds.tolist()}, tmp)
    with atomic(paths["per_class"]) as tmp:
        per_label.to_csv(tmp, index=False)
    with atomic(paths["confusion"]) as tmp:
        confusion.to_csv(tmp, index=False)
    with atomic(paths["wrong"]) as tmp:
        _wrong_multi(catalog, rows[test], y[test], proba, thresholds, labels,
                     target.name).to_csv(tmp, index=False)
    _store_test(paths["test"], split["image_id"].iloc[test], proba, labels)
    rule = ("the best F1 on the validation part" if target_precision is None else
            f"the lowest reaching precision {target_precision} on the validation part "
            "(else the most precise)")
    info = {**common, **overall, "accuracy": overall["subset_accuracy"],
            "top5_accuracy": None, "ece": None,
            "n_train": len(train), "n_validation": len(validation), "classes": labels,
            "thresholds": dict(zip(labels, thresholds.tolist(), strict=True)),
            "threshold_rule": rule, "target_precision": target_precision,
            "validation": ("the split's validation part" if given else
                           f"a seeded {VALIDATION_SIZE:.0%} of the training part"),
            "per_label": per_label.replace({np.nan: None}).to_dict("records"),
            "pr_curves": {label: pr_curve(y[test, j], proba[:, j])
                          for j, label in enumerate(labels)},
            "pr_curve_part": "test", "test_predictions": paths["test"].name,
            "head": "one-vs-rest logistic", "head_choice": {"asked": head},
            "model": repr(model), "converged": converged,
            "components": common["reduction"]["components"],
            "timings": {"fit_s": round(fit_s, 3), "reduction_s": round(reduction_s, 3)},
            "versions": versions()}
    write_json(paths["json"], info)
    return _recorded(info)


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


def _wrong_multi(catalog: pd.DataFrame, rows: np.ndarray, truth: np.ndarray, proba: np.ndarray,
                 thresholds: np.ndarray, labels: list[str], target: str) -> pd.DataFrame:
    """The held-out paintings a multi-label head got wrong with the most confidence: each
    painting's worst label decision (a label predicted that it does not have, by its
    probability; one it has but not predicted, by one minus it), most confident first."""
    predicted = proba >= thresholds
    confidence = np.where(truth.astype(bool) & ~predicted, 1 - proba,
                          np.where(~truth.astype(bool) & predicted, proba, -1.0))
    worst = confidence.argmax(axis=1)
    sure = confidence[np.arange(len(worst)), worst]
    wrong = np.flatnonzero(sure >= 0)
    order = wrong[np.argsort(-sure[wrong], kind="stable")][:WRONG_ROWS]
    meta = catalog.iloc[rows[order]]
    names = np.asarray(labels, dtype=object)

    def joined(mask: np.ndarray) -> list[str]:
        return [f"{LABEL_SEPARATOR} ".join(names[m]) for m in mask]

    label = names[worst[order]]
    return pd.DataFrame({"image_id": meta["image_id"].to_numpy(), "file": meta["file"].to_numpy(),
                         "title": meta["title"].to_numpy(), "artist": meta["artist"].to_numpy(),
                         f"true_{target}": joined(truth[order].astype(bool)),
                         "predicted": joined(predicted[order]), "label": label,
                         "mistake": np.where(truth[order, worst[order]].astype(bool),
                                             "missed", "wrongly predicted"),
                         "p": proba[order, worst[order]].round(4),
                         "threshold": thresholds[worst[order]].round(4),
                         "confidence": sure[order].round(4)})


def train_heads(run: Run, targets: Sequence[str | Target], features: Sequence[str],
                progress: bool = True, head: str = "auto", drop_small_classes: bool = False,
                target_precision: float | None = None) -> list[dict[str, Any]]:
    """`train` stage: one head per (target, feature set), each kept if up to date.

    Every target is checked first (its columns, its labels too small to learn), so a mistake is
    told before any head is fitted."""
    if head not in (*HEADS, "auto"):
        raise InfluenceError(f"unknown head '{head}' (heads: {', '.join(HEADS)}, auto)")
    if target_precision is not None and not 0 < target_precision <= 1:
        raise InfluenceError(f"--target-precision must be in (0, 1], got {target_precision}")
    targets = [as_target(t) for t in targets]
    catalog = run.catalog()
    check_targets(targets, catalog)
    first = targets[0] if targets else None
    splits = {t.name: run_split(run, t, catalog, drop_small_classes, first) for t in targets}
    jobs = [(t, f) for f in features for t in targets]
    out, skipped = [], []
    reductions: dict[str, Any] = {}
    for target, name in tqdm(jobs, desc="train", unit="head", disable=not progress):
        reductions = {k: v for k, v in reductions.items() if k == name}
        try:
            out.append(train_head(run, target, name, catalog, head, drop_small_classes,
                                  target_precision, first, reductions, splits[target.name]))
        except NothingToLearn as e:
            skipped.append(str(e))
    if not out and skipped:
        raise InfluenceError(skipped[0])
    for reason in dict.fromkeys(skipped):
        print(f"note: skipped {reason}", file=sys.stderr)
    return out


class SmallClasses(InfluenceError):
    """A target with labels too small to learn, and no leave to train on the rest."""


class NothingToLearn(InfluenceError):
    """A head whose target has too few labelled paintings: skipped when others can be trained."""
