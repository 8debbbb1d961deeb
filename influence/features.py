"""Feature extraction as plan, partitions and finalize, on any engine.

- plan (`plan_extraction`): the extraction step (what changes the features: weights, the
  extractor's version and preprocessing, the catalog's images), the fit of an extractor that
  needs one (on the driver, once), and the pending images split into partitions;
- reader (`read_item`, `read_batches`): images to decoded, preprocessed batches, with nothing
  but the extractor's `preprocess` (no model);
- mapper (`FeatureMapper`): a batch `{image_id, pixels}` to `{image_id, features}`, loading its
  model once per worker;
- writer (`PartWriter`): one partition's rows as an atomic part file, through fsspec, so a
  cluster's workers can write to shared or object storage;
- finalize (`finalize`): gather the parts into one float32 matrix aligned with the catalog,
  `features/<name>.npy`, with `features/<name>.json` beside it.

The local engine (`run_local`) drives them in this process with reader worker processes; the Ray
engine (`influence.ray_engine`) drives the same pieces on Ray Data. Both skip images whose rows
are already written, so an interrupted extraction resumes, and a grown collection extracts only
its new images. `extract_features` runs one feature set through the run protocol (`Run.step`).
"""

from __future__ import annotations

import ctypes
import io
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import joblib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from influence.extractors import Extractor, get_extractor
from influence.images import DEFAULT_LIMITS, BadImage, ImageLimits, open_rgb
from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    column_fingerprints,
    fingerprint,
    read_json,
    write_json,
)

#: Rows per part file: the most work an interrupted extraction can lose.
PART_SIZE = 256
#: Allocations at least this large get their own memory map, handed back to the system on free.
MMAP_THRESHOLD = 1 << 20
ENGINES = ("local", "ray")
#: mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


@dataclass(frozen=True)
class Item:
    image_id: str
    path: str


def bound_malloc() -> None:
    """Keep glibc from hoarding freed batch buffers.

    glibc raises its mmap threshold each time a large block is freed, so the next batches'
    tensors come from the heap, and freed heap is returned only now and then: a model's process
    climbed to twice its working memory in a saw-tooth, and the longer the extraction the higher
    the peak. A fixed threshold (and trim threshold) makes large buffers memory maps again.
    Does nothing where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_TRIM_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------- reader
def read_item(item: Item, preprocess: Any,
              limits: ImageLimits = DEFAULT_LIMITS) -> tuple[Any, str | None]:
    """One image decoded and preprocessed, or (None, why) for a file that cannot be read."""
    try:
        return preprocess(open_rgb(Path(item.path), limits)), None
    except BadImage as e:
        return None, str(e)


@dataclass
class Batch:
    ids: list[str]
    data: torch.Tensor | np.ndarray | None
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The mapper's input: `{image_id, pixels}`."""
        return {"image_id": np.asarray(self.ids), "pixels": self.data}


class ImageReader(Dataset):
    """Decodes and preprocesses one image per index; a bad file becomes an error, not a crash."""

    def __init__(self, items: Sequence[Item], preprocess: Any,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.items, self.preprocess, self.limits = items, preprocess, limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, Any, str | None]:
        item = self.items[i]
        return (item.image_id, *read_item(item, self.preprocess, self.limits))


def _collate(samples: list[tuple[str, Any, str | None]]) -> Batch:
    good = [(i, x) for i, x, err in samples if err is None]
    errors = {i: err for i, _, err in samples if err is not None}
    if not good:
        return Batch([], None, errors)
    ids, xs = zip(*good, strict=True)
    data = torch.stack(xs) if isinstance(xs[0], torch.Tensor) else np.stack(xs)
    return Batch(list(ids), data, errors)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def default_workers() -> int:
    """Reader processes: one on a 2-core machine (decoding is ~1/4 of a core at model speed)."""
    return max(1, min(4, (os.cpu_count() or 2) - 1))


