"""Answering "what does this picture resemble?" from a built run: the `similar` command and the app.

`Explorer` loads one feature set's extractor (with the weights the run used, so a query is
embedded exactly as the collection was), its faiss index, every head trained on it and its
clustering, once; then answers many queries. It holds no per-query state, so threads may share it.

Default feature set: among the indexed ones, the one whose leave-one-out artist retrieval
(recorded by `index`: how often a painting's own artist is among its 5 most similar artists) is
best, where several are within `CLOSE` of the best the cheapest of them per query (the extractor's
declared `cost`); where none is recorded, the cheapest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
from PIL import Image, ImageOps

from influence.combine import CombinedExtractor
from influence.extractors import Extractor, extractor_class, get_extractor
from influence.extractors import set_threads as set_model_threads
from influence.images import BadImage, check_size, open_rgb, to_rgb
from influence.index import (
    ARTIST_POOL,
    index_paths,
    indexed_features,
    load_index,
    normalise,
    rank_artists,
    search,
    set_threads,
)
from influence.readers import Clustering, Head, load_clustering, load_head, trained_heads
from influence.runs import InfluenceError, Run, read_json

__all__ = ["Explorer", "collect_queries", "default_features", "trained_heads"]

#: Leave-one-out artist retrieval rates closer than this count as equal.
CLOSE = 0.01
#: Files in a query folder that are treated as images.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp"})
#: Clusters below this responsibility are not listed.
MIN_CLUSTER_P = 0.01


def default_features(run: Run) -> str:
    """The feature set `similar` searches when none is named (rule in the module docstring)."""
    names = indexed_features(run)
    if not names:
        raise InfluenceError(f"run {run.root} has no index: run `index` first")
    quality = {}
    for name in names:
        loo = read_json(index_paths(run, name)[1]).get("leave_one_out") or {}
        if "artist_top5" in loo:
            quality[name] = loo["artist_top5"]
    by_preference = sorted(names, key=lambda n: (query_cost(n), n))
    if quality:
        best = max(quality.values())
        return next(n for n in by_preference if quality.get(n, -1.0) >= best - CLOSE)
    return by_preference[0]


def query_cost(features: str) -> float:
    """Milliseconds an extractor declares per one-image query (infinite if it is not one)."""
    try:
        return extractor_class(features).cost
    except InfluenceError:
        return float("inf")


def load_extractor(run: Run, features: str) -> Extractor:
    """The extractor that made a run's features, with the same weights and fitted state."""
    info = run.features_info(features)
    if "parts" in info:
        state = run.features_dir / f"{features}.fit.joblib"
        whiteners = (joblib.load(run.verified(run.require(state, f"combine {features}")))
                     if info.get("whiten") else None)
        return CombinedExtractor([(load_extractor(run, p["name"]), p["weight"])
                                  for p in info["parts"]], whiteners)
    config = info.get("config", {})
    if "imported" in config:
        raise NoExtractor(f"feature set '{features}' was imported from {config['imported']}: "
                          f"it has no extractor to embed a new image")
    extractor = get_extractor(config.get("extractor", features), config.get("weights_spec"))
    if extractor.needs_fit:
        state = run.features_dir / f"{features}.fit.joblib"
        run.require(state, f"extract --extractors {features}")
        extractor.set_state(joblib.load(run.verified(state)))
    return extractor.load()


class NoExtractor(InfluenceError):
    """A feature set that can answer for its indexed paintings but cannot embed a new image."""


#: Paintings of each set a closest-pairs comparison reads (an artist rarely has more).
MAX_PAIR_SET = 1000
def _load_clustering(run: Run, features: str) -> Clustering | None:
    """The run's clustering of this feature set, or None when it is not clustered."""
    try:
        return load_clustering(run, features)
    except InfluenceError:
        return None


def _value(v: Any) -> Any:
    return None if pd.isna(v) else v


