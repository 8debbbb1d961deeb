"""Clustering and projection of a feature matrix, as scikit-learn estimators.

- `Reducer`: centre, standardise unless the columns are already decorrelated components, PCA to
  the fewest dimensions keeping `variance` of it, at most `max_dims`;
- `ElbowClustering`: KMeans for every k in a range (inertia, silhouette, Davies-Bouldin,
  Calinski-Harabasz), k chosen by Kneedle on the inertia curve, and a diagonal Gaussian mixture
  started from the KMeans solution at the chosen k (with `gmm_sweep`, at every k for its BIC);
- `Projection`: a seeded 2-D UMAP on exact neighbours, new rows placed from their neighbours'
  places.

Each has a `fit_sample`: past that many rows it is fitted on a seeded sample that size and every
row is then assigned or placed by the fitted models. `progress` and `name` are arguments of `fit`,
not parameters: they change what is shown, never what is learnt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from sklearn.base import BaseEstimator, ClusterMixin, TransformerMixin
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.metrics import (
    calinski_harabasz_score,
    davies_bouldin_score,
    pairwise_distances,
)
from sklearn.mixture import GaussianMixture
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.validation import check_is_fitted

from influence.runs import InfluenceError, timed

SCORES = ("silhouette", "davies_bouldin", "calinski_harabasz")


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


def spectrum(cov: np.ndarray) -> np.ndarray:
    """Share of the variance along every principal component, largest first, from the columns'
    covariance: what choosing the number of components needs, at a fraction of a PCA's cost."""
    values = np.clip(np.linalg.eigvalsh(cov)[::-1], 0.0, None)
    return values / values.sum()


