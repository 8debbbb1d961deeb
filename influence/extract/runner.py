"""The runner: one partition read once, mapped by every extractor that needs it, and written.

As clip-retrieval's runner, it is built from picklable parts (the specs: each feature set's
weights, fitted state, preprocessing, writer and cache) and called once per partition; the
distributors only decide where it is called. So errors (unreadable images, with their reasons),
timings and resume are the same whichever distributor runs it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from influence.extract.mapper import FeatureMapper
from influence.extract.plan import Partition, Spec
from influence.extract.reader import read
from influence.extractors import set_threads


@dataclass
class Timings:
    """Where extraction time goes (as clip-retrieval logs it): reading is shared by the feature
    sets of a run, model and write time are each set's own, summed over partitions, and so over
    the `processes` runners that ran side by side (one runner's share: `model / processes`)."""

    read: float = 0.0
    model: float = 0.0
    write: float = 0.0
    fit: float = 0.0
    wall: float = 0.0
    images: int = 0
    processes: int = 1

    def add(self, other: Timings) -> None:
        for name in ("read", "model", "write", "fit", "images"):
            setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float]:
        total = self.wall or (self.read + self.model + self.write)
        parts = {"read_wait_s": self.read, "model_s": self.model, "write_s": self.write}
        return {**{k: round(v, 3) for k, v in parts.items() if v}, "fit_s": round(self.fit, 3),
                "wall_s": round(total, 3), "images": self.images, "processes": self.processes,
                "images_per_s": round(self.images / total, 2) if total else None}


@dataclass
class PartitionReport:
    """What one partition's run found: unreadable images with reasons, timings per set."""

    index: int
    rows: int
    errors: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Timings] = field(default_factory=dict)


class Runner:
    """Reader -> mappers -> writers over one partition; models load on the first call, once."""

    def __init__(self, specs: Sequence[Spec], workers: int = 0, threads: int | None = None,
                 batch_size: int | None = None) -> None:
        self.specs = {s.name: s for s in specs}
        self.workers, self.threads = workers, threads
        # One read batch feeds every mapper; each mapper cuts it to its own batch size.
        self.batch_size = batch_size or max(s.batch_size for s in specs)
        self._mappers: dict[str, FeatureMapper] | None = None

    @property
    def mappers(self) -> dict[str, FeatureMapper]:
        if self._mappers is None:
            set_threads(self.threads)
            self._mappers = {n: FeatureMapper(n, s.weights, s.state, s.images)
                             for n, s in self.specs.items()}
        return self._mappers

    def __call__(self, partition: Partition,
                 tick: Callable[[int], object] | None = None) -> PartitionReport:
        mappers = self.mappers
        wanted = {n: partition.wanted[n] for n in self.specs if n in partition.wanted}
        timings = {n: Timings() for n in wanted}
        report = PartitionReport(partition.index, partition.rows, timings=timings)
        done: dict[str, list[dict[str, np.ndarray]]] = {n: [] for n in wanted}
        read_s = 0.0
        start = time.perf_counter()
        batches = read(partition.items, {n: self.specs[n].preprocess for n in wanted}, wanted,
                       self.batch_size, self.workers,
                       {n: self.specs[n].cache for n in wanted if self.specs[n].cache})
        for batch in batches:
            read_s += time.perf_counter() - start
            report.errors.update(batch.errors)
            for name, ids in batch.ids.items():
                t = time.perf_counter()
                done[name].append(mappers[name]({"image_id": ids, "pixels": batch.data[name]}))
                timings[name].model += time.perf_counter() - t
                timings[name].images += len(ids)
            if tick is not None:
                tick(batch.rows)
            start = time.perf_counter()
        for name, rows in done.items():
            timings[name].read = read_s
            if rows:
                t = time.perf_counter()
                self.specs[name].writer.write({k: np.concatenate([r[k] for r in rows])
                                               for k in rows[0]})
                timings[name].write += time.perf_counter() - t
        return report
