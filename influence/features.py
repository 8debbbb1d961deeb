"""Feature extraction: reader -> mapper -> writer, resumable and incremental.

- reader: `ImageReader`, decoded and preprocessed images in DataLoader worker processes;
- mapper: the extractor's `transform` on a batch;
- writer: `FeatureStore`, which appends finished rows as small part files, atomically.

`process` runs the three on any list of images. The local engine (`extract_features`) gives it
every image that has no stored row yet; a distributed engine can give it one partition per task
and share the same store. When nothing is pending, the parts are gathered into one float32 matrix
aligned with the catalog, `features/<name>.npy`, with `features/<name>.json` beside it.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from influence.extractors import Extractor, get_extractor
from influence.images import DEFAULT_LIMITS, BadImage, ImageLimits, open_rgb
from influence.runs import InfluenceError, Run, fingerprint, read_json, versions, write_json

#: Rows per part file: the most work an interrupted extraction can lose.
PART_SIZE = 256


@dataclass(frozen=True)
class Item:
    image_id: str
    path: Path


@dataclass
class Batch:
    ids: list[str]
    data: torch.Tensor | np.ndarray | None
    errors: dict[str, str] = field(default_factory=dict)


class ImageReader(Dataset):
    """Decodes and preprocesses one image per index; a bad file becomes an error, not a crash."""

    def __init__(self, items: Sequence[Item], preprocess: Any,
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.items, self.preprocess, self.limits = items, preprocess, limits

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, Any, str | None]:
        item = self.items[i]
        try:
            return item.image_id, self.preprocess(open_rgb(item.path, self.limits)), None
        except BadImage as e:
            return item.image_id, None, str(e)


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


def read_batches(items: Sequence[Item], preprocess: Any, batch_size: int,
                 workers: int) -> Iterator[Batch]:
    """The reader: preprocessed batches in order, decoded in `workers` processes."""
    loader = DataLoader(ImageReader(items, preprocess), batch_size=batch_size, shuffle=False,
                        num_workers=workers, collate_fn=_collate, worker_init_fn=_worker_init,
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    yield from loader


class FeatureStore:
    """The writer: rows of one feature set, appended as atomic part files under `<name>.parts/`."""

    def __init__(self, run: Run, name: str) -> None:
        self.run, self.name = run, name
        self.parts = run.features_dir / f"{name}.parts"
        self.matrix_path = run.features_dir / f"{name}.npy"
        self.info_path = run.features_dir / f"{name}.json"
        self.state_path = run.features_dir / f"{name}.fit.joblib"
        self.meta_path = self.parts / "meta.json"

    def part_files(self) -> list[Path]:
        return sorted(self.parts.glob("part-*.npz")) if self.parts.exists() else []

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for part in self.part_files():
            with np.load(part) as z:
                done.update(z["ids"].tolist())
        return done

    def write(self, ids: Sequence[str], rows: np.ndarray) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)
        final = self.parts / f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:6]}.npz"
        tmp = final.with_name(final.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, ids=np.asarray(ids, dtype=str), x=rows.astype(np.float32, copy=False))
        os.replace(tmp, final)

    def reset(self, why: str) -> None:
        """Forget stored rows that no longer match the extractor's configuration."""
        print(f"{self.name}: {why}; extracting again")
        shutil.rmtree(self.parts, ignore_errors=True)
        for path in (self.matrix_path, self.info_path, self.state_path):
            path.unlink(missing_ok=True)

    def gather(self, image_ids: Sequence[str], dim: int) -> None:
        """Write the aligned matrix part by part (memory stays one part, whatever the size)."""
        position = pd.Series(np.arange(len(image_ids)), index=pd.Index(image_ids))
        tmp = self.matrix_path.with_name(self.matrix_path.name + ".tmp.npy")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                        shape=(len(image_ids), dim))
        filled = np.zeros(len(image_ids), dtype=bool)
        for part in self.part_files():
            with np.load(part) as z:
                keep = position.index.get_indexer(z["ids"])
                mask = keep >= 0
                out[position.to_numpy()[keep[mask]]] = z["x"][mask]
                filled[keep[mask]] = True
        out.flush()
        del out
        if not filled.all():
            tmp.unlink()
            raise InfluenceError(f"{self.name}: {int((~filled).sum())} images have no features")
        os.replace(tmp, self.matrix_path)


@dataclass
class Timings:
    """Where extraction time goes, per stage of the engine (as clip-retrieval logs it)."""

    read: float = 0.0
    model: float = 0.0
    write: float = 0.0
    fit: float = 0.0
    images: int = 0

    def as_dict(self) -> dict[str, float]:
        total = self.read + self.model + self.write
        return {"read_wait_s": round(self.read, 3), "model_s": round(self.model, 3),
                "write_s": round(self.write, 3), "fit_s": round(self.fit, 3),
                "images": self.images,
                "images_per_s": round(self.images / total, 2) if total else None}


