"""Combined feature sets: several feature sets side by side, each L2-normalised and weighted.

A combined set is named by its parts, `mobilenet_v2+efficientnet_lite0+style`, each part
optionally weighted as `style@0.5`. Row i is the parts' rows i, each scaled to length `weight`,
concatenated: under cosine similarity every part counts by its weight whatever its dimension.
With the suffix `~w512` each (L2-normalised) part is first PCA-whitened to at most 512 dimensions,
fitted on the collection: whitening stops the few directions every painting shares from
dominating the similarity (on the shared collection it lifts leave-one-out artist retrieval of
the three-part set from 0.67 to 0.72; see the README). It is stored once, as
`features/<name>.npy` and `.json` like an extracted set (the whitening in `<name>.fit.joblib`), so
every stage reads it through `Run.features`; it is rebuilt when a part's features change. A query
is embedded by each part's own extractor and combined the same way (`CombinedExtractor`).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import joblib
import numpy as np
from PIL import Image
from sklearn.decomposition import PCA
from sklearn.preprocessing import normalize

from influence.extractors import Extractor
from influence.runs import (
    Growth,
    InfluenceError,
    Rows,
    Run,
    atomic,
    estimator_step,
    versions,
    write_json,
)

SEP = "+"
WEIGHT_SEP = "@"
WHITEN = re.compile(r"~w(\d+)$")
#: Rows combined at a time, so memory stays bounded on a large collection.
CHUNK = 8192
#: Version of the combining code (the run protocol rebuilds a set made by another; 2: exact
#: whitening from the covariance instead of a randomized SVD).
VERSION = "2"
#: Most paintings (a seeded sample) that a part's whitening is fitted on.
WHITEN_SAMPLE = 50_000


@dataclass(frozen=True)
class Part:
    name: str
    weight: float = 1.0

    def __str__(self) -> str:
        return self.name if self.weight == 1.0 else f"{self.name}{WEIGHT_SEP}{self.weight:g}"


def is_combined(name: str) -> bool:
    return SEP in name


def whitening(spec: str) -> int | None:
    """The most dimensions a part keeps after whitening (`~wK` suffix), None when not whitened."""
    found = WHITEN.search(spec)
    return int(found.group(1)) if found else None


def parse(spec: str) -> list[Part]:
    """The parts of `a+b@0.5+c` (a `~wK` suffix aside); InfluenceError on a malformed spec."""
    if whitening(spec) == 0:
        raise InfluenceError(f"combined feature set '{spec}': whiten to at least 1 dimension")
    parts = []
    for item in WHITEN.sub("", spec).split(SEP):
        name, sep, weight = item.strip().partition(WEIGHT_SEP)
        try:
            value = float(weight) if sep else 1.0
        except ValueError:
            value = float("nan")
        if not name or not np.isfinite(value) or value <= 0:
            raise InfluenceError(f"bad part '{item}' in combined feature set '{spec}' "
                                 f"(expected NAME or NAME{WEIGHT_SEP}WEIGHT, weight > 0)")
        parts.append(Part(name, value))
    names = [p.name for p in parts]
    if len(parts) < 2 or len(set(names)) != len(names):
        raise InfluenceError(f"combined feature set '{spec}' needs two or more different parts")
    return parts


def canonical(spec: str) -> str:
    """The stored name of a spec (weights of 1 dropped, weights written shortest)."""
    k = whitening(spec)
    return SEP.join(str(p) for p in parse(spec)) + (f"~w{k}" if k else "")


def combine(blocks: Sequence[np.ndarray], weights: Sequence[float],
            whiteners: Sequence[PCA | None] | None = None) -> np.ndarray:
    """Rows of each block L2-normalised, whitened if a whitener is given, L2-normalised again
    and scaled by the block's weight, concatenated (float32)."""
    whiteners = whiteners or [None] * len(blocks)
    out = []
    for block, weight, whitener in zip(blocks, weights, whiteners, strict=True):
        x = normalize(np.asarray(block, dtype=np.float32))
        if whitener is not None:
            x = normalize(whitener.transform(x).astype(np.float32))
        out.append(x * np.float32(weight))
    return np.concatenate(out, axis=1)


