"""The cataloguer's review: near-duplicates, labels the pictures argue against, and outliers.

Real catalogues hold the same painting scanned twice under two records, attributions the
picture argues against, and records whose image is no painting at all. The stage (`review`)
lists each for a person to check, most likely first, from one indexed feature set:

1. **Neighbours.** Every painting searches the run's faiss index for its `POOL` nearest
   paintings (itself left out), once; all three lists read that pool, so the stage scales like
   `index` does.

2. **Duplicates.** A pair is a candidate when one is among the other's neighbours with cosine
   similarity at least `CANDIDATE`. It is a duplicate when the pictures' perceptual hashes
   (imagehash's pHash, 64 bits, of the run's thumbnail; the smaller distance of the image and
   its mirror) differ in at most `HASH_MAX` bits (`HASH_MAX_CLOSE` when the features are at
   least `CLOSE` alike): a re-encoded, resized, slightly cropped, mirrored or recoloured copy
   keeps its hash, another painting of the same subject does not. Pictures too plain to hash
   (blank scans, flat colour fields) are no one's duplicate. Each pair says which of
   `CONFLICT_FIELDS` its records disagree on; conflicts first, then by similarity.

3. **Labels.** For each target with a trained head, out-of-fold probabilities over the whole
   collection (scikit-learn's `cross_val_predict`, `FOLDS` stratified folds: a painting's own
   label is never used to predict it) from a small logistic head (`review_head`), and each
   painting's neighbour evidence for its label (`neighbour_evidence`); their mean ranks the
   recorded labels, lowest first, and cleanlab's confident-learning filter says which are likely
   issues. Labels with fewer than `FOLDS`
   paintings are left out (counted in review.json). Each row also keeps how many of its
   `AGREEMENT_K` nearest paintings share the recorded label, and the closest painting with the
   recorded and with the suggested label.

4. **Outliers.** A painting is unusual when few paintings resemble it: its score is one minus its
   similarity to its `OUTLIER_K`-th nearest painting, so a small group of like things (a batch of
   blank scans) stays unusual; the reason gives that similarity against the collection's median.

`build_review` runs it and writes `RUN/review/`; `load_review` reads it back.
"""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_predict
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from influence.estimators.heads import CappedPCA
from influence.runs import (
    InfluenceError,
    Run,
    column_fingerprints,
    estimator_step,
    read_json,
    versions,
    write_json,
)

__all__ = ["Review", "build_review", "load_review", "review_dir", "review_head"]

#: Nearest paintings searched per painting (itself left out).
POOL = 50
#: Cosine similarity from which two neighbours are duplicate candidates.
CANDIDATE = 0.83
#: Largest pHash distance (bits of 64) of a duplicate; up to `HASH_MAX_CLOSE` for a pair at
#: least `CLOSE` alike in features (a harder crop or recolouring moves more bits).
HASH_MAX = 10
HASH_MAX_CLOSE = 16
CLOSE = 0.87
#: Side of the image a hash is computed from (decoded at about this size: fast).
HASH_DECODE = 128
#: Grey-level standard deviation (0-255) under which a picture is too plain to hash: blank
#: scans and flat colour fields all hash alike, so they are no one's duplicate by hash.
PLAIN_STD = 6.0
#: Record fields two duplicates are compared on.
CONFLICT_FIELDS = ("artist", "title", "year", "style")
#: Out-of-fold probabilities: folds, seed, and the head's PCA dimensions and regularisation.
FOLDS = 5
SEED = 0
HEAD_DIMS = 128
HEAD_C = 0.5
HEAD_MAX_ITER = 300
#: Nearest paintings whose labels are compared with the recorded one.
AGREEMENT_K = 10
#: Neighbour evidence for a label: the mean similarity of the painting's `EVIDENCE_TOP` most
#: alike paintings with that label (for its own label over all of the label's paintings; for the
#: others in its pool, the pool's last similarity standing in beyond it), made a
#: share of all labels by a softmax at `EVIDENCE_TEMPERATURE`. A label's score is the mean of
#: this share and the out-of-fold probability: the head sees the whole collection's label
#: boundaries, the neighbours whether the painting sits among the label's own pictures, and on
#: swapped artists the mean ranks a fifth more of them in the top 2% than the probability
#: alone (docs/review.md).
EVIDENCE_TOP = 3
EVIDENCE_TEMPERATURE = 0.05
#: Paintings of one label a painting is compared with for its own label's evidence (seeded).
EVIDENCE_SAMPLE = 4000
#: The neighbour whose similarity makes a painting's outlier score.
OUTLIER_K = 20
#: Version of this stage's recipe: bump it when a code change changes its tables.
VERSION = "2"
TABLES = ("duplicates", "labels", "outliers")


