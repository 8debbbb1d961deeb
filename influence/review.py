"""The cataloguer's review: near-duplicates, labels the pictures argue against, and outliers.

Real catalogues hold the same painting scanned twice under two records, attributions the
picture argues against, and records whose image is no painting at all. The stage (`review`)
lists each for a person to check, most likely first, from one indexed feature set:

1. **Neighbours.** Every painting's `POOL` nearest paintings (itself left out), the first of
   those the index's neighbour table holds (`index.load_neighbours`); all three lists read
   that pool, so the stage scales like `index` does and searches nothing itself.

2. **Duplicates.** A pair is a candidate when one is among the other's neighbours at least as
   alike as the `CANDIDATE_QUANTILE` of all the pool's similarities (a share, not a cosine, so
   one rule holds for every feature set: a whitened set's copies are 0.45-0.9 alike, a single
   network's 0.8-0.99). It is a duplicate when the pictures' perceptual hashes (imagehash's
   pHash, 64 bits, of the run's thumbnail; the smallest distance with either one mirrored)
   differ in at most `HASH_MAX` bits (`HASH_MAX_CLOSE` for a pair within `CLOSE_RATIO` of the
   candidates' distance from identical): a re-encoded, resized, slightly cropped, mirrored or
   recoloured copy keeps its hash, another painting of the same subject does not. Pictures too
   plain to hash (blank scans, flat colour fields) are no one's duplicate. Each pair says which
   of `CONFLICT_FIELDS` its records disagree on; conflicts first, then by similarity.

3. **Labels.** Views: the reviewed set and, for a combined set, each of its parts (each
   network's own features, `head_views`); one reduction per view shared by every target
   (L2-normalised rows, PCA to `HEAD_DIMS`, fitted without labels). For each target with a
   trained head, out-of-fold log-probabilities over the whole collection (scikit-learn's
   `cross_val_predict`, `FOLDS` stratified folds: a painting's own label is never used to
   predict it) from a shrunk linear discriminant (`review_head`) on each view, their mean made
   a distribution again (the heads' geometric mean, `combine_views`). Up to five pieces of
   evidence per recorded label: its out-of-fold log-probability; that less its nearest
   paintings' for their own labels (`log_p_vs_nearest`); for targets of at least
   `PROFILE_MIN_LABELS` labels, how alike the painting's probabilities are to those of the
   label's other paintings (an artist of varied works spreads all of them over the same similar
   artists; a painting filed under the wrong one spreads over others); its neighbour evidence
   (`neighbour_evidence`, from the reviewed set's neighbours); and for an artist, how likely
   the style heads find the picture in the styles the artist's other paintings are recorded in
   (`context_agreement`, `CONTEXT`). Their mean rank ranks the recorded labels, lowest
   first; cleanlab's confident-learning filter says which are likely issues. Labels with
   fewer than `MIN_LABEL` paintings are left out (counted in review.json). Each row also
   keeps how many of its `AGREEMENT_K` nearest paintings share the recorded label, and the
   closest painting with the recorded and with the suggested label.

4. **Outliers.** A painting is unusual when few paintings resemble it: its score is one minus its
   similarity to its `OUTLIER_K`-th nearest painting, so a small group of like things (a batch of
   blank scans) stays unusual; the reason gives that similarity against the collection's median.

Paintings added to a reviewed run extend it (`Run.step`'s extend, up to `REFIT_SHARE`): the
index's neighbour table has grown with them (`index.grow_table`); only their images are
hashed, with the fit's thresholds; their labels are scored by the heads fitted on every
scored painting (which never saw them: out of sample), the others keep their out-of-fold
probabilities; every ranking and the outliers are recomputed over all paintings.

`build_review` runs it and writes `RUN/review/`; `load_review` reads it back.
"""

from __future__ import annotations

import functools
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy.special import log_softmax
from scipy.stats import rankdata
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.covariance import ledoit_wolf
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer
from sklearn.utils.validation import check_array, check_is_fitted
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from influence.estimators.heads import CappedPCA
from influence.runs import (
    Growth,
    InfluenceError,
    Rows,
    Run,
    atomic,
    column_fingerprints,
    estimator_step,
    read_json,
    versions,
    write_json,
)

__all__ = ["Review", "build_review", "load_review", "review_dir", "review_head"]

