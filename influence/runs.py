"""The run directory: the unit of work every stage reads from and writes to."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


class InfluenceError(Exception):
    """An error a user can fix: printed as one line, without a traceback."""


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so an interrupted stage never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def fingerprint(values: Iterable[str]) -> str:
    """A short hash of an ordered list of strings (image ids), to tell if inputs changed."""
    h = hashlib.sha256()
    for v in values:
        h.update(v.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour shapes the results, recorded with every stage."""
    import importlib.metadata as md

    out = {"python": platform.python_version(), "influence": _version()}
    for pkg in ("numpy", "torch", "torchvision", "scikit-learn", "umap-learn", "faiss-cpu",
                "pandas", "pillow", "onnxruntime"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


def _version() -> str:
    from influence import __version__

    return __version__


@dataclass(frozen=True)
class Run:
    """Paths inside a run directory, and the shared readers of what stages wrote there."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root).resolve())

    @property
    def catalog_path(self) -> Path:
        return self.root / "catalog.parquet"

    @property
    def rejected_path(self) -> Path:
        return self.root / "rejected.csv"

    @property
    def features_dir(self) -> Path:
        return self.root / "features"

    @property
    def clusters_dir(self) -> Path:
        return self.root / "clusters"

    @property
    def index_dir(self) -> Path:
        return self.root / "index"

    @property
    def models_dir(self) -> Path:
        return self.root / "models"

    @property
    def manifest_path(self) -> Path:
        return self.root / "run.json"

    def manifest(self) -> dict[str, Any]:
        return read_json(self.manifest_path) if self.manifest_path.exists() else {}

    def record_stage(self, stage: str, **info: Any) -> None:
        """Record what a stage did (configuration, versions, timings) in run.json."""
        manifest = self.manifest()
        manifest.setdefault("stages", {})[stage] = {
            **info,
            "versions": versions(),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        write_json(self.manifest_path, manifest)

    def require(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise InfluenceError(
                f"{path.relative_to(self.root)} is missing in run {self.root}: run `{stage}` first"
            )
        return path

    def catalog(self) -> pd.DataFrame:
        return pd.read_parquet(self.require(self.catalog_path, "extract"))

    def image_root(self) -> Path:
        """The folder the catalog's `file` column is relative to."""
        return Path(self.manifest()["collection"]["images"])

    def image_path(self, file: str) -> Path:
        return self.image_root() / file

    def feature_names(self) -> list[str]:
        """Feature sets that extraction has completed, in a stable order."""
        if not self.features_dir.exists():
            return []
        return sorted(p.stem for p in self.features_dir.glob("*.json")
                      if (self.features_dir / f"{p.stem}.npy").exists())

    def features(self, name: str) -> np.ndarray:
        """The float32 feature matrix of one extractor, row i = catalog row i (memory-mapped)."""
        path = self.features_dir / f"{name}.npy"
        if not path.exists():
            known = ", ".join(self.feature_names()) or "none"
            raise InfluenceError(f"no features '{name}' in run {self.root} (extracted: {known})")
        return np.load(path, mmap_mode="r")

    def features_info(self, name: str) -> dict[str, Any]:
        return read_json(self.features_dir / f"{name}.json")


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of a block to timings[key], for the stage records and benchmarks."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
