"""UMAP's 2-D layout of a neighbour graph in numpy and scipy, without umap-learn or numba.

`umap-learn` imports pynndescent, whose numba functions are compiled eagerly at import, and
compiles its own layout on first use: about 24 of the 26 s `cluster` spent on the map in a fresh
install on two cores, for 3 s of work. The exact neighbour graph is computed by `Projection`
already, so what UMAP adds is the fuzzy graph, the spectral start and the layout's stochastic
gradient descent, which this module does with the same formulas (McInnes et al. 2018; umap-learn
0.5's `fuzzy_simplicial_set`, `spectral_layout`, `simplicial_set_embedding` and
`optimize_layout_euclidean`), one epoch's updates at a time as one vectorised step instead of
edge by edge: every edge due in an epoch is moved from the positions at the epoch's start (as
parallel UMAP implementations do), so the layout is the same for any number of threads.
"""

from __future__ import annotations

import functools

import numpy as np
import scipy.sparse
import scipy.sparse.csgraph
import scipy.sparse.linalg

#: Negative samples per positive one and the repulsion's weight: umap-learn's defaults.
NEGATIVE_SAMPLE_RATE = 5
REPULSION = 1.0
#: Each gradient coordinate is clipped to this, as umap-learn does.
CLIP = 4.0


@functools.cache
def ab_params(min_dist: float, spread: float = 1.0) -> tuple[float, float]:
    """(a, b) of the curve 1 / (1 + a d^(2b)) fitted to the min_dist/spread kernel (umap's
    `find_ab_params`)."""
    from scipy.optimize import curve_fit

    xv = np.linspace(0, spread * 3, 300)
    yv = np.where(xv < min_dist, 1.0, np.exp(-(xv - min_dist) / spread))
    (a, b), _ = curve_fit(lambda x, a, b: 1.0 / (1.0 + a * x ** (2 * b)), xv, yv)
    return float(a), float(b)


def fuzzy_graph(rows: np.ndarray, dists: np.ndarray, sigmas: np.ndarray,
                rhos: np.ndarray) -> scipy.sparse.coo_matrix:
    """The symmetric fuzzy neighbour graph (probabilistic union of each row's memberships) from
    each row's neighbours (column 0 the row itself), as umap's `fuzzy_simplicial_set`."""
    n, k = rows.shape
    gap = dists.astype(np.float64) - rhos[:, None]
    strength = np.where(gap <= 0, 1.0, np.exp(-np.maximum(gap, 0) / sigmas[:, None]))
    strength[rows == np.arange(n)[:, None]] = 0.0
    p = scipy.sparse.csr_matrix((strength.ravel(), (np.repeat(np.arange(n), k), rows.ravel())),
                                shape=(n, n))
    p.eliminate_zeros()
    transposed = p.T.tocsr()
    union = p + transposed - p.multiply(transposed)
    return union.tocoo()


def spectral_start(graph: scipy.sparse.coo_matrix, rng: np.random.Generator,
                   fallback: np.ndarray) -> np.ndarray:
    """The two smallest non-trivial eigenvectors of the graph's normalised Laplacian (umap's
    spectral start), scaled to [-10, 10] with a little noise; `fallback` (the rows' first two
    principal components) where the graph has several components or the solver fails."""
    n = graph.shape[0]
    components, _ = scipy.sparse.csgraph.connected_components(graph)
    start = None
    if components == 1 and n > 3:
        degree = np.asarray(graph.sum(axis=0)).ravel()
        scale = scipy.sparse.diags(1.0 / np.sqrt(degree))
        laplacian = scipy.sparse.identity(n) - scale @ graph.tocsr() @ scale
        try:
            values, vectors = scipy.sparse.linalg.eigsh(
                laplacian, 3, which="SM", ncv=max(7, int(np.sqrt(n))), tol=1e-4,
                v0=np.ones(n), maxiter=n * 5)
            start = vectors[:, np.argsort(values)[1:3]]
        except scipy.sparse.linalg.ArpackError:
            start = None
    if start is None:
        start = np.asarray(fallback, dtype=np.float64)[:, :2]
    start = start * (10.0 / np.abs(start).max())
    return start + rng.normal(scale=1e-4, size=start.shape)