def silhouette(d: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette from a precomputed distance matrix (as scikit-learn's `silhouette_score`
    with `metric="precomputed"`): each row's summed distance to every cluster by one matrix
    product, so a sweep over 29 values of k costs a fraction of a second instead of seconds.
    A row alone in its cluster scores 0."""
    n = len(labels)
    k = int(labels.max()) + 1
    members = np.zeros((n, k), dtype=d.dtype)
    members[np.arange(n), labels] = 1
    sums = (d @ members).astype(np.float64)
    counts = members.sum(axis=0).astype(np.float64)
    own = counts[labels]
    a = sums[np.arange(n), labels] / np.maximum(own - 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / counts
    mean[:, counts == 0] = np.inf
    mean[np.arange(n), labels] = np.inf
    b = mean.min(axis=1)
    s = np.where(own > 1, (b - a) / np.maximum(np.maximum(a, b), np.finfo(float).tiny), 0.0)
    return float(s.mean())


def fit_rows(n: int, seed: int, limit: int) -> np.ndarray | None:
    """The sorted seeded sample of rows models are fitted on, or None to fit on all n."""
    if n <= limit:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, limit, replace=False))


def _sampled(x: np.ndarray, seed: int, limit: int) -> np.ndarray:
    rows = fit_rows(len(x), seed, limit)
    return x if rows is None else x[rows]


class Reducer(TransformerMixin, BaseEstimator):
    """StandardScaler (centring only for decorrelated columns) + PCA keeping `variance`."""

    def __init__(self, variance: float = 0.90, max_dims: int = 50, decorrelated: float = 0.05,
                 fit_sample: int = 20_000, random_state: int = 0) -> None:
        self.variance = variance
        self.max_dims = max_dims
        self.decorrelated = decorrelated
        self.fit_sample = fit_sample
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None) -> Reducer:
        x = _sampled(np.asarray(X, dtype=np.float64), self.random_state, self.fit_sample)
        # One covariance gives both the columns' correlation (standardise or not) and the
        # spectrum that chooses the number of components.
        cov = np.cov(x, rowvar=False)
        std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
        live = std > 0
        corr = cov[np.ix_(live, live)] / np.outer(std[live], std[live])
        off = np.abs(corr[~np.eye(len(corr), dtype=bool)])
        mean_corr = float(off.mean()) if off.size else 0.0
        standardise = mean_corr >= self.decorrelated
        scaler = StandardScaler(with_std=standardise).fit(x)
        z = scaler.transform(x)
        limit = min(x.shape[0] - 1, x.shape[1])
        cumulative = np.cumsum(spectrum(corr if standardise else cov))
        dims = min(int(np.searchsorted(cumulative, self.variance)) + 1, self.max_dims, limit)
        # Exact components from the covariance's eigenvectors: with far more rows than columns
        # this costs less than a randomized SVD and keeps more of the variance.
        solver = "covariance_eigh" if x.shape[0] > x.shape[1] else "full"
        pca = PCA(n_components=dims, random_state=self.random_state, svd_solver=solver).fit(z)
        self.pipeline_: Pipeline = make_pipeline(scaler, pca)
        self.info_ = {
            "standardised": bool(standardise),
            "mean_abs_correlation": round(mean_corr, 4),
            "input_dims": int(x.shape[1]),
            "pca_dims": int(dims),
            "explained_variance": round(float(pca.explained_variance_ratio_.sum()), 4),
            "rule": (f"standardise unless columns are already decorrelated (mean |corr| < "
                     f"{self.decorrelated}); PCA to the fewest dims keeping "
                     f"{self.variance:.0%} of the variance, at most {self.max_dims}"),
        }
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        check_is_fitted(self)
        x = np.atleast_2d(np.asarray(X, dtype=np.float64))
        return self.pipeline_.transform(x).astype(np.float32)


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


def fit_mixture(y: np.ndarray, labels: np.ndarray, k: int, covariance: str,
                seed: int) -> GaussianMixture:
    """A GMM started from a KMeans partition. A component that collapses onto a few
    near-identical rows (small collections, large k) is refitted with its variances floored at
    a thousandth of the features' mean variance instead of failing the stage."""
    for reg in (1e-6, 1e-3 * float(y.var(axis=0).mean()) + 1e-6):
        weights, means, precisions = _gmm_start(y, labels, k, reg)
        gmm = GaussianMixture(n_components=k, covariance_type=covariance, reg_covar=reg,
                              weights_init=weights, means_init=means,
                              precisions_init=precisions, random_state=seed)
        try:
            return gmm.fit(y)
        except ValueError:
            continue
    raise InfluenceError(f"the Gaussian mixture with k = {k} does not fit these features")


def scores(y: np.ndarray, labels: np.ndarray, sil_rows: np.ndarray,
           sil_d: np.ndarray) -> dict[str, float]:
    """Silhouette (on `sil_rows`, distances `sil_d`), Davies-Bouldin and Calinski-Harabasz of a
    labelling (NaN if one cluster)."""
    if len(np.unique(labels)) < 2 or len(np.unique(labels[sil_rows])) < 2:
        return {s: float("nan") for s in SCORES}
    return {"silhouette": silhouette(sil_d, labels[sil_rows]),
            "davies_bouldin": float(davies_bouldin_score(y, labels)),
            "calinski_harabasz": float(calinski_harabasz_score(y, labels))}


class ElbowClustering(ClusterMixin, BaseEstimator):
    """KMeans over k_min..k_max, k chosen by Kneedle on inertia (best silhouette if the curve
    has no elbow; fixed if k_min = k_max), and a Gaussian mixture started from the chosen k's
    KMeans. The mixture never chooses k, so by default it is fitted at that k only (it cost as
    much as the whole KMeans sweep at every k); `gmm_sweep` fits one at every k for its BIC curve.

    Learnt: `sweep_` (one row per k), `k_`, `choice_`, `kmeans_`, `gmm_`, `labels_`,
    `distance_` (to the KMeans centre), `responsibilities_`, `gmm_labels_`, `scores_`.
    """

    def __init__(self, k_min: int = 2, k_max: int = 30, n_init: int = 3,
                 covariance: str = "diag", silhouette_sample: int = 8000,
                 fit_sample: int = 20_000, random_state: int = 0,
                 gmm_sweep: bool = False) -> None:
        self.k_min = k_min
        self.k_max = k_max
        self.n_init = n_init
        self.covariance = covariance
        self.silhouette_sample = silhouette_sample
        self.fit_sample = fit_sample
        self.random_state = random_state
        self.gmm_sweep = gmm_sweep

    def _check(self, n: int, name: str) -> None:
        if self.k_min < 2 or self.k_max < self.k_min:
            raise InfluenceError(f"k range {self.k_min}..{self.k_max} is empty: need "
                                 "2 <= k-min <= k-max")
        if self.k_max - self.k_min == 1:
            raise InfluenceError("give at least three k values to find an elbow, or "
                                 "k-min = k-max to fix k")
        if self.k_max >= n:
            raise InfluenceError(f"{name}: k-max {self.k_max} needs more than {n} paintings")

    def fit(self, X: np.ndarray, y: Any = None, *, progress: bool = False,
            name: str = "features") -> ElbowClustering:
        from tqdm.auto import tqdm

        x = np.asarray(X, dtype=np.float32)
        n, seed = len(x), self.random_state
        self._check(n, name)
        sample = fit_rows(n, seed, self.fit_sample)
        x_fit = x if sample is None else x[sample]
        self.timings_: dict[str, float] = {}
        with timed(self.timings_, "scores"):
            rows = np.arange(n)
            if n > self.silhouette_sample:
                rows = np.sort(np.random.default_rng(seed).choice(n, self.silhouette_sample,
                                                                  replace=False))
            sil_d = pairwise_distances(x[rows]).astype(np.float32)
        self.silhouette_rows_ = rows
        ks = list(range(self.k_min, self.k_max + 1))
        sweep, kms = [], {}
        for k in tqdm(ks, desc=f"{name}: kmeans k={self.k_min}..{self.k_max}",
                      disable=not progress, leave=False):
            with timed(self.timings_, "kmeans_sweep"):
                km = KMeans(n_clusters=k, n_init=self.n_init, random_state=seed).fit(x_fit)
                labels = km.labels_ if sample is None else km.predict(x)
            with timed(self.timings_, "scores"):
                s = scores(x, labels, rows, sil_d)
            sweep.append({"k": k, "inertia": float(km.inertia_), **s})
            kms[k] = km
        gmms = {}
        for row in sweep:
            row["gmm_bic"] = float("nan")
        if self.gmm_sweep:
            for k, row in zip(tqdm(ks, desc=f"{name}: gmm k={self.k_min}..{self.k_max}",
                                   disable=not progress, leave=False), sweep, strict=True):
                with timed(self.timings_, "gmm_sweep"):
                    gmms[k] = fit_mixture(x_fit, kms[k].labels_, k, self.covariance, seed)
                    row["gmm_bic"] = float(gmms[k].bic(x_fit))
        self.sweep_ = pd.DataFrame(sweep, columns=["k", "inertia", *SCORES, "gmm_bic"])
        self.k_, self.choice_ = self._choose(self.sweep_)
        if self.k_ not in gmms:
            with timed(self.timings_, "gmm"):
                gmms[self.k_] = fit_mixture(x_fit, kms[self.k_].labels_, self.k_,
                                            self.covariance, seed)
            self.sweep_.loc[self.sweep_["k"] == self.k_, "gmm_bic"] = float(
                gmms[self.k_].bic(x_fit))
        self.kmeans_, self.gmm_ = kms[self.k_], gmms[self.k_]
        self.labels_ = self.predict(x)
        self.distance_ = np.linalg.norm(x - self.kmeans_.cluster_centers_[self.labels_],
                                        axis=1).astype(np.float32)
        self.responsibilities_ = self.predict_proba(x)
        self.gmm_labels_ = self.responsibilities_.argmax(axis=1).astype(np.int32)
        with timed(self.timings_, "scores"):
            chosen = self.sweep_.loc[self.sweep_["k"] == self.k_].iloc[0]
            self.scores_ = {"kmeans": {s: float(chosen[s]) for s in SCORES},
                            "gmm": scores(x, self.gmm_labels_, rows, sil_d)}
        return self

    def _choose(self, sweep: pd.DataFrame) -> tuple[int, dict[str, Any]]:
        """The chosen k and how it was chosen (with the best k by silhouette and by BIC)."""
        best_silhouette = int(sweep["k"][int(sweep["silhouette"].idxmax())])
        if self.k_min == self.k_max:
            k, choice = self.k_min, {"method": "fixed (k-min = k-max)"}
        else:
            knee = kneedle(sweep["k"], sweep["inertia"])
            if knee >= 0:
                k = int(sweep["k"][knee])
                choice = {"method": "kneedle on the KMeans inertia curve (Satopaa et al. 2011): "
                                    "the k farthest below the chord joining the curve's ends, "
                                    "both axes scaled to [0, 1]"}
            else:
                k = best_silhouette
                choice = {"method": "best silhouette (the inertia curve has no elbow)"}
        out = {**choice, "k_range": [self.k_min, self.k_max],
               "silhouette_best_k": best_silhouette}
        if self.gmm_sweep:
            out["gmm_bic_best_k"] = int(sweep["k"][int(sweep["gmm_bic"].idxmin())])
        return k, out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """KMeans cluster of each row."""
        check_is_fitted(self, "kmeans_")
        return self.kmeans_.predict(np.asarray(X, dtype=np.float32)).astype(np.int32)

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """GMM soft membership of each row, each row summing to one."""
        check_is_fitted(self, "gmm_")
        return self.gmm_.predict_proba(np.asarray(X, dtype=np.float32)).astype(np.float32)


def smooth_knn_dist(dists: np.ndarray, k: float, n_iter: int = 64, tolerance: float = 1e-5,
                    min_scale: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, rhos) of UMAP's `smooth_knn_dist` (local connectivity 1, bandwidth 1) in numpy,
    every row's binary search at once: placing a grown run's few new rows with umap's own cost
    its import and a numba load or compile (3.5 s of a 1% growth's `cluster` on the loaded
    2-core box) for microseconds of work; the fit's layout (`influence.estimators.layout`) uses
    it too. Column 0 is taken as the row itself, as umap does."""
    d = np.asarray(dists, dtype=np.float64)
    positive = d > 0
    first = np.argmax(positive, axis=1)
    rho = np.where(positive.any(axis=1), d[np.arange(len(d)), first], 0.0)
    target = np.log2(k)
    lo, hi, mid = np.zeros(len(d)), np.full(len(d), np.inf), np.ones(len(d))
    searching = np.ones(len(d), dtype=bool)
    gap = d[:, 1:] - rho[:, None]
    for _ in range(n_iter):
        psum = np.exp(-np.maximum(gap, 0) / mid[:, None]).sum(axis=1)
        searching &= np.abs(psum - target) >= tolerance
        if not searching.any():
            break
        above = searching & (psum > target)
        below = searching & ~(psum > target)
        hi = np.where(above, mid, hi)
        lo = np.where(below, mid, lo)
        mid = np.where(above | (below & np.isfinite(hi)), (lo + hi) / 2,
                       np.where(below, mid * 2, mid))
    floor = min_scale * np.where(rho > 0, d.mean(axis=1), d.mean())
    return np.maximum(mid, floor).astype(np.float32), rho.astype(np.float32)


class Projection(TransformerMixin, BaseEstimator):
    """A seeded 2-D UMAP on exact nearest neighbours (`influence.estimators.layout`: UMAP's
    graph, start and layout in numpy, without umap-learn's numba compilation).

    The neighbour graph is computed exactly (brute force on the reduced rows), so no approximate
    search index is built or stored. New rows, and past `fit_sample` the rows left out of the
    fit, are placed where UMAP starts new points: at the mean of their `n_neighbors` nearest
    fitted rows' places, weighted by UMAP's fuzzy membership strengths.
    Learnt: `embedding_` (every row), `fitted_` (the rows fitted on) and `placed_` (their places).
    """

    #: Mean-shift steps of a new row's place (it settles in a few).
    SHIFTS = 5

    def __init__(self, n_neighbors: int = 15, min_dist: float = 0.1, n_epochs: int = 100,
                 learning_rate: float = 0.15, fit_sample: int = 20_000,
                 random_state: int = 0) -> None:
        self.n_neighbors = n_neighbors
        self.min_dist = min_dist
        self.n_epochs = n_epochs
        self.learning_rate = learning_rate
        self.fit_sample = fit_sample
        self.random_state = random_state

    def fit(self, X: np.ndarray, y: Any = None, *, progress: bool = False,
            name: str = "features") -> Projection:
        from influence.estimators.layout import layout

        x = np.asarray(X, dtype=np.float32)
        sample = fit_rows(len(x), self.random_state, self.fit_sample)
        fit = x if sample is None else x[sample]
        k = min(self.n_neighbors, len(fit) - 1)
        # Each row's own index first, at distance 0, as UMAP expects of a neighbour graph.
        rows, dists = self._neighbours(fit, fit, k - 1)
        sigmas, rhos = smooth_knn_dist(dists, float(k))
        # The reduced rows are principal components: their first two are the start where the
        # graph has several components (umap-learn lays those out one by one).
        placed = layout(rows, dists, sigmas, rhos, fit[:, :2], self.n_epochs, self.min_dist,
                        self.learning_rate, self.random_state)
        self.fitted_, self.placed_ = fit, placed
        self.bandwidth_ = float(np.median(np.linalg.norm(placed[rows[:, 1:]] - placed[:, None],
                                                         axis=2))) or 1.0
        if sample is None:
            self.embedding_ = placed
        else:
            self.embedding_ = np.empty((len(x), 2), dtype=np.float32)
            self.embedding_[sample] = placed
            rest = np.setdiff1d(np.arange(len(x)), sample)
            self.embedding_[rest] = self.transform(x[rest])
        return self

    @staticmethod
    def _neighbours(query: np.ndarray, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Exact (rows, Euclidean distances) of each query row's k + 1 nearest data rows."""
        from sklearn.neighbors import NearestNeighbors

        found = NearestNeighbors(n_neighbors=k + 1, algorithm="brute").fit(data)
        dists, rows = found.kneighbors(query)
        return rows, dists.astype(np.float32)

    def transform(self, X: np.ndarray) -> np.ndarray:
        """Places of new rows: UMAP's starting point for new data (see the class)."""
        check_is_fitted(self, "placed_")
        x = np.asarray(X, dtype=np.float32).reshape(-1, self.fitted_.shape[1])
        k = min(self.n_neighbors, len(self.fitted_) - 1)
        rows, dists = self._neighbours(x, self.fitted_, k - 1)
        sigmas, rhos = smooth_knn_dist(dists, float(k))
        weights = np.exp(-np.maximum(dists - rhos[:, None], 0) / sigmas[:, None])
        places = self.placed_[rows]
        at = places[:, 0]
        for _ in range(self.SHIFTS):
            near = np.exp(-((places - at[:, None]) ** 2).sum(axis=2) / (2 * self.bandwidth_ ** 2))
            w = weights * near
            at = np.einsum("nk,nkd->nd", w / w.sum(axis=1, keepdims=True), places)
        return at.astype(np.float32)
