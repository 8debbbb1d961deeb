"""Distributors decide where the runner runs a plan's partitions; this is the local one.

A distributor takes a `Plan` and returns an `Outcome`: the unreadable images with their
reasons, and each feature set's timings. The local distributor calls one `Runner` in this
process for every partition in turn (its reader decodes in worker processes); the Ray one
(`influence.extract.ray_distributor`) calls the same runner on a pool of actors.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from influence.extract.plan import Plan
from influence.extract.reader import default_workers
from influence.extract.runner import PartitionReport, Runner, Timings


@dataclass
class Outcome:
    """What a distributor's run found, gathered from its partitions' reports."""

    errors: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Timings] = field(default_factory=dict)

    def add(self, report: PartitionReport) -> None:
        self.errors.update(report.errors)
        for name, t in report.timings.items():
            self.timings.setdefault(name, Timings()).add(t)

    def finish(self, plan: Plan, wall: float) -> Outcome:
        """Set every feature set's wall time and fit time once all partitions are in."""
        for name in plan.names:
            t = self.timings.setdefault(name, Timings())
            t.wall, t.fit = wall, plan.fit_s.get(name, 0.0)
        return self


class LocalDistributor:
    """Every partition through one runner in this process, in order."""

    #: Partitions at least: one is enough in one process.
    min_partitions = 1

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers

    def __call__(self, plan: Plan, progress: bool = True) -> Outcome:
        outcome = Outcome()
        specs = plan.specs()
        begin = time.perf_counter()
        if specs:
            # Every core, unless OMP_NUM_THREADS says how many this process may use.
            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or 0)
                                  or os.cpu_count() or 1)
            runner = Runner(specs, workers=self.workers)
            with tqdm(total=plan.rows, desc=", ".join(s.name for s in specs), unit="row",
                      disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
                for partition in plan.partitions:
                    outcome.add(runner(partition, bar.update))
        return outcome.finish(plan, time.perf_counter() - begin)
