"""Distributors decide where the runner runs a plan's partitions; this is the local one.

A distributor takes a `Plan` and returns an `Outcome`: the unreadable images with their
reasons, and each feature set's timings. The local distributor calls one `Runner` in this
process for every partition in turn (its reader decodes in worker processes), or, on a machine
of few cores with many images to embed, one runner of one thread in each of `processes` forked
processes, each taking the next partition; the Ray one (`influence.extract.ray_distributor`)
calls the same runner on a pool of actors.
"""

from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from influence.extract.plan import Partition, Plan, Spec
from influence.extract.reader import default_workers
from influence.extract.runner import PartitionReport, Runner, Timings
from influence.extractors import FEW_IMAGES, set_threads
from influence.runs import InfluenceError

#: Cores up to which the local distributor runs one single-threaded runner per core: there a
#: network on one thread runs at 0.54-0.65 of its speed on two (2-core AMD EPYC, AVX2:
#: MobileNetV2 84 and 156 images/s), and a reader decoding between batches leaves the second core
#: idle, so two runners side by side embed more images a second than one runner on both cores.
#: More cores: one process, reader worker processes beside it.
PROCESSES_UP_TO = 2


@dataclass
class Outcome:
    """What a distributor's run found, gathered from its partitions' reports."""

    errors: dict[str, str] = field(default_factory=dict)
    timings: dict[str, Timings] = field(default_factory=dict)

    def add(self, report: PartitionReport) -> None:
        self.errors.update(report.errors)
        for name, t in report.timings.items():
            self.timings.setdefault(name, Timings()).add(t)

    def finish(self, plan: Plan, wall: float, processes: int = 1) -> Outcome:
        """Set every feature set's wall time, fit time and runners side by side once all
        partitions are in."""
        for name in plan.names:
            t = self.timings.setdefault(name, Timings())
            t.wall, t.fit, t.processes = wall, plan.fit_s.get(name, 0.0), processes
        return self


class LocalDistributor:
    """Every partition through one runner in this process, in order; or through `processes`
    forked runners side by side (default: `default_processes`)."""

    #: Partitions at least: one is enough in one process.
    min_partitions = 1

    def __init__(self, workers: int | None = None, processes: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers
        self.processes = processes

    def __call__(self, plan: Plan, progress: bool = True) -> Outcome:
        outcome = Outcome()
        specs = plan.specs()
        begin = time.perf_counter()
        processes = 1
        if specs:
            # Every core, unless OMP_NUM_THREADS says how many this process may use.
            cores = int(os.environ.get("OMP_NUM_THREADS") or 0) or os.cpu_count() or 1
            processes = self.processes or default_processes(plan, cores)
            with tqdm(total=plan.rows, desc=", ".join(s.name for s in specs), unit="row",
                      disable=not progress, dynamic_ncols=True, smoothing=0.1) as bar:
                if processes > 1:
                    for report in _in_processes(specs, plan.partitions, processes,
                                                max(1, cores // processes)):
                        outcome.add(report)
                        bar.update(report.rows)
                else:
                    set_threads(cores)
                    runner = Runner(specs, workers=self.workers)
                    for partition in plan.partitions:
                        outcome.add(runner(partition, bar.update))
        return outcome.finish(plan, time.perf_counter() - begin, processes)


def default_processes(plan: Plan, cores: int) -> int:
    """Runner processes for a plan: one per core up to `PROCESSES_UP_TO` cores when every
    process gets a partition and the conv nets run in torch (`FEW_IMAGES` images or more: a few
    added paintings are not worth loading every model twice), else one."""
    images = max((len(ids) for ids in plan.pending.values()), default=0)
    if cores > PROCESSES_UP_TO or images < FEW_IMAGES:
        return 1
    return max(1, min(cores, len(plan.partitions)))


#: prctl's option that sends a process a signal when its parent dies.
PR_SET_PDEATHSIG = 1
#: The runner of a forked runner process.
_RUNNER: Runner | None = None


def _start_runner(specs: list[Spec], threads: int) -> None:
    """A forked process's runner (decoding in the loop); the process dies with its parent, so a
    killed extraction leaves no runner writing parts (Linux)."""
    global _RUNNER
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    _RUNNER = Runner(specs, workers=0, threads=threads)


def _run_partition(partition: Partition) -> PartitionReport:
    assert _RUNNER is not None
    return _RUNNER(partition)


def _in_processes(specs: list[Spec], partitions: list[Partition], processes: int,
                  threads: int) -> Iterator[PartitionReport]:
    """Each partition's report, as they finish, from `processes` forked runners of `threads`
    threads, each taking the next partition when it is done with one."""
    context = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(processes, mp_context=context, initializer=_start_runner,
                             initargs=(specs, threads)) as pool:
        futures = [pool.submit(_run_partition, p) for p in partitions]
        try:
            for future in as_completed(futures):
                yield future.result()
        except BrokenProcessPool:
            # A runner killed from outside (out of memory, say): its partition is not written.
            raise InfluenceError("a runner process of the extraction died (out of memory? "
                                 "`--processes 1` runs one); the partitions written are kept: "
                                 "run extract again to resume") from None
        except BaseException:
            # An interrupt or an error: the runners stop now, not after the partitions already
            # handed to them (a partition not written is embedded again on resume).
            _kill(pool)
            raise
        finally:
            for future in futures:
                future.cancel()


def _kill(pool: ProcessPoolExecutor) -> None:
    """Kill a pool's processes at once (what Python 3.14's `ProcessPoolExecutor.kill_workers`
    does; older ones keep them in `_processes`)."""
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        process.kill()
