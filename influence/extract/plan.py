"""The plan: what an extraction has to do, made on the driver before any partition runs.

For each feature set: its step (what changes its features: weights, the extractor's code version
and weights record, the catalog's images), a reset of parts made differently, and the fit of an
extractor that needs one (once, on the driver; every worker then applies the saved fit). Then the
images some feature set still lacks, in catalog order, cut into partitions: each partition says
which of its images each feature set wants, so one read of it feeds every extractor.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
from tqdm.auto import tqdm

from influence.extract.reader import DecodedCache, Item, read
from influence.extract.store import FeatureStore
from influence.extractors import Extractor, get_extractor
from influence.extractors.weights import file_sha256
from influence.runs import (
    Rows,
    Run,
    Step,
    atomic,
    fingerprint,
    read_json,
    write_json,
)

#: Rows per part file: the most work an interrupted extraction can lose.
PART_SIZE = 256


def extraction_step(run: Run, name: str, weights: str | None = None) -> Step:
    """What changes features/<name>: the weights (file and checksum), the extractor's code version
    (its weights record included), and the catalog's images as its rows: an extractor fitted on
    the collection (pca, kpca) keeps its fit for paintings added or removed until the run
    protocol refits it; a network's rows are each their own."""
    store = FeatureStore(run, name)
    extractor = get_extractor(name, weights)
    located = extractor.located_weights()
    params: dict[str, Any] = {"weights": str(located) if located else "default"}
    if isinstance(located, Path):
        params["weights_sha256"] = file_sha256(located)
    return Step("extract", name, params, extractor.code_version(), {},
                (store.matrix_path, store.info_path)
                + ((store.state_path,) if extractor.needs_fit else ()),
                Rows(run.catalog()[["image_id"]], fitted=extractor.needs_fit))


@dataclass(frozen=True)
class Spec:
    """What a worker needs to build one feature set's mapper and write its parts."""

    name: str
    weights: str | None
    state: dict[str, Any] | None
    batch_size: int
    preprocess: Any
    writer: Any
    cache: DecodedCache | None
    #: Images the plan has for this set (all workers together).
    images: int | None = None


@dataclass(frozen=True)
class Partition:
    """Some images in catalog order, and which of them each feature set still needs."""

    index: int
    items: tuple[Item, ...]
    wanted: Mapping[str, frozenset[str]]

    @property
    def rows(self) -> int:
        return sum(len(ids) for ids in self.wanted.values())


@dataclass
class Plan:
    """An extraction's feature sets (steps, fitted extractors), the catalog, the partitions."""

    run: Run
    steps: dict[str, Step]
    weights: dict[str, str | None]
    extractors: dict[str, Extractor]
    items: list[Item]
    files: dict[str, str]
    pending: dict[str, list[str]]
    partitions: list[Partition]
    fit_s: dict[str, float] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.steps)

    @property
    def rows(self) -> int:
        return sum(p.rows for p in self.partitions)

    def specs(self) -> list[Spec]:
        """What every worker gets (the fitted states travel with it), for the pending sets."""
        out = []
        for name in self.names:
            if not self.pending[name]:
                continue
            ex = self.extractors[name]
            out.append(Spec(name, self.weights[name], ex.state(), ex.batch_size, ex.preprocess,
                            FeatureStore(self.run, name).writer, _cache(self.run, ex),
                            ex.images))
        return out


def _cache(run: Run, extractor: Extractor) -> DecodedCache | None:
    return DecodedCache(run, extractor.preprocess) if extractor.cache_decoded else None


def plan_extraction(run: Run, steps: Mapping[str, Step], weights: Mapping[str, str | None], *,
                    workers: int = 1, part_size: int = PART_SIZE, min_partitions: int = 1,
                    progress: bool = True) -> Plan:
    """Reset parts made differently, fit on the driver where needed, partition what is pending.

    Partitions hold at most `part_size` images, and are smaller where that gives fewer than
    `min_partitions` (so a cluster's workers all get some, and a kill loses little).
    """
    catalog = run.catalog()
    image_root = run.image_root()
    items = [Item(i, str(image_root / f)) for i, f in zip(catalog["image_id"], catalog["file"],
                                                          strict=True)]
    files = dict(zip(catalog["image_id"], catalog["file"], strict=True))
    extractors, pending, fit_s = {}, {}, {}
    for name, step in steps.items():
        store = FeatureStore(run, name)
        made_by = fingerprint([step.code, repr(sorted(step.params.items()))])
        if store.meta_path.exists() and read_json(store.meta_path).get("made_by") != made_by:
            store.reset("weights or extractor code changed")
        write_json(store.meta_path, {"made_by": made_by, "params": step.params,
                                     "code": step.code})
        extractor = extractors[name] = get_extractor(name, weights.get(name))
        if extractor.needs_fit:
            fit_s[name] = _fit(extractor, items, store, workers, progress)
        done = store.writer.done_ids()
        pending[name] = [it.image_id for it in items if it.image_id not in done]
        extractor.images = len(pending[name])
    wanted_any = {i for ids in pending.values() for i in ids}
    todo = [it for it in items if it.image_id in wanted_any]
    size = max(1, min(part_size, -(-len(todo) // min_partitions)))
    sets = {name: frozenset(ids) for name, ids in pending.items()}
    partitions = []
    for n, lo in enumerate(range(0, len(todo), size)):
        chunk = tuple(todo[lo:lo + size])
        ids = {it.image_id for it in chunk}
        wanted = {name: frozenset(ids & s) for name, s in sets.items() if ids & s}
        partitions.append(Partition(n, chunk, wanted))
    return Plan(run, dict(steps), dict(weights), extractors, items, files, pending, partitions,
                fit_s)


def _fit(extractor: Extractor, items: Sequence[Item], store: FeatureStore, workers: int,
         progress: bool) -> float:
    """Fit on a seeded sample (capped by the extractor), or reload an earlier fit; seconds spent.

    Every worker, the local process included, applies the saved fit: a freshly fitted
    scikit-learn PCA projects a few units in the last float32 place differently from its saved
    copy, and the engines must agree.
    """
    start = time.perf_counter()
    if not store.state_path.exists():
        rng = np.random.default_rng(0)
        sample = sorted(rng.choice(len(items), size=min(extractor.fit_sample or len(items),
                                                        len(items)), replace=False))
        chosen = [items[i] for i in sample]
        name = extractor.name
        batches = read(chosen, {name: extractor.preprocess},
                       {name: frozenset(it.image_id for it in chosen)}, extractor.batch_size,
                       workers, {name: c} if (c := _cache(store.run, extractor)) else None)
        bar = tqdm(batches, total=-(-len(chosen) // extractor.batch_size), unit="batch",
                   desc=f"{name} (fitting on {len(chosen)} images)", disable=not progress)
        extractor.fit(b.data[name] for b in bar if name in b.data)
        with atomic(store.state_path) as tmp:
            joblib.dump(extractor.state(), tmp)
    extractor.set_state(joblib.load(store.state_path))
    return time.perf_counter() - start
