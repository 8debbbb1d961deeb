"""The run directory: the unit of work every stage reads from and writes to."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
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


def file_fingerprint(path: Path) -> str:
    """A short hash of a file's bytes: an input a step reads from outside the run."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def column_fingerprints(catalog: pd.DataFrame, columns: Iterable[str]) -> dict[str, str]:
    """Fingerprints of catalog columns (image ids always), as inputs of a step that reads them.

    A corrected attribution changes no image and no feature row, but it must still redo every
    step that reads that label, and only those.
    """
    wanted = ["image_id", *(c for c in columns if c != "image_id")]
    return {c: fingerprint(str(v) for v in catalog[c].to_numpy(dtype=object))
            for c in wanted if c in catalog}


@dataclass(frozen=True)
class Step:
    """One unit of a stage's work and everything that changes its output.

    `params` are its settings and constants, `code` the version of the code that makes it (an
    extractor's `version` and preprocessing, a stage's recipe version), `inputs` fingerprints of
    what it reads (catalog columns, the keys of the steps it reads from) and `outputs` the files
    that must exist. Its `key` changes when any of them does.
    """

    stage: str
    name: str
    params: dict[str, Any]
    code: str
    inputs: dict[str, str | None]
    outputs: tuple[Path, ...] = ()

    @property
    def key(self) -> str:
        return fingerprint([json.dumps({"params": self.params, "code": self.code,
                                        "inputs": self.inputs}, sort_keys=True, default=str)])


def estimator_params(estimator: Any) -> dict[str, Any]:
    """An estimator's `get_params(deep=True)` as plain values: a nested estimator appears as its
    class name, its own parameters under their `name__param` keys."""
    out = {}
    for key, value in sorted(estimator.get_params(deep=True).items()):
        if hasattr(value, "get_params"):
            value = type(value).__name__
        elif isinstance(value, dict):
            value = {k: estimator_params(v) if hasattr(v, "get_params") else v
                     for k, v in value.items()}
        elif isinstance(value, list | tuple):
            value = [type(v[-1]).__name__ if isinstance(v, tuple) and hasattr(v[-1], "get_params")
                     else v for v in value]
        out[key] = value
    return out


def module_constants(module: ModuleType) -> dict[str, Any]:
    """Every upper-case constant of a stage module (numbers, strings, tuples of them), so a
    step's key follows each one without a hand-kept list that can drift from the code."""
    plain = (bool, int, float, str, tuple, frozenset)
    return {name: sorted(value) if isinstance(value, frozenset) else value
            for name, value in sorted(vars(module).items())
            if name.isupper() and isinstance(value, plain)}


def estimator_step(stage: str, name: str, estimators: dict[str, Any], module: ModuleType,
                   inputs: dict[str, str | None], outputs: tuple[Path, ...] = ()) -> Step:
    """The Step of fitting `estimators`: its params are their `get_params()` and the stage
    module's constants, its code the module's `VERSION`."""
    params = {key: estimator_params(e) for key, e in estimators.items()}
    return Step(stage, name, {**params, "constants": module_constants(module)}, module.VERSION,
                inputs, outputs)


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

    # The run protocol: run.json's "steps" say which step made what, from which inputs.
    def step_record(self, stage: str, name: str) -> dict[str, Any] | None:
        """What run.json records of one step, or None if it is not done."""
        return self.manifest().get("steps", {}).get(stage, {}).get(name)

    def step_key(self, stage: str, name: str) -> str | None:
        """The key of a finished step: the input fingerprint of the steps that read its output."""
        record = self.step_record(stage, name)
        return record["key"] if record else None

    def is_done(self, step: Step) -> bool:
        """True if run.json records this step with the same key and its outputs exist."""
        record = self.step_record(step.stage, step.name)
        return (record is not None and record.get("key") == step.key
                and all(Path(p).exists() for p in step.outputs))

    def done(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, name) of every finished step, or of one stage's."""
        steps = self.manifest().get("steps", {})
        return [(s, n) for s in ([stage] if stage else list(steps)) for n in steps.get(s, {})]

    def record(self, step: Step, **result: Any) -> dict[str, Any]:
        """Record a finished step (its key, what made it, and what it reports) in run.json."""
        record = {"key": step.key, "params": step.params, "code": step.code,
                  "inputs": step.inputs, **result, "versions": versions(),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._update_steps(step, record)
        return record

    def forget(self, step: Step) -> None:
        """Drop a step's record before it is rebuilt, so an interrupted rebuild is not 'done'."""
        if self.step_record(step.stage, step.name) is not None:
            self._update_steps(step, None)

    def _update_steps(self, step: Step, record: dict[str, Any] | None) -> None:
        manifest = self.manifest()
        steps = manifest.setdefault("steps", {}).setdefault(step.stage, {})
        if record is None:
            steps.pop(step.name, None)
        else:
            steps[step.name] = record
        write_json(self.manifest_path, manifest)

    def step(self, step: Step, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `build` unless `step` is up to date, record it, and return its report.

        The report is what `build` returned (or what was recorded), with `up_to_date` and
        `seconds`; this is the one place that decides whether a stage's work is still valid.
        """
        if self.is_done(step):
            return {**self.step_record(step.stage, step.name), "up_to_date": True}
        self.forget(step)
        start = time.perf_counter()
        result = build()
        record = self.record(step, **result, seconds=round(time.perf_counter() - start, 2))
        return {**record, "up_to_date": False}

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