def review_dir(run: Run) -> Path:
    return run.root / "review"


def review_paths(run: Run) -> dict[str, Path]:
    out = review_dir(run)
    return {**{t: out / f"{t}.parquet" for t in TABLES}, "summary": out / "review.json"}


def review_head() -> Pipeline:
    """The small head of the out-of-fold probabilities: normalise, PCA (to at most what the
    rows allow), standardise, logistic."""
    return make_pipeline(Normalizer(), CappedPCA(HEAD_DIMS, random_state=SEED), StandardScaler(),
                         LogisticRegression(C=HEAD_C, max_iter=HEAD_MAX_ITER))


# ------------------------------------------------------------------------------------ neighbours
def neighbour_pool(index: Any, x: np.ndarray, pool: int = POOL, progress: bool = True,
                   chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of each row's `pool` nearest other rows, best first (-1: none)."""
    from influence.index import search

    n = len(x)
    sims = np.full((n, pool), -1.0, dtype=np.float32)
    rows = np.full((n, pool), -1, dtype=np.int64)
    for start in tqdm(range(0, n, chunk), desc="review: neighbours", unit="chunk",
                      disable=not progress):
        s, found = search(index, np.asarray(x[start:start + chunk]), pool + 1)
        for q in range(len(found)):
            keep = (found[q] != start + q) & (found[q] >= 0)
            s_q, f_q = s[q][keep][:pool], found[q][keep][:pool]
            sims[start + q, :len(f_q)], rows[start + q, :len(f_q)] = s_q, f_q
    return sims, rows


# ------------------------------------------------------------------------------------ duplicates
def image_hashes(path: Path) -> tuple[Any, Any] | None:
    """pHash of an image and of its mirror, decoded small (JPEG draft mode) for speed; None for
    a picture too plain to hash (see `PLAIN_STD`)."""
    import imagehash
    from PIL import Image, ImageOps, ImageStat

    with Image.open(path) as img:
        img.draft("RGB", (HASH_DECODE, HASH_DECODE))
        image = img.convert("RGB")
    if ImageStat.Stat(image.convert("L")).stddev[0] < PLAIN_STD:
        return None
    return imagehash.phash(image), imagehash.phash(ImageOps.mirror(image))


def _same(a: Any, b: Any) -> bool:
    """Whether two record values agree; a missing value agrees with anything."""
    if pd.isna(a) or pd.isna(b):
        return True
    if isinstance(a, str) and isinstance(b, str):
        return " ".join(a.casefold().split()) == " ".join(b.casefold().split())
    return a == b


def find_duplicates(catalog: pd.DataFrame, sims: np.ndarray, rows: np.ndarray,
                    image_path: Callable[[int], Path], progress: bool = True) -> pd.DataFrame:
    """Pairs of rows that show the same picture, with their evidence and conflicting fields."""
    a, k = np.nonzero((sims >= CANDIDATE) & (rows >= 0))
    b = rows[a, k]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    pairs = pd.DataFrame({"a": lo, "b": hi, "similarity": sims[a, k]})
    pairs = pairs.groupby(["a", "b"], as_index=False)["similarity"].max()
    hashes: dict[int, tuple[Any, Any]] = {}
    for row in tqdm(np.unique(pairs[["a", "b"]].to_numpy()), desc="review: hashes",
                    unit="img", disable=not progress):
        try:
            found = image_hashes(image_path(int(row)))
        except OSError:
            continue
        if found is not None:
            hashes[int(row)] = found
    distance = [min(hashes[a][0] - hashes[b][0], hashes[a][0] - hashes[b][1])
                if a in hashes and b in hashes else 64
                for a, b in zip(pairs["a"], pairs["b"], strict=True)]
    pairs["phash_distance"] = np.asarray(distance, dtype=np.int16)
    same = (pairs["phash_distance"] <= HASH_MAX) | (
        (pairs["phash_distance"] <= HASH_MAX_CLOSE) & (pairs["similarity"] >= CLOSE))
    pairs = pairs[same].reset_index(drop=True)
    ids = catalog["image_id"].to_numpy(dtype=object)
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
                           ascending=[False, False, True], kind="stable").reset_index(drop=True)


# ---------------------------------------------------------------------------------------- labels
def out_of_fold(x: np.ndarray, labels: np.ndarray, cv: Any = None) -> np.ndarray:
    """Probabilities of each class (sorted codes) for every row, from a head fitted on the other
    folds only (default: `FOLDS` stratified, seeded folds)."""
    cv = cv if cv is not None else StratifiedKFold(FOLDS, shuffle=True, random_state=SEED)
    # One BLAS thread: on the loaded 2-core machine BLAS's own threads made a 180-painting
    # slice take 45 s instead of 1.6 (and worker processes for the folds cost more to start
    # than they save there).
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore", ConvergenceWarning)
        return cross_val_predict(review_head(), x, labels, cv=cv, method="predict_proba")


