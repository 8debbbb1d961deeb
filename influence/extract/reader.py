"""The reader: a partition's images decoded once, and each extractor's preprocessing applied.

Every image is decoded once per run for all the extractors that still need it, and each one's
`preprocess` is applied to the same decoded picture. A preprocessing is cut in two (`split`):
the per-image steps (crop and resize, in uint8), shared by extractors that declare the same ones,
and the elementwise steps (scaling, normalising), applied to each stacked batch at once: the same
numbers at a fraction of the cost of one small call per image and step. Extractors whose
preprocessed form is small (`cache_decoded`: the pixel baselines) read it from a `DecodedCache`
that the thumbnails' pass filled, and then nothing is decoded for them at all.
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from influence.extractors import set_threads, stack
from influence.images import DEFAULT_LIMITS, BadImage, ImageLimits, open_rgb
from influence.runs import Run, fingerprint

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Item:
    image_id: str
    path: str


def default_workers() -> int:
    """Reader processes: none on two cores or fewer, where a reader process's decoding competes
    with the models' threads for the cores (1,000 shared paintings, three networks: 60.7 s
    decoding in the loop against 65.1 s with one reader process); else one per core left over,
    at most 4."""
    cores = os.cpu_count() or 2
    return 0 if cores <= 2 else min(4, cores - 1)


@dataclass
class Batch:
    """Decoded images: for each extractor the ids it wants and their preprocessed rows."""

    ids: dict[str, list[str]]
    data: dict[str, torch.Tensor | np.ndarray]
    errors: dict[str, str] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows this batch accounts for: one per extractor and image, one per failed image."""
        return sum(len(ids) for ids in self.ids.values()) + len(self.errors)


def split(preprocess: Any) -> tuple[Any, Any | None]:
    """(per-image steps, per-batch steps or None) of a preprocessing: a torchvision `Compose` is
    cut before its first `ToDtype` when only `ToDtype` and `Normalize` follow (elementwise, so
    a batch gives each row the numbers the image alone would); others may declare `split()`."""
    if hasattr(preprocess, "split"):
        return preprocess.split()
    v2 = sys.modules.get("torchvision.transforms.v2")  # loaded if `preprocess` is one of its
    if v2 is not None and isinstance(preprocess, v2.Compose):
        steps = list(preprocess.transforms)
        cut = next((i for i, t in enumerate(steps) if isinstance(t, v2.ToDtype)), None)
        if cut and all(isinstance(t, v2.ToDtype | v2.Normalize) for t in steps[cut:]):
            return v2.Compose(steps[:cut]), v2.Compose(steps[cut:])
    return preprocess, None


class DecodingReader:
    """One image per index, decoded once and put through the per-image steps of each extractor
    that wants it (steps declared alike run once); a bad file becomes its reason, not a crash."""

    def __init__(self, items: Sequence[Item], per_image: Mapping[str, Any],
                 wanted: Mapping[str, frozenset[str]],
                 limits: ImageLimits = DEFAULT_LIMITS) -> None:
        self.items, self.per_image, self.wanted, self.limits = items, per_image, wanted, limits
        self.shared = {name: repr(fn) for name, fn in per_image.items()}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[str, dict[str, Any], str | None]:
        item = self.items[i]
        try:
            image = open_rgb(Path(item.path), self.limits)
        except BadImage as e:
            return item.image_id, {}, str(e)
        done: dict[str, Any] = {}
        out = {}
        for name, fn in self.per_image.items():
            if item.image_id in self.wanted[name]:
                key = self.shared[name]
                if key not in done:
                    done[key] = fn(image)
                out[name] = done[key]
        return item.image_id, out, None


@dataclass
class Collate:
    """Samples -> a Batch: each extractor's rows stacked, then its per-batch steps applied."""

    per_batch: Mapping[str, Any]

    def __call__(self, samples: list[tuple[str, dict[str, Any], str | None]]) -> Batch:
        errors = {i: err for i, _, err in samples if err is not None}
        ids: dict[str, list[str]] = {}
        rows: dict[str, list[Any]] = {}
        for image_id, out, _ in samples:
            for name, x in out.items():
                ids.setdefault(name, []).append(image_id)
                rows.setdefault(name, []).append(x)
        data = {}
        for name, r in rows.items():
            batch, steps = stack(r), self.per_batch.get(name)
            data[name] = batch if steps is None else steps(batch)
        return Batch(ids, data, errors)


def _worker_init(_: int) -> None:
    set_threads(1)


def decode(items: Sequence[Item], preprocess: Mapping[str, Any],
           wanted: Mapping[str, frozenset[str]], batch_size: int,
           workers: int) -> Iterator[Batch]:
    """Batches in order, each image decoded once (in `workers` processes through torch's
    DataLoader; 0: in this one, without importing torch)."""
    parts = {name: split(fn) for name, fn in preprocess.items()}
    reader = DecodingReader(items, {n: p[0] for n, p in parts.items()}, wanted)
    collate = Collate({n: p[1] for n, p in parts.items() if p[1]})
    if not workers:
        for lo in range(0, len(reader), batch_size):
            yield collate([reader[i] for i in range(lo, min(lo + batch_size, len(reader)))])
        return
    from torch.utils.data import DataLoader

    yield from DataLoader(reader, batch_size=batch_size, shuffle=False, num_workers=workers,
                          collate_fn=collate, worker_init_fn=_worker_init, prefetch_factor=4,
                          persistent_workers=False)


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

    def rows(self, ids: Sequence[str], batch_size: int) -> Iterator[np.ndarray] | None:
        """The ids' rows in batches, one chunk in memory at a time; None unless all are cached."""
        where = self.where()
        if not ids or any(i not in where for i in ids):
            return None
        return self._rows(ids, batch_size, where)

    @staticmethod
    def _rows(ids: Sequence[str], batch_size: int,
              where: dict[str, tuple[Path, int]]) -> Iterator[np.ndarray]:
        loaded: tuple[Path | None, np.ndarray | None] = (None, None)
        for lo in range(0, len(ids), batch_size):
            rows = []
            for image_id in ids[lo:lo + batch_size]:
                path, row = where[image_id]
                if path != loaded[0]:
                    with np.load(path) as z:
                        loaded = (path, z["x"])
                rows.append(loaded[1][row])
            yield np.stack(rows)


def read(items: Sequence[Item], preprocess: Mapping[str, Any],
         wanted: Mapping[str, frozenset[str]], batch_size: int, workers: int,
         caches: Mapping[str, DecodedCache] | None = None) -> Iterator[Batch]:
    """A partition's batches for several extractors: cached rows first, then one decoding pass
    for every extractor the cache could not serve.

    `wanted[name]` is the ids `name` still needs; each batch gives each extractor only those.
    """
    todo = dict(preprocess)
    for name, cache in (caches or {}).items():
        ids = [it.image_id for it in items if it.image_id in wanted[name]]
        found = cache.rows(ids, batch_size) if name in todo else None
        if found is None:
            continue
        del todo[name]
        lo = 0
        for rows in found:
            yield Batch({name: ids[lo:lo + len(rows)]}, {name: rows})
            lo += len(rows)
    needed = [it for it in items if any(it.image_id in wanted[n] for n in todo)]
    if todo and needed:
        yield from decode(needed, todo, wanted, batch_size, workers)