#: Nearest paintings per painting (itself left out) the lists read from the index's table.
POOL = 50
#: Duplicate candidates are the pairs of neighbours at least as alike as this quantile of all
#: the pool's similarities (a share, not a cosine: one rule for every feature set, and 300
#: duplicates among 7,000 paintings move it by 0.02); a pair is close when its distance from
#: identical (1 - similarity) is at most `CLOSE_RATIO` of the candidates'.
CANDIDATE_QUANTILE = 0.995
CLOSE_RATIO = 0.6
#: Largest pHash distance (bits of 64) of a duplicate; up to `HASH_MAX_CLOSE` for a close pair
#: (a harder crop or recolouring moves more bits).
HASH_MAX = 10
HASH_MAX_CLOSE = 16
#: Side of the image a hash is computed from (decoded at about this size: fast).
HASH_DECODE = 128
#: Grey-level standard deviation (0-255) under which a picture is too plain to hash: blank
#: scans and flat colour fields all hash alike, so they are no one's duplicate by hash.
PLAIN_STD = 6.0
#: Record fields two duplicates are compared on.
CONFLICT_FIELDS = ("artist", "title", "year", "style")
#: Out-of-fold probabilities: folds, seed, the shared reduction's dimensions, and the fewest
#: paintings a label needs to be scored (as the heads' `--drop-small-classes`).
FOLDS = 3
SEED = 0
HEAD_DIMS = 128
MIN_LABEL = 5
#: Targets with at least this many labels add the profile evidence (with a few labels every
#: label's profile is spread alike and says little: on styles it lowered the ranking).
PROFILE_MIN_LABELS = 20
#: A target checked against a coarser one its labels fall within: an artist's recorded works
#: keep to a few styles, so a picture that looks like none of its artist's styles argues
#: against the artist (the style heads learn from about 900 paintings a label, the artist heads
#: from about 40). Genre and nationality lowered the artist ranking in the probes.
CONTEXT = {"artist": "style"}
#: Paintings added to each coarse label's count of a label's other works (additive smoothing).
CONTEXT_PRIOR = 0.5
#: Nearest paintings whose recorded labels' log-probabilities a painting's own is measured
#: against (`log_p_vs_nearest`).
NEAREST_K = 5
#: Nearest paintings whose labels are compared with the recorded one.
AGREEMENT_K = 10
#: Neighbour evidence for a label: the mean similarity of the painting's `EVIDENCE_TOP` most
#: alike paintings with that label (for its own label over all of the label's paintings; for the
#: others in its pool, the pool's last similarity standing in beyond it), made a share of all
#: labels by a softmax at `EVIDENCE_TEMPERATURE`.
EVIDENCE_TOP = 2
EVIDENCE_TEMPERATURE = 0.05
#: Paintings of one label a painting is compared with for its own label's evidence (seeded).
EVIDENCE_SAMPLE = 4000
#: The neighbour whose similarity makes a painting's outlier score.
OUTLIER_K = 20
#: Version of this stage's recipe: bump it when a code change changes its tables.
VERSION = "7"
TABLES = ("duplicates", "labels", "outliers")


def review_dir(run: Run) -> Path:
    return run.root / "review"


def review_paths(run: Run) -> dict[str, Path]:
    out = review_dir(run)
    return {**{t: out / f"{t}.parquet" for t in TABLES}, "summary": out / "review.json",
            "hashes": out / "hashes.parquet",
            "models": out / "labels.joblib"}


def reduction() -> Pipeline:
    """The reduction every target's head shares: normalise, PCA (to at most what the rows allow);
    fitted without labels."""
    return make_pipeline(Normalizer(), CappedPCA(HEAD_DIMS, svd_solver="covariance_eigh",
                                                 random_state=SEED))


class PooledDiscriminant(ClassifierMixin, BaseEstimator):
    """A linear discriminant with one within-class covariance pooled over every label and shrunk
    by Ledoit-Wolf: a closed-form fit in one pass (scikit-learn's `LinearDiscriminantAnalysis`
    shrinks each label's covariance apart, 180 small fits per head and ten times the time)."""

    def fit(self, X: np.ndarray, y: np.ndarray) -> PooledDiscriminant:
        X = check_array(X, dtype=np.float64)
        self.classes_, codes = np.unique(y, return_inverse=True)
        counts = np.bincount(codes)
        means = np.zeros((len(counts), X.shape[1]))
        np.add.at(means, codes, X)
        means /= counts[:, None]
        covariance, self.shrinkage_ = ledoit_wolf(X - means[codes], assume_centered=True)
        self.coef_ = np.linalg.solve(covariance, means.T).T
        self.intercept_ = -0.5 * (means * self.coef_).sum(axis=1) + np.log(counts / len(X))
        return self

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        """Each label's log-likelihood up to a constant of the row: one column per label."""
        check_is_fitted(self)
        return check_array(X, dtype=np.float64) @ self.coef_.T + self.intercept_

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.exp(log_softmax(self.decision_function(X), axis=1))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(axis=1)]


def review_head() -> PooledDiscriminant:
    """The head of the out-of-fold probabilities: a pooled, shrunk linear discriminant (closed
    form; on artists its out-of-fold accuracy was 0.41, a logistic head's 0.34 in ten times the
    time)."""
    return PooledDiscriminant()


# ------------------------------------------------------------------------------------ duplicates
def image_hashes(path: Path) -> tuple[int, int] | None:
    """pHash of an image and of its mirror as 64-bit integers, decoded small (JPEG draft mode)
    and shrunk once to the 32-pixel grey square pHash reads (it would shrink each copy again);
    None for a picture too plain to hash (see `PLAIN_STD`)."""
    import imagehash
    from PIL import Image, ImageOps, ImageStat

    with Image.open(path) as img:
        img.draft("RGB", (HASH_DECODE, HASH_DECODE))
        grey = img.convert("L")
    if ImageStat.Stat(grey).stddev[0] < PLAIN_STD:
        return None
    side = 8 * 4  # imagehash.phash's hash_size * highfreq_factor
    grey = grey.resize((side, side), Image.Resampling.LANCZOS)
    return (int(str(imagehash.phash(grey)), 16),
            int(str(imagehash.phash(ImageOps.mirror(grey))), 16))