def fit_whitener(block: np.ndarray, k: int, solver: str | None = None, seed: int = 0) -> PCA:
    """PCA whitening of a part's L2-normalised rows to at most k dimensions (seeded sample);
    `solver` is scikit-learn's `svd_solver` (default: exact, as below), `seed` its random_state
    (`benchmarks/bench_whitening.py` compares the randomized solver's seeds)."""
    rows = np.arange(len(block))
    if len(rows) > WHITEN_SAMPLE:
        rows = np.sort(np.random.default_rng(0).choice(len(rows), WHITEN_SAMPLE, replace=False))
    x = normalize(np.asarray(block[rows], dtype=np.float32))
    k = min(k, x.shape[1], len(x) - 1)
    # With more rows than columns, exact components from the covariance's eigenvectors cost
    # less than the randomized SVD scikit-learn would choose for 512 of 1,280 dimensions.
    solver = solver or ("covariance_eigh" if len(x) > x.shape[1] else "auto")
    return PCA(n_components=k, whiten=True, svd_solver=solver, random_state=seed).fit(x)


def save_features(run: Run, name: str, matrix_rows: int, dim: int,
                  fill: Callable[[np.ndarray], None], info: dict[str, Any]) -> None:
    """Write features/<name>.npy (filled in place by `fill`) then its JSON, each atomically."""
    run.features_dir.mkdir(parents=True, exist_ok=True)
    path = run.features_dir / f"{name}.npy"
    tmp = path.with_name(path.name + ".tmp.npy")
    out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=(matrix_rows, dim))
    fill(out)
    out.flush()
    del out
    os.replace(tmp, path)
    write_json(run.features_dir / f"{name}.json", info)


def build_combined(run: Run, spec: str) -> dict[str, Any]:
    """Bring the combined set `spec` up to date in the run; returns its JSON (+ up_to_date)."""
    parts = parse(spec)
    name = canonical(spec)
    for part in parts:
        run.features(part.name)
    infos = [run.features_info(p.name) for p in parts]
    # Its rows are the catalog's: a whitened set keeps its whitening for paintings added or
    # removed (the run protocol refits it past REFIT_SHARE); an unwhitened one has no fit.
    step = estimator_step("extract", name, {}, sys.modules[__name__],
                          {p.name: run.fit_key("extract", p.name) for p in parts},
                          (run.features_dir / f"{name}.npy", run.features_dir / f"{name}.json")
                          + ((run.features_dir / f"{name}.fit.joblib",) if whitening(spec)
                             else ()),
                          {"parts": [[p.name, p.weight] for p in parts],
                           "whiten": whitening(spec)},
                          Rows(run.catalog()[["image_id"]], fitted=whitening(spec) is not None))
    report = run.step(step, lambda: _build(run, spec, name, parts, infos),
                      lambda growth: _extend(run, spec, name, parts, infos, growth))
    return {**run.features_info(name), "up_to_date": report["up_to_date"]}


def _extend(run: Run, spec: str, name: str, parts: list[Part], infos: list[dict[str, Any]],
            growth: Growth) -> dict[str, Any]:
    """The stored rows of the paintings kept, and the added ones combined with the kept
    whitening; returns what run.json records."""
    blocks = [run.features(p.name) for p in parts]
    _same_catalog(name, blocks, infos)
    state_path = run.features_dir / f"{name}.fit.joblib"
    whiteners = joblib.load(run.verified(state_path)) if whitening(spec) else None
    old = run.features(name)
    new = np.flatnonzero(growth.new)
    n = len(growth.after)

    def fill(out: np.ndarray) -> None:
        take = growth.take
        for start in range(0, n, CHUNK):
            chunk = take[start:start + CHUNK]
            kept = np.flatnonzero(chunk >= 0)
            out[start + kept] = old[chunk[kept]]
        for start in range(0, len(new), CHUNK):
            rows = new[start:start + CHUNK]
            out[rows] = combine([b[rows] for b in blocks], [p.weight for p in parts], whiteners)

    info = {**run.features_info(name), "rows": n, "catalog": infos[0].get("catalog"),
            "versions": versions()}
    save_features(run, name, n, old.shape[1], fill, info)
    return {"dim": int(old.shape[1]), "rows": n, "new_rows": len(new)}