def process(extractor: Extractor, items: Sequence[Item], store: FeatureStore, *,
            workers: int, part_size: int = PART_SIZE, progress: bool = True,
            timings: Timings | None = None) -> dict[str, str]:
    """Reader -> mapper -> writer over `items`; returns {image_id: error} for unreadable images."""
    timings = timings or Timings()
    errors: dict[str, str] = {}
    pending_ids: list[str] = []
    pending_rows: list[np.ndarray] = []

    def flush() -> None:
        if pending_ids:
            start = time.perf_counter()
            store.write(pending_ids, np.concatenate(pending_rows))
            timings.write += time.perf_counter() - start
            pending_ids.clear()
            pending_rows.clear()

    bar = tqdm(total=len(items), desc=extractor.name, unit="img", disable=not progress,
               dynamic_ncols=True, smoothing=0.1)
    start = time.perf_counter()
    for batch in read_batches(items, extractor.preprocess, extractor.batch_size, workers):
        timings.read += time.perf_counter() - start
        errors.update(batch.errors)
        if batch.ids:
            t = time.perf_counter()
            rows = extractor.transform(batch.data)
            timings.model += time.perf_counter() - t
            pending_ids.extend(batch.ids)
            pending_rows.append(rows)
            timings.images += len(batch.ids)
            if len(pending_ids) >= part_size:
                flush()
        bar.update(len(batch.ids) + len(batch.errors))
        start = time.perf_counter()
    flush()
    bar.close()
    return errors


def _fit(extractor: Extractor, items: Sequence[Item], store: FeatureStore, workers: int,
         progress: bool, timings: Timings) -> None:
    """Fit on a seeded sample (capped by the extractor), or reload an earlier fit."""
    if store.state_path.exists():
        extractor.set_state(joblib.load(store.state_path))
        return
    start = time.perf_counter()
    rng = np.random.default_rng(0)
    cap = getattr(extractor, "fit_sample", len(items))
    sample = sorted(rng.choice(len(items), size=min(cap, len(items)), replace=False))
    chosen = [items[i] for i in sample]
    batches = read_batches(chosen, extractor.preprocess, extractor.batch_size, workers)
    bar = tqdm(batches, total=-(-len(chosen) // extractor.batch_size), unit="batch",
               desc=f"{extractor.name} (fitting on {len(chosen)} images)", disable=not progress)
    extractor.fit(b.data for b in bar if b.ids)
    store.parts.mkdir(parents=True, exist_ok=True)
    joblib.dump(extractor.state(), store.state_path)
    timings.fit += time.perf_counter() - start


def extract_features(run: Run, name: str, weights: str | None = None, *,
                     workers: int | None = None, progress: bool = True) -> dict[str, Any]:
    """Bring features/<name> up to date with the run's catalog; returns the features' info."""
    catalog = run.catalog()
    ids = catalog["image_id"].tolist()
    store = FeatureStore(run, name)
    config = {"extractor": name, "weights_spec": weights}
    catalog_key = fingerprint(ids)
    if store.info_path.exists() and store.matrix_path.exists():
        info = read_json(store.info_path)
        if info.get("catalog") == catalog_key and info.get("config") == config:
            return {**info, "up_to_date": True}
    if store.meta_path.exists() and read_json(store.meta_path)["config"] != config:
        store.reset("configuration changed")

    workers = default_workers() if workers is None else workers
    torch.set_num_threads(os.cpu_count() or 1)
    extractor = get_extractor(name, weights)
    image_root = run.image_root()
    items = [Item(i, image_root / f) for i, f in zip(ids, catalog["file"], strict=True)]
    timings = Timings()
    if extractor.needs_fit:
        _fit(extractor, items, store, workers, progress, timings)
    done = store.done_ids()
    pending = [it for it in items if it.image_id not in done]
    extractor.load()
    meta = {"config": config, "weights": extractor.weights_used}
    if store.meta_path.exists() and read_json(store.meta_path)["weights"] != meta["weights"]:
        store.reset(f"weights changed to {meta['weights']}")
        return extract_features(run, name, weights, workers=workers, progress=progress)
    write_json(store.meta_path, meta)
    errors = {}
    if pending:
        errors = process(extractor, pending, store, workers=workers, progress=progress,
                         timings=timings)
    if errors:
        listed = "; ".join(f"{i}: {e}" for i, e in list(errors.items())[:3])
        raise InfluenceError(f"{name}: {len(errors)} images changed since cataloguing and could "
                             f"not be read ({listed}); run extract again to re-catalog them")
    store.gather(ids, extractor.dim)
    info = {**extractor.info(), "config": config, "catalog": catalog_key, "rows": len(ids),
            "new_rows": len(pending), "timings": timings.as_dict(), "versions": versions(),
            "workers": workers, "torch_threads": torch.get_num_threads()}
    write_json(store.info_path, info)
    return {**info, "up_to_date": False}