def hash_table(ids: np.ndarray, image_path: Callable[[int], Path], rows: np.ndarray,
               known: pd.DataFrame | None = None, progress: bool = True) -> pd.DataFrame:
    """Hashes (`image_id`, `phash`, `mirror`; -1 for a plain or unreadable picture) of the given
    catalog rows, those in `known` taken from it."""
    have = {} if known is None else dict(zip(known["image_id"], zip(
        known["phash"], known["mirror"], strict=True), strict=True))
    out = []
    for row in tqdm(rows, desc="review: hashes", unit="img", disable=not progress):
        image_id = str(ids[row])
        if image_id not in have:
            try:
                found = image_hashes(image_path(int(row)))
            except OSError:
                found = None
            have[image_id] = tuple(np.array(found, dtype=np.uint64).view(np.int64)) \
                if found is not None else (-1, -1)
        out.append((image_id, *have[image_id]))
    return pd.DataFrame(out, columns=["image_id", "phash", "mirror"]).astype(
        {"image_id": "string", "phash": np.int64, "mirror": np.int64})


def duplicate_thresholds(sims: np.ndarray) -> dict[str, float]:
    """The candidate and close similarities of a pool (see `CANDIDATE_QUANTILE`)."""
    found = sims[sims > -1]
    if not len(found):
        return {"candidate": 1.0, "close": 1.0}
    candidate = float(np.quantile(found, CANDIDATE_QUANTILE))
    return {"candidate": round(candidate, 4), "close": round(1 - (1 - candidate) * CLOSE_RATIO, 4)}


def _same(a: Any, b: Any) -> bool:
    """Whether two record values agree; a missing value agrees with anything."""
    if pd.isna(a) or pd.isna(b):
        return True
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.casefold().split()) == " ".join(b.casefold().split())
    return a == b


