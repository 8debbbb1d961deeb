"""The writer and the store: one feature set's part files, its matrix and its rejected images.

`PartWriter` writes a partition's rows as one atomic part file through fsspec, so a cluster's
workers can write to shared or object storage; `FeatureStore` knows where a feature set lives in
a run, gathers the parts into one float32 matrix aligned with the catalog, and lists the images
that could not be read, with their reasons, in `features/<name>.rejected.csv`.
"""

from __future__ import annotations

import io
import os
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import fsspec
import numpy as np
import pandas as pd

from influence.extractors.weights import file_sha256
from influence.runs import InfluenceError, Run, read_json


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
        self.rejected_path = run.features_dir / f"{name}.rejected.csv"

    def reset(self, why: str) -> None:
        """Forget stored rows that no longer match the extractor's configuration."""
        print(f"{self.name}: {why}; extracting again")
        self.writer.clear()
        for path in (self.matrix_path, self.info_path, self.state_path, self.rejected_path):
            path.unlink(missing_ok=True)

    def write_rejected(self, errors: Mapping[str, str], files: Mapping[str, str]) -> None:
        """List unreadable images (`image_id, file, reason`, in catalog order), or clear the
        list when there are none; written atomically."""
        if not errors:
            self.rejected_path.unlink(missing_ok=True)
            return
        ids = [i for i in files if i in errors]
        table = pd.DataFrame({"image_id": ids, "file": [files[i] for i in ids],
                              "reason": [errors[i] for i in ids]})
        self.rejected_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.rejected_path.with_name(self.rejected_path.name + ".tmp")
        table.to_csv(tmp, index=False)
        os.replace(tmp, self.rejected_path)

    def gather(self, image_ids: Sequence[str], dim: int) -> list[str]:
        """Write the aligned matrix part by part (memory stays one part, whatever the size).

        Rows are written with positioned writes, not through a memory map, whose touched pages
        would count in the process's memory and grow with the collection.
        Returns the weights the workers loaded (the newest part's label); different weights are
        an error, and so is a row missing for any image.
        """
        position = pd.Index(image_ids)
        tmp = self.matrix_path.with_name(self.matrix_path.name + ".tmp.npy")
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)),
                  "fortran_order": False, "shape": (len(image_ids), dim)}
        filled = np.zeros(len(image_ids), dtype=bool)
        weights: set[str] = set()
        newest: list[str] = []
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
                newest = part["weights"].tolist()
        if len(weights) > 1 and not self._one_file(weights):
            tmp.unlink()
            self.reset(f"workers loaded different weights ({'; '.join(sorted(weights))})")
            raise InfluenceError(f"{self.name}: workers loaded different weights; make the same "
                                 "weights file reachable on every worker and extract again")
        if not filled.all():
            tmp.unlink()
            raise InfluenceError(f"{self.name}: {int((~filled).sum())} images have no features "
                                 "(unreadable since cataloguing?); run extract again")
        os.replace(tmp, self.matrix_path)
        return newest[:1] if len(weights) > 1 else sorted(weights)

    def _one_file(self, weights: set[str]) -> bool:
        """Whether differing weights labels name one file's bytes at different paths (a run
        grown from another clone or a re-made environment, nodes that keep the file elsewhere):
        a path that is gone counts by the checksum recorded with the rows it made."""
        recorded = read_json(self.info_path) if self.info_path.exists() else {}
        checksum = recorded.get("weights_record", {}).get("checksum")
        digests, gone = set(), False
        for label in weights:
            if not label.startswith("file "):
                return False
            path = Path(label.removeprefix("file "))
            if path.is_file():
                digests.add(file_sha256(path))
            elif label == recorded.get("weights") and checksum:
                gone = True
            else:
                return False
        return len(digests) == 1 and (not gone or next(iter(digests)).startswith(checksum))