def _same_catalog(name: str, blocks: list[np.ndarray], infos: list[dict[str, Any]]) -> None:
    if len({len(b) for b in blocks}) > 1 or len({i.get("catalog") for i in infos}) > 1:
        raise InfluenceError(f"the parts of '{name}' were made from different catalogs: "
                             f"run extract again first")


def _build(run: Run, spec: str, name: str, parts: list[Part],
           infos: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine the parts' stored rows into features/<name>; returns what run.json records."""
    blocks = [run.features(p.name) for p in parts]
    _same_catalog(name, blocks, infos)
    k = whitening(spec)
    whiteners = [fit_whitener(b, k) for b in blocks] if k else None
    dims = [w.n_components_ for w in whiteners] if whiteners else [b.shape[1] for b in blocks]
    n, dim = blocks[0].shape[0], int(sum(dims))
    weights = [p.weight for p in parts]
    state_path = run.features_dir / f"{name}.fit.joblib"
    if whiteners:
        with atomic(state_path) as tmp:
            joblib.dump(whiteners, tmp)
    else:
        state_path.unlink(missing_ok=True)

    def fill(out: np.ndarray) -> None:
        for start in range(0, n, CHUNK):
            out[start:start + CHUNK] = combine([b[start:start + CHUNK] for b in blocks], weights,
                                               whiteners)

    info = {"extractor": "combined", "dim": dim, "rows": n,
            "weights": "; ".join(f"{p.name}: {i.get('weights')}" for p, i in zip(parts, infos,
                                                                                 strict=True)),
            "parts": [{"name": p.name, "weight": p.weight, "dim": int(d),
                       "input_dim": int(b.shape[1]), "weights": i.get("weights"),
                       "extractor": i.get("extractor"), "fine_tuned_on": i.get("fine_tuned_on")}
                      for p, b, d, i in zip(parts, blocks, dims, infos, strict=True)],
            "whiten": k,
            "preprocessing": "each part L2-normalised per row"
                             + (f", PCA-whitened to at most {k} dims (fitted on the collection)"
                                f" and L2-normalised again" if k else "")
                             + ", scaled by its weight, concatenated",
            "config": {"combined": name}, "catalog": infos[0].get("catalog"),
            "versions": versions()}
    save_features(run, name, n, dim, fill, info)
    return {"dim": dim, "rows": n}


def ensure_combined(run: Run, names: Sequence[str]) -> list[dict[str, Any]]:
    """Build or refresh the combined sets among `names` (a stage may name one not yet built)."""
    return [build_combined(run, name) for name in names if is_combined(name)]


class CombinedExtractor(Extractor):
    """Embeds images with each part's extractor and combines them as the stored set was."""

    name = "combined"
    summary = "several feature sets, each L2-normalised and weighted, concatenated"

    def __init__(self, parts: Sequence[tuple[Extractor, float]],
                 whiteners: Sequence[PCA] | None = None) -> None:
        super().__init__(None)
        self.parts = list(parts)
        self.whiteners = whiteners
        self.weights_used = "; ".join(f"{e.name}: {e.weights_used}" for e, _ in self.parts)

    @property
    def preprocess(self) -> Callable[[Image.Image], tuple[Any, ...]]:
        return _EachPart(tuple(e.preprocess for e, _ in self.parts))

    @property
    def dim(self) -> int:
        if self.whiteners:
            return int(sum(w.n_components_ for w in self.whiteners))
        return sum(e.dim for e, _ in self.parts)

    def load(self) -> CombinedExtractor:
        for extractor, _ in self.parts:
            extractor.load()
        return self

    def transform(self, batch: Sequence[Any]) -> np.ndarray:
        """`batch` holds one preprocessed batch per part, in the parts' order."""
        return combine([e.transform(b) for (e, _), b in zip(self.parts, batch, strict=True)],
                       [w for _, w in self.parts], self.whiteners)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        return combine([e.embed(images) for e, _ in self.parts], [w for _, w in self.parts],
                       self.whiteners)


@dataclass(frozen=True)
class _EachPart:
    """Every part's preprocessing of one image (picklable)."""

    steps: tuple[Callable[[Image.Image], Any], ...]

    def __call__(self, image: Image.Image) -> tuple[Any, ...]:
        return tuple(step(image) for step in self.steps)
