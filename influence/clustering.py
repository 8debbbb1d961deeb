"""Clustering of one feature set: reduce, sweep KMeans over k, fit a GMM, score, profile and map.

The recipe (`fit_clustering`), per feature matrix:

1. reduce: centre, standardise the columns unless they are already decorrelated components, then
   PCA to the fewest dimensions keeping `VARIANCE` of the variance, at most `MAX_DIMS`;
2. KMeans for every k in the range, recording inertia, silhouette, Davies-Bouldin and
   Calinski-Harabasz; the k is chosen by Kneedle on the inertia curve (`kneedle`);
3. a diagonal-covariance Gaussian mixture at every k, started from that k's KMeans solution,
   recording BIC; the one at the chosen k gives each painting's soft membership;
4. a seeded 2-D UMAP of the reduced features.

`cluster_features` runs it on a run's feature set and writes `RUN/clusters/<features>/` (see
docs/DESIGN.md); `load_clustering` reads that back for the app and the search without
recomputing anything.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from influence.catalog import LABEL_FIELDS
from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    column_fingerprints,
    read_json,
    timed,
    write_json,
)

SEED = 0
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
#: Paintings closest to each cluster's centre kept in typical.parquet.
TYPICAL = 12
METHODS = ("kmeans", "gmm")
FIELDS = LABEL_FIELDS
SCORES = ("silhouette", "davies_bouldin", "calinski_harabasz")


# ------------------------------------------------------------------------------------- the recipe
def kneedle(x: Sequence[float], y: Sequence[float]) -> int:
    """Index of the elbow of a decreasing convex curve, by Kneedle (Satopaa et al., 2011).

    Both axes are scaled to [0, 1]; the elbow is the point farthest below the straight line
    joining the curve's ends (the maximum of Kneedle's difference curve). A curve with no point
    below that line has no elbow: -1.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 3:
        raise InfluenceError("an elbow needs at least three points on the curve")
    xn = (x - x[0]) / (x[-1] - x[0])
    span = y.max() - y.min()
    if span <= 0:
        return -1
    yn = (y - y.min()) / span
    difference = (1.0 - yn) - xn
    best = int(np.argmax(difference))
    return best if difference[best] > 1e-12 else -1


def explained_variance_ratio(z: np.ndarray) -> np.ndarray:
    """Share of the variance along every principal component of z, largest first.

    Eigenvalues only (of the covariance when paintings outnumber dimensions): what choosing the
    number of components needs, at a fraction of the cost of a full PCA.
    """
    if z.shape[0] > z.shape[1]:
        values = np.linalg.eigvalsh(np.cov(z, rowvar=False))[::-1]
    else:
        values = np.linalg.svd(z - z.mean(axis=0), compute_uv=False) ** 2
    values = np.clip(values, 0.0, None)
    return values / values.sum()


def make_reducer(x: np.ndarray, seed: int = SEED) -> tuple[Any, dict[str, Any]]:
    """A fitted StandardScaler + PCA pipeline for x, and a description of what it does."""
    from sklearn.decomposition import PCA
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    std = x.std(axis=0)
    live = std > 0
    corr = np.corrcoef(x[:, live], rowvar=False) if live.sum() > 1 else np.ones((1, 1))
    off = np.abs(corr[~np.eye(len(corr), dtype=bool)])
    mean_corr = float(off.mean()) if off.size else 0.0
    standardise = mean_corr >= DECORRELATED
    scaler = StandardScaler(with_std=standardise).fit(x)
    z = scaler.transform(x)
    limit = min(x.shape[0] - 1, x.shape[1])
    cumulative = np.cumsum(explained_variance_ratio(z))
    dims = min(int(np.searchsorted(cumulative, VARIANCE)) + 1, MAX_DIMS, limit)
    pca = PCA(n_components=dims, random_state=seed, svd_solver="randomized").fit(z)
    info = {
        "standardised": bool(standardise),
        "mean_abs_correlation": round(mean_corr, 4),
        "input_dims": int(x.shape[1]),
        "pca_dims": int(dims),
        "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
        "rule": (f"standardise unless columns are already decorrelated (mean |corr| < "
                 f"{DECORRELATED}); PCA to the fewest dims keeping {VARIANCE:.0%} of the "
                 f"variance, at most {MAX_DIMS}"),
    }
    return make_pipeline(scaler, pca), info