def label_issues(catalog: pd.DataFrame, target: str, x: np.ndarray, sims: np.ndarray,
                 rows: np.ndarray) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The recorded labels of one target ranked by how much the pictures argue against them."""
    from cleanlab.filter import find_label_issues

    recorded = catalog[target].astype("string")
    counts = recorded.value_counts()
    kept = counts[counts >= FOLDS].index
    use = np.flatnonzero(recorded.isin(kept).fillna(False).to_numpy())
    info = {"target": target, "scored": int(len(use)), "classes": int(len(kept)),
            "left_out_unlabelled": int(recorded.isna().sum()),
            "left_out_rare": int(recorded.notna().sum() - len(use))}
    if len(kept) < 2:
        return pd.DataFrame(), {**info, "issues": 0}
    classes = np.array(sorted(kept), dtype=object)
    code = {c: i for i, c in enumerate(classes)}
    y = np.array([code[v] for v in recorded.to_numpy(dtype=object)[use]])
    proba = out_of_fold(np.asarray(x[use], dtype=np.float32), y)
    # One process: cleanlab's pool loses its globals under a fork server, and 2 cores gain little.
    issue = find_label_issues(y, proba, n_jobs=1)
    suggested = proba.argmax(axis=1)
    # Unlabelled paintings (pd.NA) count as agreeing with no label.
    all_labels = recorded.to_numpy(dtype=object, na_value=None)
    near_rows = rows[use]
    near_labels = np.where(near_rows >= 0, all_labels[np.maximum(near_rows, 0)], None)
    near_codes = np.array([[code.get(v, -1) if v is not None else -1 for v in row]
                           for row in near_labels], dtype=np.int64).reshape(near_rows.shape)
    p_recorded = proba[np.arange(len(y)), y]
    evidence = neighbour_evidence(near_codes, sims[use], y,
                                  own_label_similarity(x[use], y), len(classes))
    ids = catalog["image_id"].to_numpy(dtype=object)

    def closest(label_rows: np.ndarray, wanted: np.ndarray) -> list[Any]:
        out = []
        for q, want in enumerate(wanted):
            hit = np.flatnonzero(near_labels[q] == want)
            out.append(ids[label_rows[q, hit[0]]] if len(hit) else None)
        return out

    own = classes[y]
    frame = pd.DataFrame({
        "target": target,
        "image_id": pd.array(ids[use], dtype="string"),
        "recorded": own,
        "p_recorded": p_recorded.astype(np.float32),
        "suggested": classes[suggested],
        "p_suggested": proba.max(axis=1).astype(np.float32),
        "neighbour_evidence": evidence.astype(np.float32),
        "label_quality": ((p_recorded + evidence) / 2).astype(np.float32),
        "issue": issue,
        "neighbour_agreement": (near_labels[:, :AGREEMENT_K] == own[:, None]).mean(axis=1)
        .astype(np.float32),
        "closest_recorded": pd.array(closest(near_rows, own), dtype="string"),
        "closest_suggested": pd.array(closest(near_rows, classes[suggested]), dtype="string"),
    })
    frame = frame.sort_values(["label_quality", "image_id"], kind="stable").reset_index(drop=True)
    return frame, {**info, "issues": int(issue.sum()),
                   "out_of_fold_accuracy": round(float((suggested == y).mean()), 4)}


def own_label_similarity(x: np.ndarray, own: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Each row's mean cosine similarity to its `EVIDENCE_TOP` most alike other rows with the
    same label code, over all of them (at most `EVIDENCE_SAMPLE` seeded ones per label)."""
    from influence.index import normalise

    out = np.zeros(len(own))
    rng = np.random.default_rng(seed)
    for label in np.unique(own):
        members = np.flatnonzero(own == label)
        pool = members if len(members) <= EVIDENCE_SAMPLE else np.sort(
            rng.choice(members, EVIDENCE_SAMPLE, replace=False))
        others = normalise(x[pool])
        for lo in range(0, len(members), 2048):
            rows = members[lo:lo + 2048]
            s = normalise(x[rows]) @ others.T
            s[rows[:, None] == pool[None, :]] = -np.inf
            top = min(EVIDENCE_TOP, max(len(pool) - 1, 1))
            best = -np.partition(-s, top - 1, axis=1)[:, :top]
            out[rows] = np.where(np.isfinite(best), best, -1.0).mean(axis=1)
    return out