class DecodedCache:
    """Preprocessed images kept by a pass that decoded them anyway (the thumbnails'), keyed by the
    preprocessing, so extractors whose preprocessed form is small do not decode every image again.

    Stored as chunk files (`add` writes one, atomically), read a chunk at a time (`batches`), so
    neither the writing pass nor the reader holds the whole collection's pixels in memory.
    """

    def __init__(self, run: Run, preprocess: Any) -> None:
        self.folder = run.root / ".cache" / f"decoded-{fingerprint([repr(preprocess)])}"

    def chunks(self) -> list[Path]:
        return sorted(self.folder.glob("chunk-*.npz")) if self.folder.exists() else []

    def where(self) -> dict[str, tuple[Path, int]]:
        """Each cached image's chunk file and row (only the ids are read)."""
        out: dict[str, tuple[Path, int]] = {}
        for path in self.chunks():
            with np.load(path) as z:
                out.update((i, (path, row)) for row, i in enumerate(z["ids"].tolist()))
        return out

    def add(self, ids: Sequence[str], rows: Sequence[np.ndarray]) -> None:
        """Write these rows as one more chunk file, atomically."""
        if not len(ids):
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        final = self.folder / f"chunk-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids, dtype=str), x=np.stack(list(rows)))
        os.replace(tmp, final)

    def batches(self, items: Sequence[Item], batch_size: int) -> Iterator[Batch] | None:
        """The items' rows in batches, one chunk in memory at a time; None unless every item
        is cached."""
        where = self.where()
        if not items or any(it.image_id not in where for it in items):
            return None
        return self._batches(items, batch_size, where)

    @staticmethod
    def _batches(items: Sequence[Item], batch_size: int,
                 where: dict[str, tuple[Path, int]]) -> Iterator[Batch]:
        loaded: tuple[Path | None, np.ndarray | None] = (None, None)
        for lo in range(0, len(items), batch_size):
            ids = [it.image_id for it in items[lo:lo + batch_size]]
            rows = []
            for image_id in ids:
                path, row = where[image_id]
                if path != loaded[0]:
                    with np.load(path) as z:
                        loaded = (path, z["x"])
                rows.append(loaded[1][row])
            yield Batch(ids, np.stack(rows))


