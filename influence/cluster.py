"""The `cluster` stage: reduce, sweep KMeans over k, fit a GMM, score, profile and map.

The recipe (`make_recipe`: estimators of `influence.estimators.clustering`), per feature matrix:

1. reduce: centre, standardise the columns unless they are already decorrelated components, then
   PCA to the fewest dimensions keeping `VARIANCE` of the variance, at most `MAX_DIMS`;
2. KMeans for every k in the range, recording inertia, silhouette, Davies-Bouldin and
   Calinski-Harabasz; the k is chosen by Kneedle on the inertia curve (`kneedle`);
3. a diagonal-covariance Gaussian mixture at every k, started from that k's KMeans solution,
   recording BIC; the one at the chosen k gives each painting's soft membership;
4. a seeded 2-D UMAP of the reduced features (`influence.estimators.layout`).

`cluster_features` runs it on a run's feature set and writes `RUN/clusters/<features>/` (see
docs/DESIGN.md); `influence.readers.load_clustering` reads that back for the app and the search
without recomputing anything. The step's key is the estimators' `get_params()`, this module's
constants and `VERSION`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from threadpoolctl import threadpool_limits

from influence.catalog import LABEL_FIELDS
from influence.estimators.clustering import ElbowClustering, Projection, Reducer, fit_rows
from influence.plots import plot_sweep
from influence.readers import clustered_features
from influence.runs import (
    Growth,
    InfluenceError,
    Rows,
    Run,
    Step,
    atomic,
    estimator_step,
    read_json,
    timed,
    write_json,
)

SEED = 0
#: BLAS and OpenMP threads of every fit: the same number gives the same clusters in any process.
#: One, as `run` holds every library to while train fits beside cluster (the counts are the
#: process's, so the heads' last bits would otherwise depend on when cluster raised them).
THREADS = 1
#: PCA keeps the fewest components explaining this share of the variance, but no more than
#: MAX_DIMS: KMeans, GMM and UMAP stay fast and distances stop being dominated by noise.
VARIANCE = 0.90
MAX_DIMS = 50
#: Columns whose mean absolute correlation is below this are already principal components
#: (the `pca` and `kpca` extractors): scaling them to unit variance would whiten noise up to the
#: weight of the main components, so they are only centred.
DECORRELATED = 0.05
KMEANS_INIT = 3
#: Diagonal covariances: after PCA the features are globally decorrelated, a diagonal mixture
#: costs O(n k d) per EM step instead of O(n k d^2), and it has 2d instead of d(d+3)/2
#: parameters per component, so BIC does not punish every k above a handful.
COVARIANCE = "diag"
#: Silhouette is exact up to this many paintings; above it, on a fixed seeded sample this size.
SILHOUETTE_SAMPLE = 8000
#: Up to this many paintings everything is fitted on all of them. Past it, the reducer, the
#: KMeans and GMM sweeps and UMAP are fitted on a fixed seeded sample this size, and every
#: painting is then assigned (KMeans, GMM responsibilities) or placed (UMAP transform) by the
#: fitted models; the cost of that shortcut against a full fit is measured in the README.
FIT_SAMPLE = 20_000
UMAP_NEIGHBOURS = 15
UMAP_MIN_DIST = 0.1
#: The layout's epochs and first learning rate. Each epoch's updates are computed together
#: (`influence.estimators.layout`), which overshoots at umap-learn's rate of 1 (trustworthiness
#: 0.777 against umap-learn's 0.793 on the shared search set); at 0.15, 100 epochs give 0.798
#: (200 give no more) for half the work.
UMAP_EPOCHS = 100
UMAP_LEARNING_RATE = 0.15
#: Paintings closest to each cluster's centre kept in typical.parquet.
TYPICAL = 12
METHODS = ("kmeans", "gmm")
FIELDS = LABEL_FIELDS
SCORES = ("silhouette", "davies_bouldin", "calinski_harabasz")
#: Version of this stage's recipe: bump it when a code change changes the clusters or what is
#: stored of them (2: the projection is kept, to place new images on the map, and UMAP runs on exact
#: neighbours; the GMM is fitted at the chosen k only; 3: exact PCA from the covariance's
#: eigenvectors instead of a randomized SVD; 4: the map laid out by UMAP's algorithm in numpy,
#: 100 epochs, instead of umap-learn).
VERSION = "4"


# ------------------------------------------------------------------------------------- the recipe
def make_recipe(k_min: int = 2, k_max: int = 30, seed: int = SEED,
                fit_sample: int | None = None, gmm_sweep: bool = False) -> dict[str, Any]:
    """The unfitted estimators of the recipe, from this module's constants: reduce, cluster,
    project (the step's key is built from their parameters)."""
    sample = FIT_SAMPLE if fit_sample is None else fit_sample
    return {"reduce": Reducer(VARIANCE, MAX_DIMS, DECORRELATED, sample, seed),
            "cluster": ElbowClustering(k_min, k_max, KMEANS_INIT, COVARIANCE, SILHOUETTE_SAMPLE,
                                       sample, seed, gmm_sweep),
            "project": Projection(UMAP_NEIGHBOURS, UMAP_MIN_DIST, UMAP_EPOCHS, UMAP_LEARNING_RATE,
                                  sample, seed)}


@dataclass
class Fitted:
    """The fitted recipe on one feature matrix: its estimators and the reduced rows."""

    reducer: Reducer
    clusters: ElbowClustering
    projection: Projection
    reduced: np.ndarray
    timings: dict[str, float]


def fit_clustering(x: np.ndarray, k_min: int = 2, k_max: int = 30, seed: int = SEED,
                   progress: bool = True, name: str = "features",
                   fit_sample: int | None = None, gmm_sweep: bool = False) -> Fitted:
    """Reduce x, sweep KMeans and GMM over k_min..k_max, choose k, and project with UMAP; past
    `fit_sample` rows (default FIT_SAMPLE) the models are fitted on a seeded sample that size."""
    x = np.asarray(x, dtype=np.float64)
    if not np.isfinite(x).all():
        raise InfluenceError(f"{name}: the feature matrix has NaN or infinite values")
    recipe = make_recipe(k_min, k_max, seed, fit_sample, gmm_sweep)
    recipe["cluster"]._check(len(x), name)
    timings: dict[str, float] = {}
    # A fixed number of BLAS and OpenMP threads: KMeans' sums depend on it, and what ran before
    # in the process (a model's extraction, a head's fit) must not change the clusters.
    with threadpool_limits(THREADS):
        with timed(timings, "reduce"):
            y = recipe["reduce"].fit(x).transform(x)
        clusters = recipe["cluster"].fit(y, progress=progress, name=name)
        timings.update(clusters.timings_)
        with timed(timings, "umap"):
            projection = recipe["project"].fit(y, progress=progress, name=name)
    sample = fit_rows(len(x), seed, recipe["reduce"].fit_sample)
    recipe["reduce"].info_.update({
        "silhouette_rows": int(len(clusters.silhouette_rows_)),
        "fit_rows": len(x) if sample is None else int(len(sample)),
        "fit": ("all paintings" if sample is None else
                f"a seeded sample of {len(sample)} of {len(x)} paintings; the rest assigned by "
                "the fitted KMeans and GMM and placed by UMAP's transform")})
    return Fitted(recipe["reduce"], clusters, projection, y, timings)


# ------------------------------------------------------------------------------ labels, profiles
def label_agreement(labels: np.ndarray, catalog: pd.DataFrame) -> dict[str, dict[str, float]]:
    """NMI and ARI between clusters and each label field, over the rows where the label is known.
    The labels go in as integer codes: both scores ignore the labels' names, and scikit-learn's
    contingency table sorts strings several times slower than integers."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out: dict[str, dict[str, float]] = {}
    for f in FIELDS:
        if f not in catalog:
            continue
        known = catalog[f].notna().to_numpy()
        truth, names = pd.factorize(catalog[f][known].astype(str))
        if known.sum() < 2 or len(names) < 2:
            continue
        out[f] = {"nmi": float(normalized_mutual_info_score(truth, labels[known])),
                  "ari": float(adjusted_rand_score(truth, labels[known])),
                  "rows": int(known.sum())}
    return out


def profiles(labels: np.ndarray, catalog: pd.DataFrame, method: str) -> pd.DataFrame:
    """Per cluster and label field, each value's count, share in the cluster and lift.

    Shares are among the cluster's paintings whose label is known; lift is the share divided by
    the value's share in the whole collection (lift 3 = three times as common as overall).
    """
    parts = []
    for f in FIELDS:
        if f not in catalog:
            continue
        known = catalog[f].notna().to_numpy()
        if not known.any():
            continue
        df = pd.DataFrame({"cluster": labels[known], "value": catalog[f][known].astype(str)})
        counts = df.groupby(["cluster", "value"]).size().rename("count").reset_index()
        counts["share"] = counts["count"] / counts.groupby("cluster")["count"].transform("sum")
        overall = df["value"].value_counts(normalize=True)
        counts["collection_share"] = counts["value"].map(overall).astype(float)
        counts["lift"] = counts["share"] / counts["collection_share"]
        counts.insert(1, "field", f)
        parts.append(counts)
    columns = ["method", "cluster", "field", "value", "count", "share", "collection_share", "lift"]
    if not parts:
        return pd.DataFrame(columns=columns)
    out = pd.concat(parts, ignore_index=True)
    out.insert(0, "method", method)
    out = out.sort_values(["cluster", "field", "count", "value"],
                          ascending=[True, True, False, True], kind="stable")
    return out[columns].reset_index(drop=True)


def typical(labels: np.ndarray, distance: np.ndarray, image_ids: np.ndarray, method: str,
            top: int = TYPICAL) -> pd.DataFrame:
    """Each cluster's `top` members closest to its centre, rank 0 the most typical."""
    df = pd.DataFrame({"cluster": labels, "image_id": image_ids, "distance": distance})
    df = df.sort_values(["cluster", "distance", "image_id"], kind="stable")
    df = df.groupby("cluster", sort=True).head(top).copy()
    df["rank"] = df.groupby("cluster").cumcount()
    df.insert(0, "method", method)
    return df[["method", "cluster", "rank", "image_id", "distance"]].reset_index(drop=True)


def gmm_distance(y: np.ndarray, gmm: Any, labels: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row to the mean of its (hard) GMM component."""
    diff = y - gmm.means_[labels]
    return np.sqrt((diff ** 2 * gmm.precisions_[labels]).sum(axis=1)).astype(np.float32)


# ------------------------------------------------------------------------------ the run's stage
FILES = ("sweep.csv", "assignments.parquet", "responsibilities.npy", "profiles.parquet",
         "typical.parquet", "model.joblib", "elbow.png", "silhouette.png", "summary.json")


def cluster_step(run: Run, name: str, catalog: pd.DataFrame, k_min: int, k_max: int,
                 seed: int = SEED, gmm_sweep: bool = False) -> Step:
    """The step of one feature set's clustering: the recipe's parameters and this module's
    constants, the features' fit, and the catalog's rows with every label field (the labels
    shape only the profiles and agreement: a corrected one, or paintings added and removed,
    extend the fitted models instead of fitting them again)."""
    return estimator_step("cluster", name, make_recipe(k_min, k_max, seed, gmm_sweep=gmm_sweep),
                          sys.modules[__name__],
                          {"features": run.fit_key("extract", name)},
                          tuple(run.clusters_dir / name / f for f in FILES),
                          rows=Rows(catalog[["image_id", *(f for f in FIELDS if f in catalog)]]))


def cluster_features(run: Run, name: str, k_min: int = 2, k_max: int = 30, seed: int = SEED,
                     progress: bool = True, gmm_sweep: bool = False) -> dict[str, Any]:
    """Bring `RUN/clusters/<name>/` up to date; returns its summary (with `up_to_date`).

    The run protocol (`Run.step`) decides: the step's key covers the settings, this recipe's
    version, the features' extraction and every label the profiles read; paintings added or
    removed since the fit are assigned and placed by the fitted models (`_extend`) until the
    protocol refits them.
    """
    catalog = run.catalog()
    x = run.features(name)
    if len(x) != len(catalog):
        raise InfluenceError(f"features '{name}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run `extract` again")
    out = run.clusters_dir / name
    step = cluster_step(run, name, catalog, k_min, k_max, seed, gmm_sweep)
    report = run.step(step, lambda: _cluster(run, name, step, catalog, x, out, k_min, k_max,
                                             seed, progress, gmm_sweep),
                      lambda growth: _extend(run, catalog, x, out, growth))
    return {**read_json(out / "summary.json"), "up_to_date": report["up_to_date"]}


def _cluster(run: Run, name: str, step: Step, catalog: pd.DataFrame, x: np.ndarray, out: Path,
             k_min: int, k_max: int, seed: int, progress: bool,
             gmm_sweep: bool = False) -> dict[str, Any]:
    """Fit and write one feature set's clusters; returns what run.json records of them."""
    import joblib

    info = run.features_info(name)
    start = time.perf_counter()
    fitted = fit_clustering(np.asarray(x), k_min, k_max, seed, progress, name,
                            gmm_sweep=gmm_sweep)
    timings, c = fitted.timings, fitted.clusters
    ids = catalog["image_id"].astype(str).to_numpy()
    with timed(timings, "profiles"):
        tables = _tables(catalog, fitted.reduced, c.gmm_, c.k_, c.labels_, c.distance_,
                         c.responsibilities_, fitted.projection.embedding_)
    with timed(timings, "write"):
        model = {"reducer": fitted.reducer.pipeline_, "kmeans": c.kmeans_, "gmm": c.gmm_,
                 "projection": fitted.projection}
        for file, write in {"sweep.csv": lambda p: c.sweep_.to_csv(p, index=False),
                            "model.joblib": lambda p: joblib.dump(model, p)}.items():
            with atomic(out / file) as tmp:
                write(tmp)
        agreement, sizes = _write_tables(out, tables)
        plot_sweep(c.sweep_, c.k_, name, out)
    summary = {
        "features": name,
        "weights": info.get("weights"),
        "rows": len(ids),
        "k": c.k_,
        "choice": c.choice_,
        "gmm": {"k": c.k_, "covariance": c.covariance,
                "bic": round(float(c.sweep_.loc[c.sweep_["k"] == c.k_, "gmm_bic"].iloc[0]), 3),
                "bic_best_k": c.choice_.get("gmm_bic_best_k"),
                "converged": bool(c.gmm_.converged_), "iterations": int(c.gmm_.n_iter_),
                "start": "the KMeans solution at the same k"},
        "reduction": fitted.reducer.info_,
        "scores": c.scores_,
        "agreement": agreement,
        "sizes": sizes,
        "timings": {k: round(v, 3) for k, v in
                    {**timings, "total": time.perf_counter() - start}.items()},
        "config": step.params,
        "input": step.key,
        "features_catalog": info.get("catalog"),
        "fitted_rows": len(ids),
    }
    write_json(out / "summary.json", summary)
    return {"k": c.k_, "rows": len(ids), "timings": summary["timings"]}


def _extend(run: Run, catalog: pd.DataFrame, x: np.ndarray, out: Path,
            growth: Growth) -> dict[str, Any]:
    """Assign the paintings added since the fit with the fitted KMeans and GMM, place them on
    the map with the stored projection (among their nearest fitted rows), drop the removed
    ones, and recompute the tables that read every painting (profiles, typical members,
    agreement, sizes); the sweep and its scores stay those of the fit. Returns what run.json
    records."""
    import joblib

    start = time.perf_counter()
    model = joblib.load(run.verified(out / "model.joblib"))
    old = pd.read_parquet(run.verified(out / "assignments.parquet"))
    old_resp = np.load(run.verified(out / "responsibilities.npy"))
    summary = read_json(run.verified(out / "summary.json"))
    new = growth.new
    with threadpool_limits(THREADS):
        y = model["reducer"].transform(np.asarray(x, dtype=np.float64)).astype(np.float32)
        y_new = y[new]
        labels = model["kmeans"].predict(y_new).astype(np.int32) if new.any() else \
            np.empty(0, np.int32)
        centres = model["kmeans"].cluster_centers_
        resp = (model["gmm"].predict_proba(y_new).astype(np.float32) if new.any()
                else np.empty((0, old_resp.shape[1]), np.float32))
        placed = (model["projection"].transform(y_new) if new.any()
                  else np.empty((0, 2), np.float32))
    kmeans = growth.realign(old["kmeans"].to_numpy(np.int32), labels)
    distance = growth.realign(old["kmeans_distance"].to_numpy(np.float32),
                              np.linalg.norm(y_new - centres[labels], axis=1).astype(np.float32))
    responsibilities = growth.realign(old_resp, resp)
    embedding = growth.realign(old[["umap_x", "umap_y"]].to_numpy(np.float32), placed)
    tables = _tables(catalog, y, model["gmm"], int(summary["k"]), kmeans, distance,
                     responsibilities, embedding)
    summary["agreement"], summary["sizes"] = _write_tables(out, tables)
    summary["rows"] = len(catalog)
    summary["features_catalog"] = run.features_info(summary["features"]).get("catalog")
    summary["extended"] = {"added": int(new.sum()), "removed": len(growth.removed),
                           "seconds": round(time.perf_counter() - start, 3),
                           "rule": "added paintings assigned by the fitted KMeans and GMM and "
                                   "placed among their nearest fitted rows by the stored "
                                   "projection; the sweep and scores "
                                   f"are those of the fit on {summary.get('fitted_rows')} "
                                   "paintings"}
    write_json(out / "summary.json", summary)
    return {"k": summary["k"], "rows": len(catalog), "added": int(new.sum()),
            "removed": len(growth.removed)}


@dataclass
class Tables:
    """What `_write_tables` writes of one clustering, aligned with the catalog."""

    assignments: pd.DataFrame
    responsibilities: np.ndarray
    profiles: pd.DataFrame
    typical: pd.DataFrame
    agreement: dict[str, Any]
    sizes: dict[str, list[int]]


def _tables(catalog: pd.DataFrame, reduced: np.ndarray, gmm: Any, k: int, labels: np.ndarray,
            distance: np.ndarray, responsibilities: np.ndarray,
            embedding: np.ndarray) -> Tables:
    """The per-painting tables of a clustering and what is computed from every painting."""
    ids = catalog["image_id"].astype(str).to_numpy()
    gmm_labels = responsibilities.argmax(axis=1).astype(np.int32)
    gdist = gmm_distance(reduced, gmm, gmm_labels)
    assignments = pd.DataFrame({
        "image_id": ids, "kmeans": labels, "kmeans_distance": distance, "gmm": gmm_labels,
        "gmm_p": responsibilities.max(axis=1), "umap_x": embedding[:, 0],
        "umap_y": embedding[:, 1]})
    return Tables(
        assignments, responsibilities,
        pd.concat([profiles(labels, catalog, "kmeans"), profiles(gmm_labels, catalog, "gmm")],
                  ignore_index=True),
        pd.concat([typical(labels, distance, ids, "kmeans"),
                   typical(gmm_labels, gdist, ids, "gmm")], ignore_index=True),
        {"kmeans": label_agreement(labels, catalog), "gmm": label_agreement(gmm_labels, catalog)},
        {m: np.bincount(lab, minlength=k).tolist()
         for m, lab in (("kmeans", labels), ("gmm", gmm_labels))})


def _write_tables(out: Path, tables: Tables) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Write the per-painting tables atomically; returns (agreement, sizes) for the summary."""
    writers = {"assignments.parquet": lambda p: tables.assignments.to_parquet(p, index=False),
               "responsibilities.npy": lambda p: np.save(p, tables.responsibilities),
               "profiles.parquet": lambda p: tables.profiles.to_parquet(p, index=False),
               "typical.parquet": lambda p: tables.typical.to_parquet(p, index=False)}
    for file, write in writers.items():
        with atomic(out / file) as tmp:
            write(tmp)
    return tables.agreement, tables.sizes


def comparison(run: Run) -> pd.DataFrame:
    """One row per (features, method) over every clustered feature set; also written as CSV."""
    rows = []
    for name in clustered_features(run):
        s = read_json(run.clusters_dir / name / "summary.json")
        for method in METHODS:
            row: dict[str, Any] = {"features": name, "weights": s.get("weights"),
                                   "method": method, "k": s["k"], **s["scores"][method]}
            for f in FIELDS:
                a = s["agreement"][method].get(f, {})
                row[f"nmi_{f}"] = a.get("nmi", float("nan"))
                row[f"ari_{f}"] = a.get("ari", float("nan"))
            rows.append(row)
    columns = ["features", "weights", "method", "k", *SCORES,
               *[f"{m}_{f}" for f in FIELDS for m in ("nmi", "ari")]]
    table = pd.DataFrame(rows, columns=columns)
    if rows:
        with atomic(run.clusters_dir / "comparison.csv") as tmp:
            table.to_csv(tmp, index=False)
    return table