def neighbour_evidence(codes: np.ndarray, sims: np.ndarray, own: np.ndarray,
                       own_similarity: np.ndarray, n_labels: int) -> np.ndarray:
    """Each row's share of the neighbour evidence that goes to its own label (see EVIDENCE_TOP):
    its own label's from `own_similarity` (over all its label's paintings), the others' from the
    pool (`codes`: the pool's label codes, -1 for none; `sims`: their similarities), with the
    pool's last similarity for labels beyond it."""
    out = np.zeros(len(codes))
    for q in range(len(codes)):
        valid = (codes[q] >= 0) & (codes[q] != own[q])
        c, s = codes[q][valid], sims[q][valid]
        floor = float(sims[q][sims[q] > -1].min()) if (sims[q] > -1).any() else -1.0
        labels = np.unique(c)
        score = np.array([np.concatenate([np.sort(s[c == lab])[::-1][:EVIDENCE_TOP],
                                          np.full(EVIDENCE_TOP, floor)])[:EVIDENCE_TOP].mean()
                          for lab in labels])
        mine = float(own_similarity[q])
        top = max(float(score.max()) if len(score) else floor, floor, mine)
        rest = (n_labels - 1 - len(labels)) * np.exp((floor - top) / EVIDENCE_TEMPERATURE)
        weight = np.exp((score - top) / EVIDENCE_TEMPERATURE).sum() + rest
        mine_w = np.exp((mine - top) / EVIDENCE_TEMPERATURE)
        out[q] = mine_w / (mine_w + weight)
    return out


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


def build_review(run: Run, features: str | None = None, progress: bool = True) -> dict[str, Any]:
    """`review` stage: write RUN/review/ for a feature set; returns review.json (+ up_to_date)."""
    from influence.index import load_index, set_threads
    from influence.similar import default_features

    features = features or default_features(run)
    catalog = run.catalog()
    x = run.features(features)
    if len(x) != len(catalog):
        raise InfluenceError(f"features '{features}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run `extract` again")
    index_key = run.step_key("index", features)
    if index_key is None:
        raise InfluenceError(f"no index of '{features}' in run {run.root}: run `index` first")
    paths = review_paths(run)
    targets = review_targets(run)
    base = {"features": run.step_key("extract", features), "index": index_key}

    @cache
    def pool() -> tuple[np.ndarray, np.ndarray]:
        set_threads()
        return neighbour_pool(load_index(run, features), x, POOL, progress)

    def timed(build: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
        def wrapped() -> dict[str, Any]:
            start = time.perf_counter()
            out = build()
            return {**out, "total_s": round(time.perf_counter() - start, 3)}
        return wrapped

    def duplicates() -> dict[str, Any]:
        sims, rows = pool()
        start = time.perf_counter()
        frame = find_duplicates(catalog, sims, rows, lambda r: _small_image(run, catalog, r),
                                progress)
        _write(frame, paths["duplicates"])
        return {"pairs": len(frame), "conflicts": int(frame["conflict"].sum()),
                "hash_s": round(time.perf_counter() - start, 3)}

    def labels() -> dict[str, Any]:
        sims, rows = pool()
        frames, per_target = [], []
        for target in tqdm(targets, desc="review: labels", unit="target", disable=not progress):
            start = time.perf_counter()
            frame, info = label_issues(catalog, target, x, sims, rows)
            frames.append(frame)
            per_target.append({**info, "seconds": round(time.perf_counter() - start, 3)})
        frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
            columns=["target", "image_id"])
        _write(frame, paths["labels"])
        return {"rows": len(frame), "targets": per_target}

    def outliers() -> dict[str, Any]:
        sims, rows = pool()
        frame = find_outliers(catalog, sims, rows)
        _write(frame, paths["outliers"])
        return {"rows": len(frame)}

    # Each step's key: every constant of this module, the labels head's get_params(), and what
    # the step is asked for.
    module = sys.modules[__name__]
    steps = [
        (estimator_step("review", "duplicates", {}, module,
                        {**column_fingerprints(catalog, CONFLICT_FIELDS), **base},
                        (paths["duplicates"],), {"features": features, "hash": "phash64",
                                                 "hash_of": "thumbnail"}), duplicates),
        (estimator_step("review", "labels", {"head": review_head()}, module,
                        {**column_fingerprints(catalog, targets), **base}, (paths["labels"],),
                        {"targets": targets, "features": features}), labels),
        (estimator_step("review", "outliers", {}, module,
                        {**column_fingerprints(catalog, ("title", "artist")), **base},
                        (paths["outliers"],), {"features": features}), outliers),
    ]
    start = time.perf_counter()
    reports = {step.name: run.step(step, timed(build)) for step, build in steps}
    fresh = not all(r["up_to_date"] for r in reports.values())
    if fresh or not paths["summary"].exists():
        keep = ("pairs", "conflicts", "rows", "targets", "total_s", "hash_s", "params")
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
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    frame.to_parquet(tmp, index=False)
    tmp.replace(path)


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