def read_batches(items: Sequence[Item], preprocess: Any, batch_size: int,
                 workers: int, cached: DecodedCache | None = None) -> Iterator[Batch]:
    """The local reader: preprocessed batches in order, decoded in `workers` processes.

    If `cached` (see `DecodedCache`) holds every item's preprocessed row, nothing is decoded.
    """
    found = cached.batches(items, batch_size) if cached is not None else None
    if found is not None:
        yield from found
        return
    loader = DataLoader(ImageReader(items, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, worker_init_fn=_worker_init,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader


# ------------------------------------------------------------------------------------- mapper
class FeatureMapper:
    """The mapper: `{image_id, pixels}` -> `{image_id, features, weights}`.

    Made once per worker (a Ray actor, or the local process): it loads the model there, with the
    fitted state the driver learned, so a fitted extractor is fitted once and applied everywhere.
    `weights` says which weights the worker loaded, so mixed weights across workers are caught.
    """

    def __init__(self, name: str, weights: str | None = None,
                 state: dict[str, Any] | None = None, threads: int | None = None) -> None:
        if threads:
            torch.set_num_threads(threads)
        bound_malloc()
        self.extractor = get_extractor(name, weights)
        if state is not None:
            self.extractor.set_state(state)
        self.extractor.load()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        ids = np.asarray(batch["image_id"])
        rows = self.extractor.transform(batch["pixels"])
        return {"image_id": ids, "features": rows,
                "weights": np.full(len(ids), self.extractor.weights_used)}


# ------------------------------------------------------------------------------------- writer
class PartWriter:
    """The writer: rows of one feature set as atomic part files under an fsspec folder URL.

    Any fsspec URL works (a local or NFS path, `s3://...`), so every worker of a cluster writes
    its partitions where the driver gathers them; the object holds only the URL, so it pickles.
    """

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        return fsspec.core.url_to_fs(self.url)[0]

    def part_files(self) -> list[str]:
        fs, root = fsspec.core.url_to_fs(self.url)
        return sorted(fs.glob(f"{root}/part-*.npz")) if fs.exists(root) else []

    def write(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Write one partition's `{image_id, features, weights}` rows; returns their ids."""
        fs, root = fsspec.core.url_to_fs(self.url)
        fs.makedirs(root, exist_ok=True)
        final = f"{root}/part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
        buf = io.BytesIO()
        np.savez(buf, ids=np.asarray(batch["image_id"], dtype=str),
                 x=np.asarray(batch["features"], dtype=np.float32),
                 weights=np.asarray(sorted(set(np.asarray(batch["weights"]).tolist()))))
        with fs.open(f"{final}.tmp", "wb") as f:
            f.write(buf.getvalue())
        fs.mv(f"{final}.tmp", final)
        return {"image_id": np.asarray(batch["image_id"])}

    __call__ = write

    def parts(self) -> Iterator[dict[str, np.ndarray]]:
        """Every written part: `{ids, x, weights}`."""
        fs = self.fs
        for path in self.part_files():
            with fs.open(path, "rb") as f, np.load(io.BytesIO(f.read())) as z:
                yield {k: z[k] for k in z.files}

    def done_ids(self) -> set[str]:
        return {i for part in self.parts() for i in part["ids"].tolist()}

    def clear(self) -> None:
        fs, root = fsspec.core.url_to_fs(self.url)
        if fs.exists(root):
            fs.rm(root, recursive=True)


class FeatureStore:
    """Where one feature set lives in a run: its parts, matrix, description and fitted state."""

    def __init__(self, run: Run, name: str) -> None:
        self.run, self.name = run, name
        self.parts = run.features_dir / f"{name}.parts"
        self.writer = PartWriter(str(self.parts))
        self.matrix_path = run.features_dir / f"{name}.npy"
        self.info_path = run.features_dir / f"{name}.json"
        self.state_path = run.features_dir / f"{name}.fit.joblib"
        self.meta_path = self.parts / "meta.json"

    def reset(self, why: str) -> None:
        """Forget stored rows that no longer match the extractor's configuration."""
        print(f"{self.name}: {why}; extracting again")
        self.writer.clear()
        for path in (self.matrix_path, self.info_path, self.state_path):
            path.unlink(missing_ok=True)

    def gather(self, image_ids: Sequence[str], dim: int) -> list[str]:
        """Write the aligned matrix part by part (memory stays one part, whatever the size).

        Rows are written with positioned writes, not through a memory map, whose touched pages
        would count in the process's memory and grow with the collection.
        Returns the weights the workers loaded; more than one is an error, and so is a row
        missing for any image.
        """
        position = pd.Index(image_ids)
        tmp = self.matrix_path.with_name(self.matrix_path.name + ".tmp.npy")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                  "fortran_order": False, "shape": (len(image_ids), dim)}
        filled = np.zeros(len(image_ids), dtype=bool)
        weights: set[str] = set()
        row_bytes = dim * 4
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, header)
            start = f.tell()
            f.truncate(start + len(image_ids) * row_bytes)
            for part in self.writer.parts():
                keep = position.get_indexer(part["ids"])
                mask = keep >= 0
                rows, x = keep[mask], np.ascontiguousarray(part["x"][mask], dtype=np.float32)
                order = np.argsort(rows, kind="stable")
                rows, x = rows[order], x[order]
                if not len(rows):
                    continue
                # Runs of consecutive rows go out in one write each.
                breaks = np.flatnonzero(np.diff(rows) != 1) + 1
                for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
                    os.pwrite(f.fileno(), x[lo:hi].tobytes(), start + int(rows[lo]) * row_bytes)
                filled[rows] = True
                weights.update(part["weights"].tolist())
        if len(weights) > 1:
            tmp.unlink()
            self.reset(f"workers loaded different weights ({'; '.join(sorted(weights))})")
            raise InfluenceError(f"{self.name}: workers loaded different weights; make the same "
                                 "weights file reachable on every worker and extract again")
        if not filled.all():
            tmp.unlink()
            raise InfluenceError(f"{self.name}: {int((~filled).sum())} images have no features "
                                 "(unreadable since cataloguing?); run extract again")
        os.replace(tmp, self.matrix_path)
        return sorted(weights)


@dataclass
class Timings:
    """Where extraction time goes, per stage of the engine (as clip-retrieval logs it)."""

    read: float = 0.0
    model: float = 0.0
    write: float = 0.0
    fit: float = 0.0
    wall: float = 0.0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        """The timings taken; the Ray engine measures only wall time (its parts run elsewhere)."""
        total = self.wall or (self.read + self.model + self.write)
        parts = {"read_wait_s": self.read, "model_s": self.model, "write_s": self.write}
        return {**{k: round(v, 3) for k, v in parts.items() if v}, "fit_s": round(self.fit, 3),
                "wall_s": round(total, 3), "images": self.images,
                "images_per_s": round(self.images / total, 2) if total else None}


# --------------------------------------------------------------------------------------- plan
def extraction_step(run: Run, name: str, weights: str | None = None) -> Step:
    """What changes features/<name>: weights, extractor code and preprocessing, the images."""
    store = FeatureStore(run, name)
    extractor = get_extractor(name, weights)
    located = extractor.located_weights()
    params: dict[str, Any] = {"weights": str(located) if located else "default"}
    if isinstance(located, Path):
        stat = located.stat()
        params["weights_file"] = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return Step("extract", name, params, extractor.code_version(),
                column_fingerprints(run.catalog(), ()),
                (store.matrix_path, store.info_path)
                + ((store.state_path,) if extractor.needs_fit else ()))


@dataclass
class Plan:
    """What one extraction has to do: the step, the (fitted) extractor, partitions of the rest."""

    run: Run
    name: str
    weights: str | None
    step: Step
    extractor: Extractor
    items: list[Item]
    partitions: list[list[Item]]
    timings: Timings

    @property
    def store(self) -> FeatureStore:
        return FeatureStore(self.run, self.name)

    @property
    def pending(self) -> list[Item]:
        return [it for part in self.partitions for it in part]

    def mapper_args(self) -> dict[str, Any]:
        """What builds a `FeatureMapper` on a worker (the fitted state travels with it)."""
        return {"name": self.name, "weights": self.weights, "state": self.extractor.state()}


def plan_extraction(run: Run, name: str, weights: str | None = None, *,
                    step: Step | None = None, workers: int | None = None,
                    part_size: int = PART_SIZE, min_partitions: int = 1,
                    progress: bool = True) -> Plan:
    """Reset parts made differently, fit on the driver if needed, partition what is pending.

    Partitions hold at most `part_size` images, and are smaller where that gives fewer than
    `min_partitions` (so a cluster's workers all get some, and a kill loses little).
    """
    step = step or extraction_step(run, name, weights)
    store = FeatureStore(run, name)
    made_by = fingerprint([step.code, repr(sorted(step.params.items()))])
    if store.meta_path.exists() and read_json(store.meta_path).get("made_by") != made_by:
        store.reset("weights or extractor code changed")
    write_json(store.meta_path, {"made_by": made_by, "params": step.params, "code": step.code})
    catalog = run.catalog()
    image_root = run.image_root()
    items = [Item(i, str(image_root / f)) for i, f in zip(catalog["image_id"], catalog["file"],
                                                          strict=True)]
    extractor = get_extractor(name, weights)
    timings = Timings()
    if extractor.needs_fit:
        _fit(extractor, items, store, default_workers() if workers is None else workers,
             progress, timings)
    done = store.writer.done_ids()
    pending = [it for it in items if it.image_id not in done]
    size = max(1, min(part_size, -(-len(pending) // min_partitions)))
    partitions = [pending[i:i + size] for i in range(0, len(pending), size)]
    return Plan(run, name, weights, step, extractor, items, partitions, timings)


def _cached(run: Run, extractor: Extractor) -> DecodedCache | None:
    return DecodedCache(run, extractor.preprocess) if extractor.cache_decoded else None


def _fit(extractor: Extractor, items: Sequence[Item], store: FeatureStore, workers: int,
         progress: bool, timings: Timings) -> None:
    """Fit on a seeded sample (capped by the extractor), or reload an earlier fit.

    Every worker, the local process included, applies the saved fit: a freshly fitted
    scikit-learn PCA projects a few units in the last float32 place differently from its saved
    copy, and the engines must agree.
    """
    if not store.state_path.exists():
        _fit_and_save(extractor, items, store, workers, progress, timings)
    extractor.set_state(joblib.load(store.state_path))


def _fit_and_save(extractor: Extractor, items: Sequence[Item], store: FeatureStore,
                  workers: int, progress: bool, timings: Timings) -> None:
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    sample = sorted(rng.choice(len(items), size=min(extractor.fit_sample or len(items),
                                                    len(items)), replace=False))
    chosen = [items[i] for i in sample]
    batches = read_batches(chosen, extractor.preprocess, extractor.batch_size, workers,
                           _cached(store.run, extractor))
    bar = tqdm(batches, total=-(-len(chosen) // extractor.batch_size), unit="batch",
               desc=f"{extractor.name} (fitting on {len(chosen)} images)", disable=not progress)
    extractor.fit(b.data for b in bar if b.ids)
    with atomic(store.state_path) as tmp:
        joblib.dump(extractor.state(), tmp)
    timings.fit += time.perf_counter() - start


# ------------------------------------------------------------------------------- local engine
def run_local(plan: Plan, *, workers: int | None = None, progress: bool = True) -> dict[str, str]:
    """Reader -> mapper -> writer over the plan's partitions in this process.

    Returns {image_id: error} for unreadable images.
    """
    workers = default_workers() if workers is None else workers
    torch.set_num_threads(os.cpu_count() or 1)
    pending, timings, writer = plan.pending, plan.timings, plan.store.writer
    if not pending:
        return {}
    mapper = FeatureMapper(plan.name, plan.weights, plan.extractor.state())
    part_size = max(len(p) for p in plan.partitions)
    errors: dict[str, str] = {}
    done: list[dict[str, np.ndarray]] = []

    def flush() -> None:
        if done:
            start = time.perf_counter()
            writer.write({k: np.concatenate([d[k] for d in done]) for k in done[0]})
            timings.write += time.perf_counter() - start
            done.clear()

    bar = tqdm(total=len(pending), desc=plan.name, unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    begin = start = time.perf_counter()
    for batch in read_batches(pending, plan.extractor.preprocess, plan.extractor.batch_size,
                              workers, _cached(plan.run, plan.extractor)):
        timings.read += time.perf_counter() - start
        errors.update(batch.errors)
        if batch.ids:
            t = time.perf_counter()
            done.append(mapper(batch.as_dict()))
            timings.model += time.perf_counter() - t
            timings.images += len(batch.ids)
            if sum(len(d["image_id"]) for d in done) >= part_size:
                flush()
        bar.update(len(batch.ids) + len(batch.errors))
        start = time.perf_counter()
    flush()
    bar.close()
    timings.wall = time.perf_counter() - begin
    return errors


# ----------------------------------------------------------------------------------- finalize
def finalize(plan: Plan, errors: dict[str, str] | None = None,
             engine: str = "local") -> dict[str, Any]:
    """Gather the parts into the aligned matrix and describe it; returns what the step records."""
    if errors:
        listed = "; ".join(f"{i}: {e}" for i, e in list(errors.items())[:3])
        raise InfluenceError(f"{plan.name}: {len(errors)} images changed since cataloguing and "
                             f"could not be read ({listed}); run extract again to re-catalog "
                             "them")
    store = plan.store
    ids = [it.image_id for it in plan.items]
    extractor = plan.extractor
    weights = store.gather(ids, extractor.dim)
    if weights:
        extractor.weights_used = weights[0]
    info = {**extractor.info(), "config": {"extractor": plan.name, "weights_spec": plan.weights},
            "catalog": plan.step.inputs["image_id"], "rows": len(ids),
            "new_rows": len(plan.pending), "engine": engine, "timings": plan.timings.as_dict()}
    write_json(store.info_path, info)
    return {k: info[k] for k in ("dim", "weights", "rows", "new_rows", "engine", "timings")}


def extract_features(run: Run, name: str, weights: str | None = None, *, engine: str = "local",
                     workers: int | None = None, progress: bool = True,
                     part_size: int = PART_SIZE, ray: dict[str, Any] | None = None
                     ) -> dict[str, Any]:
    """Bring features/<name> up to date with the run's catalog; returns the step's report.

    `engine` is "local" (this process) or "ray" (Ray Data; `ray` holds `RayOptions` fields).
    """
    if engine not in ENGINES:
        raise InfluenceError(f"unknown engine '{engine}' (available: {', '.join(ENGINES)})")
    step = extraction_step(run, name, weights)

    def build() -> dict[str, Any]:
        if engine == "ray":
            from influence.ray_engine import MIN_PARTITIONS, RayOptions, run_ray

            plan = plan_extraction(run, name, weights, step=step, workers=workers,
                                   part_size=part_size, min_partitions=MIN_PARTITIONS,
                                   progress=progress)

            errors = run_ray(plan, RayOptions(**(ray or {})), progress=progress)
        else:
            plan = plan_extraction(run, name, weights, step=step, workers=workers,
                                   part_size=part_size, progress=progress)
            errors = run_local(plan, workers=workers, progress=progress)
        return finalize(plan, errors, engine)

    return run.step(step, build)
