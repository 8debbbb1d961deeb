"""The Ray distributor: the plan's partitions through the same `Runner`, on a pool of actors.

Each actor builds one runner (its models load once per actor) and runs whole partitions: read
once, every extractor's mapper, one part file per feature set, and a report of the unreadable
images and timings, exactly as the local distributor's runner does. `ray.init(address=...)`
joins an existing cluster; without an address a local Ray starts. Needs the optional extra:
`pip install influence[ray]`. This module imports the core; the core never imports it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from influence.extract.distributor import Outcome
from influence.extract.plan import Partition, Plan, Spec
from influence.extract.runner import PartitionReport, Runner
from influence.runs import InfluenceError

#: At least this many partitions, however few images are pending: work for every actor.
MIN_PARTITIONS = 8


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray: `address` of a cluster (None starts a local Ray with `num_cpus`),
    runner actors (`concurrency`, `batch_size` of a read, `cpus_per_actor`)."""

    address: str | None = None
    num_cpus: int | None = None
    concurrency: int | None = None
    batch_size: int | None = None
    cpus_per_actor: float | None = None


def start(options: RayOptions) -> dict[str, float]:
    """Join the cluster at `options.address`, or start a local Ray; returns its resources."""
    try:
        import ray
    except ImportError:
        raise InfluenceError("the Ray engine needs Ray: pip install 'influence[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=options.address, num_cpus=None if options.address
                     else options.num_cpus, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise InfluenceError(f"cannot reach Ray at {options.address or 'local'}: "
                                 f"{str(e).splitlines()[0]}") from None
    return ray.cluster_resources()


class RunnerActor:
    """A runner held by a Ray actor: decodes in the actor itself (no reader processes)."""

    def __init__(self, specs: list[Spec], threads: int, batch_size: int | None) -> None:
        self.runner = Runner(specs, workers=0, threads=threads, batch_size=batch_size)

    def run(self, partition: Partition) -> PartitionReport:
        return self.runner(partition)


class RayDistributor:
    """Every partition through a runner on one of `concurrency` Ray actors."""

    min_partitions = MIN_PARTITIONS

    def __init__(self, options: RayOptions | None = None) -> None:
        self.options = options or RayOptions()

    def __call__(self, plan: Plan, progress: bool = True) -> Outcome:
        outcome = Outcome()
        specs = plan.specs()
        begin = time.perf_counter()
        actors = self._run(plan, specs, outcome, progress) if specs else 1
        return outcome.finish(plan, time.perf_counter() - begin, actors)

    def _run(self, plan: Plan, specs: list[Spec], outcome: Outcome, progress: bool) -> int:
        """Run the partitions on the actors; returns how many actors ran them."""
        import ray
        from ray.util import ActorPool

        cpus = start(self.options).get("CPU", 1.0)
        concurrency = self.options.concurrency or max(1, int(cpus // 4))
        per_actor = self.options.cpus_per_actor or max(0.5, cpus / concurrency)
        actor = ray.remote(num_cpus=per_actor)(RunnerActor)
        shared = ray.put(specs)
        actors = [actor.remote(shared, math.ceil(per_actor), self.options.batch_size)
                  for _ in range(concurrency)]
        pool = ActorPool(actors)
        names = ", ".join(s.name for s in specs)
        try:
            with tqdm(total=plan.rows, desc=f"{names} (ray)", unit="row",
                      disable=not progress, dynamic_ncols=True) as bar:
                for report in pool.map_unordered(lambda a, p: a.run.remote(p), plan.partitions):
                    outcome.add(report)
                    bar.update(report.rows)
        except ray.exceptions.RayError as e:
            # A worker's error (a weights file missing on a node, say) as one line, not a trace.
            raise InfluenceError(f"{names}: the Ray job failed: {_last_line(e)}") from None
        finally:
            for a in actors:
                ray.kill(a)
        return concurrency


def _last_line(error: Any) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__