def _gmm_start(y: np.ndarray, labels: np.ndarray, k: int,
               reg: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weights, means and diagonal precisions of a KMeans partition, to start EM from."""
    counts = np.bincount(labels, minlength=k).astype(float)
    sums = np.zeros((k, y.shape[1]))
    np.add.at(sums, labels, y)
    squares = np.zeros((k, y.shape[1]))
    np.add.at(squares, labels, y.astype(float) ** 2)
    safe = np.maximum(counts, 1)[:, None]
    means = sums / safe
    var = np.maximum(squares / safe - means ** 2, 0) + reg
    return counts / counts.sum(), means, 1.0 / var


def _fit_gmm(y: np.ndarray, labels: np.ndarray, k: int, seed: int) -> Any:
    """A diagonal GMM started from a KMeans partition. A component that collapses onto a few
    near-identical paintings (small collections, large k) is refitted with its variances
    floored at a thousandth of the features' mean variance instead of failing the stage."""
    from sklearn.mixture import GaussianMixture

    for reg in (1e-6, 1e-3 * float(y.var(axis=0).mean()) + 1e-6):
        weights, means, precisions = _gmm_start(y, labels, k, reg)
        gmm = GaussianMixture(n_components=k, covariance_type=COVARIANCE, reg_covar=reg,
                              weights_init=weights, means_init=means,
                              precisions_init=precisions, random_state=seed)
        try:
            return gmm.fit(y)
        except ValueError:
            continue
    raise InfluenceError(f"the Gaussian mixture with k = {k} does not fit these features")


def fit_rows(n: int, seed: int = SEED, limit: int | None = None) -> np.ndarray | None:
    """The sorted seeded sample of rows models are fitted on, or None to fit on all n."""
    limit = FIT_SAMPLE if limit is None else limit
    if n <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _silhouette_plan(y: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows silhouette is scored on (all, or a seeded sample) and their distance matrix."""
    from sklearn.metrics import pairwise_distances

    n = len(y)
    rows = np.arange(n)
    if n > SILHOUETTE_SAMPLE:
        rows = np.sort(np.random.default_rng(seed).choice(n, SILHOUETTE_SAMPLE, replace=False))
    return rows, pairwise_distances(y[rows])


@dataclass
class Result:
    """What `fit_clustering` found for one feature matrix (everything stays in memory)."""

    reducer: Any
    reduction: dict[str, Any]
    reduced: np.ndarray
    sweep: pd.DataFrame
    k: int
    choice: dict[str, Any]
    kmeans: Any
    gmm: Any
    kmeans_labels: np.ndarray
    kmeans_distance: np.ndarray
    responsibilities: np.ndarray
    gmm_labels: np.ndarray
    scores: dict[str, dict[str, float]]
    umap: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)


def fit_clustering(x: np.ndarray, k_min: int = 2, k_max: int = 30, seed: int = SEED,
                   progress: bool = True, name: str = "features",
                   fit_sample: int | None = None) -> Result:
    """Reduce x, sweep KMeans and GMM over k_min..k_max, choose k, and project with UMAP; past
    `fit_sample` rows (default FIT_SAMPLE) the models are fitted on a seeded sample that size."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score
    from tqdm.auto import tqdm

    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    if not np.isfinite(x).all():
        raise InfluenceError(f"{name}: the feature matrix has NaN or infinite values")
    if k_min < 2 or k_max < k_min:
        raise InfluenceError(f"k range {k_min}..{k_max} is empty: need 2 <= k-min <= k-max")
    if k_max - k_min == 1:
        raise InfluenceError("give at least three k values to find an elbow, or k-min = k-max "
                             "to fix k")
    if k_max >= n:
        raise InfluenceError(f"{name}: k-max {k_max} needs more than {n} paintings")
    timings: dict[str, float] = {}
    sample = fit_rows(n, seed, fit_sample)
    with timed(timings, "reduce"):
        reducer, reduction = make_reducer(x if sample is None else x[sample], seed)
        y = reducer.transform(x).astype(np.float32)
    y_fit = y if sample is None else y[sample]
    with timed(timings, "scores"):
        sil_rows, sil_d = _silhouette_plan(y, seed)
    reduction["silhouette_rows"] = int(len(sil_rows))
    reduction["fit_rows"] = int(len(y_fit))
    reduction["fit"] = ("all paintings" if sample is None else
                        f"a seeded sample of {len(y_fit)} of {n} paintings; the rest assigned by "
                        "the fitted KMeans and GMM and placed by UMAP's transform")
    ks = list(range(k_min, k_max + 1))
    rows, kms, gmms = [], {}, {}
    for k in tqdm(ks, desc=f"{name}: kmeans k={k_min}..{k_max}", disable=not progress,
                  leave=False):
        with timed(timings, "kmeans_sweep"):
            km = KMeans(n_clusters=k, n_init=KMEANS_INIT, random_state=seed).fit(y_fit)
            labels = km.labels_ if sample is None else km.predict(y)
        with timed(timings, "scores"):
            rows.append({
                "k": k, "inertia": float(km.inertia_),
                "silhouette": float(silhouette_score(sil_d, labels[sil_rows],
                                                     metric="precomputed")),
                "davies_bouldin": float(davies_bouldin_score(y, labels)),
                "calinski_harabasz": float(calinski_harabasz_score(y, labels)),
            })
        kms[k] = km
    for k, row in zip(tqdm(ks, desc=f"{name}: gmm k={k_min}..{k_max}", disable=not progress,
                           leave=False), rows, strict=True):
        with timed(timings, "gmm_sweep"):
            gmm = _fit_gmm(y_fit, kms[k].labels_, k, seed)
            row["gmm_bic"] = float(gmm.bic(y_fit))
        gmms[k] = gmm
    sweep = pd.DataFrame(rows, columns=["k", "inertia", *SCORES, "gmm_bic"])
    if k_min == k_max:
        k, choice = k_min, {"method": "fixed (k-min = k-max)"}
    else:
        knee = kneedle(sweep["k"], sweep["inertia"])
        if knee >= 0:
            k = int(sweep["k"][knee])
            choice = {"method": "kneedle on the KMeans inertia curve (Satopaa et al. 2011): the "
                                "k farthest below the chord joining the curve's ends, both axes "
                                "scaled to [0, 1]"}
        else:
            k = int(sweep["k"][int(sweep["silhouette"].idxmax())])
            choice = {"method": "best silhouette (the inertia curve has no elbow)"}
    choice["k_range"] = [k_min, k_max]
    choice["silhouette_best_k"] = int(sweep["k"][int(sweep["silhouette"].idxmax())])
    choice["gmm_bic_best_k"] = int(sweep["k"][int(sweep["gmm_bic"].idxmin())])
    km, gmm = kms[k], gmms[k]
    kmeans_labels = (km.labels_ if sample is None else km.predict(y)).astype(np.int32)
    distance = np.linalg.norm(y - km.cluster_centers_[kmeans_labels], axis=1)
    resp = gmm.predict_proba(y)
    gmm_labels = resp.argmax(axis=1).astype(np.int32)
    with timed(timings, "scores"):
        scores = {"kmeans": {s: float(sweep.loc[sweep["k"] == k, s].iloc[0]) for s in SCORES},
                  "gmm": _scores(y, gmm_labels, sil_rows, sil_d)}
    with timed(timings, "umap"):
        coords = umap_2d(y, seed, progress, name, sample)
    return Result(reducer, reduction, y, sweep, k, choice, km, gmm, kmeans_labels,
                  distance.astype(np.float32), resp.astype(np.float32), gmm_labels, scores,
                  coords, timings)


def _scores(y: np.ndarray, labels: np.ndarray, sil_rows: np.ndarray,
            sil_d: np.ndarray) -> dict[str, float]:
    """Silhouette, Davies-Bouldin and Calinski-Harabasz of a labelling (NaN if one cluster)."""
    from sklearn.metrics import calinski_harabasz_score, davies_bouldin_score, silhouette_score

    nan = float("nan")
    if len(np.unique(labels)) < 2 or len(np.unique(labels[sil_rows])) < 2:
        return {s: nan for s in SCORES}
    return {"silhouette": float(silhouette_score(sil_d, labels[sil_rows], metric="precomputed")),
            "davies_bouldin": float(davies_bouldin_score(y, labels)),
            "calinski_harabasz": float(calinski_harabasz_score(y, labels))}


def umap_2d(y: np.ndarray, seed: int = SEED, progress: bool = True,
            name: str = "features", sample: np.ndarray | None = None) -> np.ndarray:
    """A seeded 2-D UMAP of the reduced features (single-threaded, so it is reproducible);
    with `sample`, fitted on those rows and the others placed by UMAP's transform."""
    import umap

    fit = y if sample is None else y[sample]
    reducer = umap.UMAP(n_components=2, n_neighbors=min(UMAP_NEIGHBOURS, len(fit) - 1),
                        min_dist=UMAP_MIN_DIST, random_state=seed, n_jobs=1,
                        tqdm_kwds={"disable": not progress, "desc": f"{name}: umap",
                                   "leave": False})
    placed = reducer.fit_transform(fit).astype(np.float32)
    if sample is None:
        return placed
    coords = np.empty((len(y), 2), dtype=np.float32)
    coords[sample] = placed
    rest = np.setdiff1d(np.arange(len(y)), sample)
    coords[rest] = reducer.transform(y[rest])
    return coords


# ------------------------------------------------------------------------------ labels, profiles
def label_agreement(labels: np.ndarray, catalog: pd.DataFrame) -> dict[str, dict[str, float]]:
    """NMI and ARI between clusters and each label field, over the rows where the label is known."""
    from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

    out: dict[str, dict[str, float]] = {}
    for f in FIELDS:
        if f not in catalog:
            continue
        known = catalog[f].notna().to_numpy()
        truth = catalog[f][known].astype(str).to_numpy()
        if known.sum() < 2 or len(np.unique(truth)) < 2:
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
def stage_config(k_min: int, k_max: int, seed: int = SEED) -> dict[str, Any]:
    """Everything that shapes the result: a change to any of it reclusters."""
    return {"k_min": k_min, "k_max": k_max, "seed": seed, "variance": VARIANCE,
            "max_dims": MAX_DIMS, "decorrelated": DECORRELATED, "kmeans_init": KMEANS_INIT,
            "covariance": COVARIANCE, "silhouette_sample": SILHOUETTE_SAMPLE,
            "umap_neighbours": UMAP_NEIGHBOURS, "umap_min_dist": UMAP_MIN_DIST,
            "typical": TYPICAL, "fit_sample": FIT_SAMPLE}


#: Version of this stage's recipe: bump it when a code change changes the clusters.
VERSION = "1"
FILES = ("sweep.csv", "assignments.parquet", "responsibilities.npy", "profiles.parquet",
         "typical.parquet", "model.joblib", "elbow.png", "silhouette.png", "summary.json")


def cluster_features(run: Run, name: str, k_min: int = 2, k_max: int = 30, seed: int = SEED,
                     progress: bool = True) -> dict[str, Any]:
    """Bring `RUN/clusters/<name>/` up to date; returns its summary (with `up_to_date`).

    The run protocol (`Run.step`) decides: the step's key covers the settings, this recipe's
    version, the features' extraction and every label the profiles read.
    """
    catalog = run.catalog()
    x = run.features(name)
    if len(x) != len(catalog):
        raise InfluenceError(f"features '{name}' have {len(x)} rows but the catalog has "
                             f"{len(catalog)}: run `extract` again")
    out = run.clusters_dir / name
    # The labels shape the profiles and agreement: a corrected attribution reuses every feature
    # row (they are keyed by image id) but must still redo this stage.
    step = Step("cluster", name, stage_config(k_min, k_max, seed), VERSION,
                {**column_fingerprints(catalog, FIELDS),
                 "features": run.step_key("extract", name)},
                tuple(out / f for f in FILES))
    report = run.step(step, lambda: _cluster(run, name, step, catalog, x, out, k_min, k_max,
                                             seed, progress))
    return {**read_json(out / "summary.json"), "up_to_date": report["up_to_date"]}


def _cluster(run: Run, name: str, step: Step, catalog: pd.DataFrame, x: np.ndarray, out: Path,
             k_min: int, k_max: int, seed: int, progress: bool) -> dict[str, Any]:
    """Fit and write one feature set's clusters; returns what run.json records of them."""
    import joblib

    info = run.features_info(name)
    start = time.perf_counter()
    result = fit_clustering(np.asarray(x), k_min, k_max, seed, progress, name)
    timings = result.timings
    ids = catalog["image_id"].astype(str).to_numpy()
    with timed(timings, "profiles"):
        agreement = {"kmeans": label_agreement(result.kmeans_labels, catalog),
                     "gmm": label_agreement(result.gmm_labels, catalog)}
        prof = pd.concat([profiles(result.kmeans_labels, catalog, "kmeans"),
                          profiles(result.gmm_labels, catalog, "gmm")], ignore_index=True)
        gdist = gmm_distance(result.reduced, result.gmm, result.gmm_labels)
        typ = pd.concat([typical(result.kmeans_labels, result.kmeans_distance, ids, "kmeans"),
                         typical(result.gmm_labels, gdist, ids, "gmm")], ignore_index=True)
        sizes = {m: np.bincount(lab, minlength=result.k).tolist()
                 for m, lab in (("kmeans", result.kmeans_labels), ("gmm", result.gmm_labels))}
    with timed(timings, "write"):
        assignments = pd.DataFrame({
            "image_id": ids, "kmeans": result.kmeans_labels,
            "kmeans_distance": result.kmeans_distance, "gmm": result.gmm_labels,
            "gmm_p": result.responsibilities.max(axis=1),
            "umap_x": result.umap[:, 0], "umap_y": result.umap[:, 1],
        })
        writers = {"sweep.csv": lambda p: result.sweep.to_csv(p, index=False),
                   "assignments.parquet": lambda p: assignments.to_parquet(p, index=False),
                   "responsibilities.npy": lambda p: np.save(p, result.responsibilities),
                   "profiles.parquet": lambda p: prof.to_parquet(p, index=False),
                   "typical.parquet": lambda p: typ.to_parquet(p, index=False),
                   "model.joblib": lambda p: joblib.dump({"reducer": result.reducer,
                                                          "kmeans": result.kmeans,
                                                          "gmm": result.gmm}, p)}
        for file, write in writers.items():
            with atomic(out / file) as tmp:
                write(tmp)
        plot_sweep(result.sweep, result.k, name, out)
    summary = {
        "features": name,
        "weights": info.get("weights"),
        "rows": len(ids),
        "k": result.k,
        "choice": result.choice,
        "gmm": {"k": result.k, "covariance": COVARIANCE,
                "bic_best_k": result.choice["gmm_bic_best_k"],
                "converged": bool(result.gmm.converged_), "iterations": int(result.gmm.n_iter_),
                "start": "the KMeans solution at the same k"},
        "reduction": result.reduction,
        "scores": result.scores,
        "agreement": agreement,
        "sizes": sizes,
        "timings": {k: round(v, 3) for k, v in
                    {**timings, "total": time.perf_counter() - start}.items()},
        "config": step.params,
        "input": step.key,
        "features_catalog": info.get("catalog"),
    }
    write_json(out / "summary.json", summary)
    return {"k": result.k, "rows": len(ids), "timings": summary["timings"]}


def plot_sweep(sweep: pd.DataFrame, k: int, name: str, out: Path) -> None:
    """elbow.png (inertia and GMM BIC against k) and silhouette.png, chosen k marked."""
    _plot_against_k(sweep, k, ("inertia", "KMeans inertia", "inertia"),
                    ("gmm_bic", "GMM BIC", "tab:green"), f"{name}: elbow",
                    f"chosen k = {k} (Kneedle)", out / "elbow.png")
    _plot_against_k(sweep, k, ("silhouette", "silhouette", "silhouette (higher is better)"),
                    ("davies_bouldin", "Davies-Bouldin (lower is better)", "tab:purple"),
                    f"{name}: silhouette against k", f"chosen k = {k}", out / "silhouette.png")


def _plot_against_k(sweep: pd.DataFrame, k: int, left: tuple[str, str, str],
                    right: tuple[str, str, str], title: str, chosen: str, path: Path) -> None:
    """One sweep column (column, legend, axis label) and another on a twin axis (column, axis
    label, colour) against k, with the chosen k marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    column, legend, ylabel = left
    fig, ax = plt.subplots(figsize=(6.4, 4))
    ax.plot(sweep["k"], sweep[column], "o-", ms=3, label=legend)
    ax.axvline(k, color="tab:red", ls="--", label=chosen)
    ax.set(xlabel="k (clusters)", ylabel=ylabel, title=title)
    column, ylabel, colour = right
    twin = ax.twinx()
    twin.plot(sweep["k"], sweep[column], "s-", ms=3, color=colour, alpha=0.6)
    twin.set_ylabel(ylabel, color=colour)
    ax.legend(loc="upper right")
    fig.tight_layout()
    with atomic(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


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


# ---------------------------------------------------------------------------------- reading back
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
        import joblib

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