def epochs_per_sample(weights: np.ndarray, n_epochs: int) -> np.ndarray:
    """How many epochs apart each edge is sampled: the strongest every epoch, an edge of
    weight w every max / w epochs (umap's `make_epochs_per_sample`)."""
    samples = n_epochs * (weights / weights.max())
    out = np.full(len(weights), -1.0)
    out[samples > 0] = n_epochs / samples[samples > 0]
    return out


def optimise(embedding: np.ndarray, head: np.ndarray, tail: np.ndarray, every: np.ndarray,
             n_epochs: int, a: float, b: float, learning_rate: float,
             rng: np.random.Generator) -> np.ndarray:
    """UMAP's stochastic gradient descent on the layout (attraction along sampled edges, moving
    both ends; repulsion from random rows), each epoch's updates computed together in float32."""
    emb = np.ascontiguousarray(embedding, dtype=np.float32)
    n = len(emb)
    a32, b32 = np.float32(a), np.float32(b)
    every_negative = every / NEGATIVE_SAMPLE_RATE
    next_sample = every.copy()
    next_negative = every_negative.copy()

    def add(at: np.ndarray, g: np.ndarray) -> np.ndarray:
        return np.stack([np.bincount(at, g[:, 0], minlength=n),
                         np.bincount(at, g[:, 1], minlength=n)], axis=1)

    for epoch in range(n_epochs):
        alpha = np.float32(learning_rate * (1.0 - epoch / n_epochs))
        due = np.flatnonzero(next_sample <= epoch)
        j, k = head[due], tail[due]
        diff = emb[j] - emb[k]
        d2 = np.einsum("ij,ij->i", diff, diff)
        power = d2 ** b32
        with np.errstate(divide="ignore", invalid="ignore"):
            pull = np.where(d2 > 0, (-2 * a32 * b32) * (power / d2) / (a32 * power + 1), 0)
        g = np.clip(pull[:, None] * diff, -CLIP, CLIP)
        g *= alpha
        step = add(j, g) - add(k, g)
        next_sample[due] += every[due]
        negatives = np.floor((epoch - next_negative[due]) / every_negative[due]).astype(np.int64)
        negatives = np.maximum(negatives, 0)
        next_negative[due] += negatives * every_negative[due]
        jn = np.repeat(j, negatives)
        kn = rng.integers(0, n, size=len(jn))
        diff = emb[jn] - emb[kn]
        d2 = np.einsum("ij,ij->i", diff, diff)
        push = (2 * REPULSION * b32) / ((np.float32(0.001) + d2) * (a32 * d2 ** b32 + 1))
        g = np.clip(push[:, None] * diff, -CLIP, CLIP)
        g[d2 == 0] = CLIP
        g[jn == kn] = 0
        g *= alpha
        step += add(jn, g)
        emb += step.astype(np.float32)
    return emb


def layout(rows: np.ndarray, dists: np.ndarray, sigmas: np.ndarray, rhos: np.ndarray,
           fallback: np.ndarray, n_epochs: int, min_dist: float, learning_rate: float,
           seed: int) -> np.ndarray:
    """The seeded 2-D UMAP layout of a neighbour graph (rows' own index in column 0)."""
    rng = np.random.default_rng(seed)
    graph = fuzzy_graph(rows, dists, sigmas, rhos)
    graph.data[graph.data < graph.data.max() / float(n_epochs)] = 0.0
    graph.eliminate_zeros()
    start = spectral_start(graph, rng, fallback)
    start = 10.0 * (start - start.min(axis=0)) / (start.max(axis=0) - start.min(axis=0))
    a, b = ab_params(min_dist)
    every = epochs_per_sample(graph.data, n_epochs)
    keep = every > 0
    return optimise(start, graph.row[keep], graph.col[keep], every[keep], n_epochs, a, b,
                    learning_rate, rng)