def find_duplicates(catalog: pd.DataFrame, sims: np.ndarray, rows: np.ndarray,
                    image_path: Callable[[int], Path], thresholds: dict[str, float],
                    known: pd.DataFrame | None = None, progress: bool = True
                    ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pairs of rows that show the same picture, with their evidence and conflicting fields,
    and the hashes of every candidate (`known` ones are not hashed again)."""
    a, k = np.nonzero((sims >= thresholds["candidate"]) & (rows >= 0))
    b = rows[a, k]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = pd.DataFrame({"a": lo, "b": hi, "similarity": sims[a, k]})
    pairs = pairs.groupby(["a", "b"], as_index=False)["similarity"].max()
    ids = catalog["image_id"].astype(str).to_numpy(dtype=object)
    hashes = hash_table(ids, image_path, np.unique(pairs[["a", "b"]].to_numpy()), known,
                        progress)
    by_id = hashes.set_index("image_id")
    ha = by_id.reindex(ids[pairs["a"]]).to_numpy(np.int64)
    hb = by_id.reindex(ids[pairs["b"]]).to_numpy(np.int64)
    plain = (ha[:, 0] == -1) | (hb[:, 0] == -1)
    # Unsigned: numpy counts the bits of a signed integer's absolute value.
    ha, hb = ha.view(np.uint64), hb.view(np.uint64)
    # A mirror's hash is not exactly the mirrored hash: either picture may be the mirrored one.
    distance = np.minimum.reduce([np.bitwise_count(ha[:, 0] ^ hb[:, 0]),
                                  np.bitwise_count(ha[:, 0] ^ hb[:, 1]),
                                  np.bitwise_count(ha[:, 1] ^ hb[:, 0])])
    pairs["phash_distance"] = np.where(plain, 64, distance).astype(np.int16)
    same = (pairs["phash_distance"] <= HASH_MAX) | (
        (pairs["phash_distance"] <= HASH_MAX_CLOSE) & (pairs["similarity"] >= thresholds["close"]))
    pairs = pairs[same].reset_index(drop=True)
    fields = [f for f in CONFLICT_FIELDS if f in catalog]
    values = {f: catalog[f].to_numpy(dtype=object) for f in fields}
    conflicts = [[f for f in fields if not _same(values[f][a], values[f][b])]
                 for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    out = pd.DataFrame({
        "image_id_a": pd.array(ids[pairs["a"]], dtype="string"),
        "image_id_b": pd.array(ids[pairs["b"]], dtype="string"),
        "similarity": pairs["similarity"].round(4).astype(np.float32),
        "phash_distance": pairs["phash_distance"],
        "conflict": [bool(c) for c in conflicts],
        "conflicts": conflicts,
        **{f"{f}_a": catalog[f].to_numpy()[pairs["a"]] for f in fields},
        **{f"{f}_b": catalog[f].to_numpy()[pairs["b"]] for f in fields},
    })
    return out.sort_values(["conflict", "similarity", "phash_distance"],
                           ascending=[False, False, True], kind="stable").reset_index(drop=True), \
        hashes


# ---------------------------------------------------------------------------------------- labels
def log_proba(model: PooledDiscriminant, z: np.ndarray) -> np.ndarray:
    """Log-probabilities of each class from a fitted head's decision function (not clipped at
    the float's smallest probability, so rows far from a label stay ordered)."""
    return _log_softmax(model.decision_function(z))


def _log_softmax(decision: np.ndarray) -> np.ndarray:
    decision = np.asarray(decision, dtype=np.float64)
    if decision.ndim == 1:  # two labels: one decision, for the second
        decision = np.stack([np.zeros_like(decision), decision], axis=1)
    return log_softmax(decision, axis=1).astype(np.float32)


def out_of_fold(x: np.ndarray, labels: np.ndarray, cv: Any = None) -> np.ndarray:
    """Log-probabilities of each class (sorted codes) for every row, from a head fitted on the
    other folds only (default: `FOLDS` stratified, seeded folds)."""
    cv = cv if cv is not None else StratifiedKFold(FOLDS, shuffle=True, random_state=SEED)
    # One BLAS thread: on the loaded 2-core machine BLAS's own threads cost more than they gave.
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", UserWarning)
        decision = cross_val_predict(review_head(), x, labels, cv=cv,
                                     method="decision_function")
    return _log_softmax(decision)


@dataclass
class Scored:
    """One target's scored paintings: catalog rows, label codes, out-of-fold log-probabilities
    and the sorted labels the codes index."""

    use: np.ndarray
    y: np.ndarray
    log_p: np.ndarray
    classes: np.ndarray


def target_labels(catalog: pd.DataFrame, target: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(catalog rows scored, their labels, counts for review.json) of one target: labels seen at
    least `MIN_LABEL` times."""
    recorded = catalog[target].astype("string")
    counts = recorded.value_counts()
    kept = counts[counts >= MIN_LABEL].index
    use = np.flatnonzero(recorded.isin(kept).fillna(False).to_numpy())
    info = {"target": target, "scored": int(len(use)), "classes": int(len(kept)),
            "left_out_unlabelled": int(recorded.isna().sum()),
            "left_out_rare": int(recorded.notna().sum() - len(use))}
    return use, recorded.to_numpy(dtype=object, na_value=None)[use], info


def profile_agreement(log_p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosine between each row's probabilities and the mean probabilities of the other rows with
    its label: whether it is confused with the labels its label's paintings are confused with."""
    p = np.exp(log_p.astype(np.float64))
    k = p.shape[1]
    total = np.zeros((k, k))
    np.add.at(total, y, p)
    n = np.bincount(y, minlength=k)
    others = (total[y] - p) / np.maximum(n[y] - 1, 1)[:, None]
    norm = np.linalg.norm(p, axis=1) * np.linalg.norm(others, axis=1)
    return (p * others).sum(axis=1) / np.maximum(norm, 1e-12)


def own_label_similarity(x: np.ndarray, use: np.ndarray, own: np.ndarray, codes: np.ndarray,
                         sims: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Each scored row's (`use`: their rows of `x`) mean cosine similarity to its `EVIDENCE_TOP`
    most alike other scored rows with the same label code: from its pool (`codes`, `sims`, best
    first) where the pool holds that many, else over all of them (at most `EVIDENCE_SAMPLE`
    seeded ones per label)."""
    from influence.index import normalise

    hit = (codes == own[:, None]) & (sims > -1)
    first = hit & (np.cumsum(hit, axis=1) <= EVIDENCE_TOP)
    out = (np.where(first, sims, 0.0).sum(axis=1) / EVIDENCE_TOP).astype(np.float64)
    short = first.sum(axis=1) < EVIDENCE_TOP
    rng = np.random.default_rng(seed)
    for label in np.unique(own[short]):
        members = np.flatnonzero(own == label)
        pool = members if len(members) <= EVIDENCE_SAMPLE else np.sort(
            rng.choice(members, EVIDENCE_SAMPLE, replace=False))
        others = normalise(x[use[pool]])
        asked = members[short[members]]
        for lo in range(0, len(asked), 2048):
            rows = asked[lo:lo + 2048]
            s = normalise(x[use[rows]]) @ others.T
            s[rows[:, None] == pool[None, :]] = -np.inf
            top = min(EVIDENCE_TOP, max(len(pool) - 1, 1))
            best = -np.partition(-s, top - 1, axis=1)[:, :top]
            out[rows] = np.where(np.isfinite(best), best, -1.0).mean(axis=1)
    return out


def neighbour_evidence(codes: np.ndarray, sims: np.ndarray, own: np.ndarray,
                       own_similarity: np.ndarray, n_labels: int) -> np.ndarray:
    """Each row's share of the neighbour evidence that goes to its own label (see EVIDENCE_TOP):
    its own label's from `own_similarity` (over all its label's paintings), the others' from the
    pool (`codes`: the pool's label codes, -1 for none; `sims`: their similarities, best first),
    with the pool's last similarity for labels beyond it."""
    n = len(codes)
    valid = sims > -1
    floor = np.where(valid.any(axis=1), np.where(valid, sims, np.inf).min(axis=1), -1.0)
    q, j = np.nonzero(valid & (codes >= 0) & (codes != own[:, None]))
    key = q.astype(np.int64) * n_labels + codes[q, j]
    # Each (row, label)'s first EVIDENCE_TOP places in the pool (pools are sorted best first).
    first = pd.Series(key).groupby(key).cumcount().to_numpy() < EVIDENCE_TOP
    key, s = key[first], sims[q[first], j[first]].astype(np.float64)
    pairs, inverse = np.unique(key, return_inverse=True)
    row = pairs // n_labels
    score = (np.bincount(inverse, s) + (EVIDENCE_TOP - np.bincount(inverse)) * floor[row]) \
        / EVIDENCE_TOP
    best = np.full(n, -np.inf)
    np.maximum.at(best, row, score)
    top = np.maximum(np.maximum(best, floor), own_similarity)
    weight = np.bincount(row, np.exp((score - top[row]) / EVIDENCE_TEMPERATURE), n)
    weight += (n_labels - 1 - np.bincount(row, minlength=n)) * np.exp(
        (floor - top) / EVIDENCE_TEMPERATURE)
    mine = np.exp((own_similarity - top) / EVIDENCE_TEMPERATURE)
    return mine / (mine + weight)


def log_p_vs_nearest(recorded: np.ndarray, near_rows: np.ndarray, use: np.ndarray, n: int
                     ) -> np.ndarray:
    """Each scored painting's out-of-fold log-probability of its recorded label (`recorded`)
    less the mean of its `NEAREST_K` nearest scored paintings' for theirs (`near_rows`: its
    pool's catalog rows, -1 for none; `use`: the scored rows of `n`). Works whose look-alikes
    the heads also find hard to attribute (drawings among drawings, prints) are not blamed for
    it; a wrong label among well-attributed look-alikes stands out."""
    position = np.full(n, -1, dtype=np.int64)
    position[use] = np.arange(len(use))
    near = near_rows[:, :NEAREST_K]
    near = np.where(near >= 0, position[np.maximum(near, 0)], -1)
    found = near >= 0
    total = np.where(found, recorded[np.maximum(near, 0)], 0.0).sum(axis=1)
    mean = np.where(found.any(axis=1), total / np.maximum(found.sum(axis=1), 1),
                    recorded.mean())
    return recorded - mean


def context_agreement(n: int, scored: Scored, context: Scored) -> np.ndarray:
    """How well each of a target's scored paintings (of `n` catalog rows) looks like the labels
    of a coarser target (scored as `context`) recorded for its label's other paintings: the log
    of the sum over coarse labels of its out-of-fold probability times their share of those
    paintings (smoothed by `CONTEXT_PRIOR`). A painting the coarse heads did not score counts
    with their mean probabilities."""
    k = len(context.classes)
    proba = np.empty((n, k))
    proba[:] = np.exp(context.log_p.astype(np.float64)).mean(axis=0)
    proba[context.use] = np.exp(context.log_p)
    coarse = np.full(n, -1, dtype=np.int64)
    coarse[context.use] = context.y
    coarse = coarse[scored.use]
    counts = np.zeros((len(scored.classes), k))
    has = coarse >= 0
    np.add.at(counts, (scored.y[has], coarse[has]), 1.0)
    others = counts[scored.y]
    others[has, coarse[has]] -= 1.0
    share = (others + CONTEXT_PRIOR) / (others.sum(axis=1, keepdims=True) + CONTEXT_PRIOR * k)
    return np.log((proba[scored.use] * share).sum(axis=1))


def label_table(catalog: pd.DataFrame, target: str, scored: Scored, x: np.ndarray,
                sims: np.ndarray, rows: np.ndarray, context: tuple[str, Scored] | None = None
                ) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One target's recorded labels ranked by how much the pictures argue against them
    (`context`: a coarser target's name and scores, see `CONTEXT`)."""
    from cleanlab.filter import find_label_issues

    use, y, log_p, classes = scored.use, scored.y, scored.log_p, scored.classes
    code = {c: i for i, c in enumerate(classes)}
    proba = np.exp(log_p.astype(np.float64))
    proba /= proba.sum(axis=1, keepdims=True)
    # One process: cleanlab's pool loses its globals under a fork server, and 2 cores gain little.
    issue = find_label_issues(y, proba, n_jobs=1) if len(classes) > 1 else np.zeros(len(y), bool)
    suggested = log_p.argmax(axis=1)
    # Unlabelled paintings (pd.NA) count as agreeing with no label.
    all_labels = catalog[target].astype("string").to_numpy(dtype=object, na_value=None)
    near_rows = rows[use]
    near_labels = np.where(near_rows >= 0, all_labels[np.maximum(near_rows, 0)], None)
    # Each catalog row's label code once, then gathered for the pools (a lookup per pool place
    # was 1.8 s of a 1% growth's review on the loaded 2-core box).
    row_codes = np.array([code.get(v, -1) if v is not None else -1 for v in all_labels],
                         dtype=np.int64)
    near_codes = np.where(near_rows >= 0, row_codes[np.maximum(near_rows, 0)], -1)
    recorded = log_p[np.arange(len(y)), y]
    evidence = neighbour_evidence(near_codes, sims[use], y, own_label_similarity(
        x, use, y, near_codes, sims[use]), len(classes))
    relative = log_p_vs_nearest(recorded.astype(np.float64), near_rows, use, len(catalog))
    # The optional pieces, by the column that shows each.
    named = {}
    if len(classes) >= PROFILE_MIN_LABELS:
        named["profile_agreement"] = profile_agreement(log_p, y)
    if context is not None:
        named[f"{context[0]}_agreement"] = context_agreement(
            len(catalog), scored, context[1])
    parts = [recorded, relative, evidence, *named.values()]
    quality = np.mean([rankdata(p) / len(p) for p in parts], axis=0)
    ids = catalog["image_id"].to_numpy(dtype=object)

    def closest(wanted: np.ndarray) -> list[Any]:
        hit = near_labels == wanted[:, None]
        first = hit.argmax(axis=1)
        found = hit[np.arange(len(wanted)), first]
        return [ids[near_rows[q, f]] if ok else None
                for q, (f, ok) in enumerate(zip(first, found, strict=True))]

    own = classes[y]
    frame = pd.DataFrame({
        "target": target,
        "image_id": pd.array(ids[use], dtype="string"),
        "recorded": own,
        "p_recorded": np.exp(recorded).astype(np.float32),
        "log_p_recorded": recorded.astype(np.float32),
        "log_p_vs_nearest": relative.astype(np.float32),
        "suggested": classes[suggested],
        "p_suggested": np.exp(log_p.max(axis=1)).astype(np.float32),
        "neighbour_evidence": evidence.astype(np.float32),
        "label_quality": quality.astype(np.float32),
        "issue": issue,
        "neighbour_agreement": (near_labels[:, :AGREEMENT_K] == own[:, None]).mean(axis=1)
        .astype(np.float32),
        "closest_recorded": pd.array(closest(own), dtype="string"),
        "closest_suggested": pd.array(closest(classes[suggested]), dtype="string"),
    })
    for column, values in named.items():
        frame.insert(frame.columns.get_loc("label_quality"), column, values.astype(np.float32))
    frame = frame.sort_values(["label_quality", "image_id"], kind="stable").reset_index(drop=True)
    return frame, {"issues": int(issue.sum()),
                   "out_of_fold_accuracy": round(float((suggested == y).mean()), 4)}


def combine_views(log_ps: list[np.ndarray]) -> np.ndarray:
    """The views' log-probabilities averaged and made a distribution again: the geometric mean
    of their heads' probabilities (a label every view doubts stays doubted; one view's
    overconfidence is tempered by the others)."""
    return _log_softmax(np.mean(np.asarray(log_ps, dtype=np.float64), axis=0))


def fit_labels(catalog: pd.DataFrame, targets: list[str], views: list[np.ndarray]
               ) -> tuple[dict[str, Scored], dict[str, Any], list[dict[str, Any]]]:
    """Every target's out-of-fold log-probabilities, one head per view (the reviewed set and
    each of its parts) on that view's reduction, combined (`combine_views`); and the models (the
    reductions and each target's heads fitted on all of its scored paintings) that score
    paintings added later."""
    start = time.perf_counter()
    with threadpool_limits(1):
        reducers = [reduction().fit(np.asarray(v, dtype=np.float32)) for v in views]
        zs = [r.transform(np.asarray(v, dtype=np.float32))
              for r, v in zip(reducers, views, strict=True)]
    reduced_s = time.perf_counter() - start
    scored, heads, names, infos = {}, {}, {}, []
    for target in targets:
        start = time.perf_counter()
        use, labels, info = target_labels(catalog, target)
        if info["classes"] < 2:
            infos.append({**info, "seconds": 0.0})
            continue
        classes = np.array(sorted(set(labels)), dtype=object)
        code = {c: i for i, c in enumerate(classes)}
        y = np.array([code[v] for v in labels], dtype=np.int64)
        log_p = combine_views([out_of_fold(z[use], y) for z in zs])
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", UserWarning)
            heads[target] = [review_head().fit(z[use], y) for z in zs]
        names[target] = classes
        scored[target] = Scored(use, y, log_p, classes)
        infos.append({**info, "fit_s": round(time.perf_counter() - start, 3)})
    return scored, {"reductions": reducers, "heads": heads, "classes": names,
                    "reduced_s": round(reduced_s, 3)}, infos


def extend_labels(catalog: pd.DataFrame, targets: list[str], views: list[np.ndarray],
                  models: dict[str, Any], before: dict[str, dict[str, np.ndarray]]
                  ) -> tuple[dict[str, Scored], list[dict[str, Any]]]:
    """Every target's log-probabilities on the grown catalog: kept paintings keep their stored
    out-of-fold ones, added ones (with a label the heads know) are scored by the heads fitted on
    all of the fit's paintings, which never saw them."""
    scored, infos = {}, []
    for target in targets:
        start = time.perf_counter()
        use, labels, info = target_labels(catalog, target)
        heads = models["heads"].get(target)
        if heads is None:
            infos.append({**info, "seconds": 0.0})
            continue
        classes = np.asarray(models["classes"][target], dtype=object)
        code = {c: i for i, c in enumerate(classes)}
        known = np.array([v in code for v in labels], dtype=bool)
        use, labels = use[known], labels[known]
        ids = catalog["image_id"].astype(str).to_numpy()[use]
        stored = before[target]
        position = pd.Index(stored["image_id"]).get_indexer(ids)
        log_p = np.empty((len(use), len(classes)), dtype=np.float32)
        old = position >= 0
        log_p[old] = stored["log_p"][position[old]]
        if (~old).any():
            with threadpool_limits(1):
                log_p[~old] = combine_views([
                    log_proba(h, r.transform(np.asarray(v[use[~old]], dtype=np.float32)))
                    for h, r, v in zip(heads, models["reductions"], views, strict=True)])
        y = np.array([code[v] for v in labels], dtype=np.int64)
        scored[target] = Scored(use, y, log_p, classes)
        infos.append({**info, "scored": int(len(use)), "left_out_new_label": int((~known).sum()),
                      "scored_by_stored_head": int((~old).sum()),
                      "fit_s": round(time.perf_counter() - start, 3)})
    return scored, infos


# -------------------------------------------------------------------------------------- outliers
def find_outliers(catalog: pd.DataFrame, sims: np.ndarray, rows: np.ndarray) -> pd.DataFrame:
    """Every painting, least like the rest of the collection first, with a readable reason."""
    k = min(OUTLIER_K, sims.shape[1])
    kth = sims[:, k - 1].astype(np.float64)
    median = float(np.median(kth))
    ids = catalog["image_id"].to_numpy(dtype=object)
    titles = catalog["title"].fillna("untitled").to_numpy(dtype=object)
    artists = catalog["artist"].fillna("unknown artist").to_numpy(dtype=object)
    nearest = rows[:, 0]
    reasons = [f"its {k}th closest painting is only {s:.2f} alike (collection median "
               f"{median:.2f}); closest: '{titles[n]}' by {artists[n]} ({s0:.2f})"
               for s, n, s0 in zip(kth, nearest, sims[:, 0], strict=True)]
    frame = pd.DataFrame({"image_id": pd.array(ids, dtype="string"),
                          "score": (1.0 - kth).astype(np.float32),
                          f"similarity_{k}th": kth.astype(np.float32),
                          "mean_similarity": sims[:, :k].mean(axis=1).astype(np.float32),
                          "closest": pd.array(ids[nearest], dtype="string"),
                          "reason": reasons})
    return frame.sort_values(["score", "image_id"], ascending=[False, True],
                             kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------- the stage
def review_targets(run: Run) -> list[str]:
    """Single-label targets with a trained head, in the heads' order (each once); a multi-label
    head has no one recorded label for the pictures to argue against."""
    from influence.readers import head_paths, trained_heads

    return list(dict.fromkeys(t for t, f in trained_heads(run)
                              if not read_json(head_paths(run, t, f)["json"]).get("multi_label")))


def head_views(run: Run, features: str) -> list[str]:
    """The feature sets the label heads read: the reviewed set, then each part the run holds of
    a combined one (each network's own view; their heads together ranked the swapped artists
    of the probes better than the combined set's head alone)."""
    from influence.combine import is_combined, parse

    parts = [p.name for p in parse(features)] if is_combined(features) else []
    return [features, *(p for p in parts if p in run.feature_names())]


def build_review(run: Run, features: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`review` stage: write RUN/review/ for a feature set; returns review.json (+ up_to_date).

    Three steps of the run protocol, duplicates, labels and outliers, from the index's
    neighbour table. Paintings added or removed extend the first two (see the module's
    docstring); past REFIT_SHARE they are built again.
    """
    import joblib

    from influence.index import load_neighbours
    from influence.similar import default_features

    features = features or default_features(run)
    catalog = run.catalog()
    x = run.features(features)
    if len(x) != len(catalog):
        raise InfluenceError(f"features '{features}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run `extract` again")
    if run.step_key("index", features) is None:
        raise InfluenceError(f"no index of '{features}' in run {run.root}: run `index` first")
    paths = review_paths(run)
    targets = review_targets(run)
    view_names = head_views(run, features)
    views = [x, *(run.features(v) for v in view_names[1:])]
    if any(len(v) != len(catalog) for v in views):
        raise InfluenceError(f"the parts of '{features}' do not have a row per painting: run "
                             f"`extract` again")
    module = sys.modules[__name__]

    def timed(build: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
        def wrapped(*args: Any) -> dict[str, Any]:
            start = time.perf_counter()
            out = build(*args)
            return {**out, "total_s": round(time.perf_counter() - start, 3)}
        return wrapped

    @functools.cache
    def pool() -> tuple[np.ndarray, np.ndarray]:
        sims, rows = load_neighbours(run, features)
        return np.ascontiguousarray(sims[:, :POOL]), np.ascontiguousarray(rows[:, :POOL])

    steps: dict[str, Any] = {}

    def duplicates(thresholds: dict[str, float] | None = None,
                   known: pd.DataFrame | None = None) -> dict[str, Any]:
        sims, rows = pool()
        thresholds = thresholds or duplicate_thresholds(sims)
        start = time.perf_counter()
        frame, hashes = find_duplicates(catalog, sims, rows,
                                        lambda r: _small_image(run, catalog, r), thresholds,
                                        known, progress)
        _write(frame, paths["duplicates"])
        _write(hashes, paths["hashes"])
        return {"pairs": len(frame), "conflicts": int(frame["conflict"].sum()),
                "thresholds": thresholds, "hashed": int(len(hashes)),
                "hash_s": round(time.perf_counter() - start, 3)}

    def more_duplicates(growth: Growth) -> dict[str, Any]:
        known = pd.read_parquet(run.verified(paths["hashes"]))
        return duplicates(growth.record["thresholds"], known)

    def write_labels(scored: dict[str, Scored], infos: list[dict[str, Any]],
                     models: dict[str, Any]) -> dict[str, Any]:
        sims, rows = pool()
        frames, per_target = [], []
        all_ids = catalog["image_id"].astype(str).to_numpy()
        for info in tqdm(infos, desc="review: labels", unit="target", disable=not progress):
            target = info["target"]
            if target not in scored:
                per_target.append({**info, "issues": 0})
                continue
            start = time.perf_counter()
            coarse = CONTEXT.get(target)
            frame, found = label_table(catalog, target, scored[target], x, sims, rows,
                                       (coarse, scored[coarse]) if coarse in scored else None)
            frames.append(frame)
            per_target.append({**info, **found,
                               "rank_s": round(time.perf_counter() - start, 3)})
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["target", "image_id"])
        _write(frame, paths["labels"])
        stored = {t: {"image_id": all_ids[s.use], "log_p": s.log_p} for t, s in scored.items()}
        # The fit's time is reported, never stored with the models: the file must be the same
        # bytes however often the step is interrupted and run again.
        kept = {k: v for k, v in models.items() if k != "reduced_s"}
        with atomic(paths["models"]) as tmp:
            joblib.dump({**kept, "scored": stored}, tmp)
        # Not `rows`: the run protocol records a step's rows under that name.
        return {"label_rows": len(frame), "targets": per_target, "views": view_names,
                "reduced_s": models.get("reduced_s")}

    def labels() -> dict[str, Any]:
        scored, models, infos = fit_labels(catalog, targets, views)
        return write_labels(scored, infos, models)

    def more_labels(growth: Growth) -> dict[str, Any]:
        models = joblib.load(run.verified(paths["models"]))
        scored, infos = extend_labels(catalog, targets, views, models, models["scored"])
        return {**write_labels(scored, infos, models), "added": int(growth.new.sum()),
                "removed": len(growth.removed)}

    def outliers() -> dict[str, Any]:
        sims, rows = pool()
        frame = find_outliers(catalog, sims, rows)
        _write(frame, paths["outliers"])
        return {"rows": len(frame)}

    start = time.perf_counter()
    reports = {}
    # The tables read the index's fit (so a grown neighbour table extends them) and the
    # outliers its key.
    read = {"neighbours": run.fit_key("index", features)}
    fields = [f for f in CONFLICT_FIELDS if f in catalog]
    steps["duplicates"] = (estimator_step(
        "review", "duplicates", {}, module, read, (paths["duplicates"], paths["hashes"]),
        {"features": features, "hash": "phash64", "hash_of": "thumbnail"},
        rows=Rows(catalog[["image_id", *fields]])), duplicates, more_duplicates)
    steps["labels"] = (estimator_step(
        "review", "labels", {"head": review_head(), "reduction": reduction()}, module,
        {**read, **{f"part {v}": run.fit_key("extract", v) for v in view_names[1:]}},
        (paths["labels"], paths["models"]),
        {"targets": targets, "features": features, "views": view_names},
        rows=Rows(catalog[["image_id", *targets]], fit=tuple(targets))), labels, more_labels)
    steps["outliers"] = (estimator_step(
        "review", "outliers", {}, module,
        {**column_fingerprints(catalog, ("title", "artist")),
         "neighbours": run.step_key("index", features)},
        (paths["outliers"],), {"features": features}), outliers, None)
    for name in TABLES:
        step, build, extend = steps[name]
        reports[name] = run.step(step, timed(build), timed(extend) if extend else None)
    fresh = not all(r["up_to_date"] for r in reports.values())
    if fresh or not paths["summary"].exists():
        keep = ("pairs", "conflicts", "rows", "label_rows", "targets", "total_s", "hash_s",
                "hashed", "thresholds", "views", "reduced_s", "action", "added", "removed",
                "params")
        summary = {"features": features, "paintings": len(catalog),
                   **{name: {k: r[k] for k in keep if k in r} for name, r in reports.items()},
                   "rules": __doc__.split("\n\n")[2:-1],
                   "timings": {**{f"{n}_s": r.get("total_s") for n, r in reports.items()},
                               "stage_s": round(time.perf_counter() - start, 3)},
                   "versions": versions()}
        write_json(paths["summary"], summary)
    return {**read_json(paths["summary"]), "up_to_date": not fresh}


def _small_image(run: Run, catalog: pd.DataFrame, row: int) -> Path:
    """The painting's thumbnail (fast to decode) where the run has it, else its image."""
    from influence.thumbnails import thumbnail_path

    thumb = thumbnail_path(run, str(catalog["image_id"].iat[row]))
    return thumb if thumb.exists() else run.image_path(catalog["file"].iat[row])


def _write(frame: pd.DataFrame, path: Path) -> None:
    """Write a table atomically."""
    with atomic(path) as tmp:
        frame.to_parquet(tmp, index=False)


# ---------------------------------------------------------------------------------- reading back
@dataclass
class Review:
    """A run's stored review: duplicate pairs, label issues, outliers and the summary."""

    duplicates: pd.DataFrame
    labels: pd.DataFrame
    outliers: pd.DataFrame
    summary: dict[str, Any]

    def table(self, name: str) -> pd.DataFrame:
        """One of the three tables by name; InfluenceError for another name."""
        if name not in TABLES:
            raise InfluenceError(f"unknown review table '{name}' (one of {', '.join(TABLES)})")
        return getattr(self, name)

    def duplicates_of(self, image_id: str) -> list[str]:
        """Ids of the paintings found to show the same picture as this one, closest first."""
        d = self.duplicates.sort_values("similarity", ascending=False, kind="stable")
        a, b = d["image_id_a"] == image_id, d["image_id_b"] == image_id
        return [str(v) for v in np.where(a, d["image_id_b"], d["image_id_a"])[(a | b).to_numpy()]]


def load_review(run: Run) -> Review:
    """The stored review stage of a run; InfluenceError if `review` has not been run."""
    paths = review_paths(run)
    run.require(paths["summary"], "review")
    return Review(*(pd.read_parquet(paths[t]) for t in TABLES), read_json(paths["summary"]))
