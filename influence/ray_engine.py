"""The Ray engine: the extraction plan's reader, mapper and writer on Ray Data.

Pending images become a dataset of `{image_id, path}` rows, one block per partition; the reader
decodes and preprocesses them in tasks, the mapper (`FeatureMapper`) runs as a class on a pool of
actors that each load the model once, and the writer writes each batch of `part_size` rows as one
part file where the driver gathers them. `ray.init(address=...)` joins an existing cluster;
without an address a local Ray starts. Needs the optional extra: `pip install influence[ray]`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from influence.features import FeatureMapper, Item, Plan, read_item
from influence.images import DEFAULT_LIMITS, ImageLimits
from influence.runs import InfluenceError

#: CPUs a reader task and a writer task ask Ray for: decoding is a fraction of the model's cost,
#: and the model actors get the rest, so the three always fit on the cluster together.
READ_CPUS = 0.25
WRITE_CPUS = 0.1
#: At least this many partitions, however few images are pending: work for every actor.
MIN_PARTITIONS = 8


@dataclass(frozen=True)
class RayOptions:
    """How to run on Ray: `address` of a cluster (None starts a local Ray with `num_cpus`),
    mapper actors (`concurrency`, `batch_size`, `cpus_per_actor`)."""

    address: str | None = None
    num_cpus: int | None = None
    concurrency: int | None = None
    batch_size: int | None = None
    cpus_per_actor: float | None = None


class RayReader:
    """The reader as a Ray batch function: `{image_id, path}` -> `{image_id, pixels}`.

    Unreadable images are dropped here; finalize then reports them as images without features.
    """

    def __init__(self, preprocess: Any, limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.preprocess, self.limits = preprocess, limits

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, pixels = [], []
        for image_id, path in zip(batch["image_id"], batch["path"], strict=True):
            x, error = read_item(Item(str(image_id), str(path)), self.preprocess, self.limits)
            if error is None:
                ids.append(str(image_id))
                pixels.append(x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x))
        return {"image_id": np.asarray(ids, dtype=object),
                "pixels": np.stack(pixels) if pixels else np.zeros((0,), np.float32)}


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


def run_ray(plan: Plan, options: RayOptions, progress: bool = True) -> dict[str, str]:
    """Extract the plan's pending images on Ray Data; returns no per-image errors (see reader)."""
    if not plan.pending:
        return {}
    import ray
    import ray.data
    from ray.data.exceptions import UserCodeException

    resources = start(options)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    cpus = resources.get("CPU", 1.0)
    concurrency = options.concurrency or max(1, int(cpus // 4))
    per_actor = options.cpus_per_actor or max(0.5, (cpus - READ_CPUS - WRITE_CPUS)
                                                   / concurrency)
    extractor = plan.extractor
    begin = time.perf_counter()
    ds = ray.data.from_items([{"image_id": it.image_id, "path": it.path} for it in plan.pending],
                             override_num_blocks=len(plan.partitions))
    ds = ds.map_batches(RayReader(extractor.preprocess), batch_size=None,
                        num_cpus=READ_CPUS)
    ds = ds.map_batches(FeatureMapper,
                        fn_constructor_kwargs={**plan.mapper_args(),
                                               "threads": math.ceil(per_actor)},
                        compute=ray.data.ActorPoolStrategy(size=concurrency),
                        batch_size=options.batch_size or extractor.batch_size, num_cpus=per_actor)
    part_size = max(len(p) for p in plan.partitions)
    written = ds.map_batches(plan.store.writer, batch_size=part_size, num_cpus=WRITE_CPUS)
    try:
        plan.timings.images = written.materialize().count()
    except (ray.exceptions.RayError, UserCodeException) as e:
        # A worker's error (a weights file missing on a node, say) as one line, not Ray's trace.
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise InfluenceError(f"{plan.name}: the Ray job failed: "
                             f"{lines[-1] if lines else type(e).__name__}") from None
    plan.timings.wall = time.perf_counter() - begin
    return {}