class Explorer:
    """Nearest paintings, similar artists, head predictions and clusters for images (see module)."""

    def __init__(self, run: Run, features: str | None = None, flip: bool = False) -> None:
        self.run = run
        #: Test-time augmentation: a query is embedded as itself and mirrored left-right; the
        #: search uses the mean of the two vectors and the heads the mean of their probabilities.
        self.flip = flip
        self.features: str = features or default_features(run)
        if self.features not in indexed_features(run):
            raise InfluenceError(f"feature set '{self.features}' is not indexed in run "
                                 f"{run.root}: run `index --features {self.features}` first")
        # One image per query: one thread each for faiss and the extractor's runtime (set
        # explicitly, since the two share an OpenMP runtime only when torch was loaded first);
        # spare cores serve other requests, and two threads on a busy 2-core machine made a
        # query ~30x slower.
        set_threads(1)
        set_model_threads(1)
        catalog = run.catalog()
        self._index = load_index(run, self.features)
        if self._index.ntotal != len(catalog):
            raise InfluenceError(f"index '{self.features}' has {self._index.ntotal} paintings but "
                                 f"the catalog has {len(catalog)}: run `index` again")
        self._ids = catalog["image_id"].to_numpy(dtype=object)
        self._files = catalog["file"].to_numpy(dtype=object)
        self._artists = catalog["artist"].to_numpy(dtype=object)
        self._titles = catalog["title"].to_numpy(dtype=object)
        self._row = {image_id: i for i, image_id in enumerate(self._ids)}
        self._x = run.features(self.features)
        try:
            self._extractor: Extractor | None = load_extractor(run, self.features)
            self._no_extractor = ""
        except NoExtractor as e:
            self._extractor, self._no_extractor = None, str(e)
        self._heads: list[Head] = [load_head(run, t, f) for t, f in trained_heads(run)
                                   if f == self.features]
        self._clustering = _load_clustering(run, self.features)

    @property
    def targets(self) -> list[str]:
        """Targets of the heads this explorer predicts."""
        return [h.target for h in self._heads]

    def query(self, image: Path | str | bytes | Image.Image, k: int = 10) -> dict[str, Any]:
        """The `similar --json` object for one image; a bad image gives {"query", "error"}."""
        start = time.perf_counter()
        label = _label(image)
        if self._extractor is None:
            return {"query": label, "error": self._no_extractor}
        try:
            picture = _open(image)
        except BadImage as e:
            return {"query": label, "error": str(e)}
        views = [picture, ImageOps.mirror(picture)] if self.flip else [picture]
        x = self._extractor.embed(views)
        mean = x.mean(axis=0, keepdims=True)
        clusters = (None if self._clustering is None
                    else self._clustering.responsibilities(mean)[0])
        placed = None if self._clustering is None else self._clustering.place(mean)
        answer = self._answer(label, x, k, None, clusters, start)
        # Where the image lands on the feature set's map (None: the run's clustering is older).
        answer["position"] = (None if placed is None
                              else [round(float(v), 4) for v in placed[0]])
        answer["seconds"] = round(time.perf_counter() - start, 4)
        return answer

    def neighbours_of(self, image_id: str, k: int = 10) -> dict[str, Any]:
        """The same answer for an indexed painting, the painting itself left out."""
        start = time.perf_counter()
        if image_id not in self._row:
            raise InfluenceError(f"no painting with image_id '{image_id}' in run {self.run.root}")
        row = self._row[image_id]
        x = np.asarray(self._x[row:row + 1], dtype=np.float32)
        clusters = (self._clustering.responsibilities_of(np.array([row]))[0]
                    if self._clustering is not None else None)
        return self._answer(image_id, x, k, row, clusters, start)

    def like(self, image_ids: Sequence[str], k: int = 12) -> list[dict[str, Any]]:
        """Paintings like a set of indexed ones: the search with the mean of their normalised
        vectors, the set itself left out; [{"image_id", "score"}], best first."""
        rows = sorted({self._row[i] for i in image_ids if i in self._row})
        if not rows:
            return []
        x = normalise(np.asarray(self._x[rows], dtype=np.float32)).mean(axis=0, keepdims=True)
        scores, found = search(self._index, x, k + len(rows))
        chosen = set(rows)
        return [{"image_id": self._ids[r], "score": round(float(s), 4)}
                for s, r in zip(scores[0], found[0], strict=True)
                if r >= 0 and r not in chosen][:k]

    def closest_pairs(self, a: Sequence[str], b: Sequence[str], k: int = 6
                      ) -> list[dict[str, Any]]:
        """The k most alike pairs of paintings, one of `a` and one of `b` (cosine of their
        features), each painting in one pair at most, best first: [{"a", "b", "score"}].
        Each set is cut to its first MAX_PAIR_SET known paintings."""
        rows_a = [self._row[i] for i in a if i in self._row][:MAX_PAIR_SET]
        rows_b = [self._row[i] for i in b if i in self._row][:MAX_PAIR_SET]
        if not rows_a or not rows_b:
            return []
        sims = (normalise(np.asarray(self._x[rows_a], dtype=np.float32))
                @ normalise(np.asarray(self._x[rows_b], dtype=np.float32)).T)
        used_a, used_b, out = set(), set(), []
        for flat in np.argsort(-sims, axis=None, kind="stable"):
            i, j = divmod(int(flat), len(rows_b))
            if i in used_a or j in used_b or rows_a[i] == rows_b[j]:
                continue
            used_a.add(i)
            used_b.add(j)
            out.append({"a": self._ids[rows_a[i]], "b": self._ids[rows_b[j]],
                        "score": round(float(sims[i, j]), 4)})
            if len(out) == k:
                break
        return out

    def _answer(self, label: str, x: np.ndarray, k: int, exclude: int | None,
                clusters: np.ndarray | None, start: float) -> dict[str, Any]:
        if k < 1:
            raise InfluenceError(f"k must be at least 1, got {k}")
        query = normalise(x).mean(axis=0, keepdims=True)
        scores, rows = search(self._index, query, max(k, ARTIST_POOL) + (exclude is not None))
        keep = (rows[0] >= 0) & (rows[0] != (-1 if exclude is None else exclude))
        scores, rows = scores[0][keep], rows[0][keep]
        paintings = [{"image_id": self._ids[r], "file": self._files[r],
                      "artist": _value(self._artists[r]), "title": _value(self._titles[r]),
                      "score": round(float(s), 4)} for s, r in zip(scores[:k], rows[:k],
                                                                     strict=True)]
        artists = rank_artists(scores[:ARTIST_POOL], self._artists[rows[:ARTIST_POOL]])[:k]
        predictions = {h.target: h.predict(x, average=True)[0] for h in self._heads}
        listed = []
        if clusters is not None:
            order = np.argsort(-clusters, kind="stable")
            listed = [{"cluster": int(c), "p": round(float(clusters[c]), 4)} for c in order
                      if clusters[c] >= MIN_CLUSTER_P]
        return {"query": label, "features": self.features, "paintings": paintings,
                "artists": artists, "predictions": predictions, "clusters": listed,
                "seconds": round(time.perf_counter() - start, 4)}


def _label(image: Path | str | bytes | Image.Image) -> str:
    if isinstance(image, bytes):
        return "upload"
    if isinstance(image, Image.Image):
        return getattr(image, "filename", "") or "image"
    return str(image)


def _open(image: Path | str | bytes | Image.Image) -> Image.Image:
    """An RGB image from a path, bytes or a PIL image, within the same limits as extraction."""
    if not isinstance(image, Image.Image):
        return open_rgb(image if isinstance(image, bytes) else Path(image))
    check_size(image)
    return to_rgb(image)


def collect_queries(paths: Sequence[str]) -> list[tuple[str, Path | None]]:
    """Query images from files and folders: (label, path), path None for an empty folder.

    A folder contributes its image files (by suffix, see IMAGE_SUFFIXES), recursively, sorted.
    Other paths are passed on as they are, so a missing file becomes that query's error.
    """
    out: list[tuple[str, Path | None]] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file()
                           and p.suffix.lower() in IMAGE_SUFFIXES
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            out.extend((str(p), p) for p in files)
            if not files:
                out.append((arg, None))
        else:
            out.append((arg, path))
    return out
