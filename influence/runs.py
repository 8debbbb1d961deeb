"""The run directory: the unit of work every stage reads from and writes to."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import signal
import sys
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


#: Test hook for the crash-safety tests, a deterministic kill point: `PATH` or `PATH#N` makes
#: the process SIGKILL itself right after it has (for the N-th time) renamed into place a file
#: whose path ends with PATH (run.json included).
KILL_AFTER_WRITE = "INFLUENCE_KILL_AFTER_WRITE"
_writes: dict[str, int] = {}


def _wrote(path: Path) -> None:
    """Count one finished atomic write; die here if the crash-safety test asked for it."""
    target = os.environ.get(KILL_AFTER_WRITE)
    if not target:
        return
    suffix, _, nth = target.partition("#")
    if str(path).endswith(suffix):
        _writes[suffix] = _writes.get(suffix, 0) + 1
        if _writes[suffix] == int(nth or 1):
            os.kill(os.getpid(), signal.SIGKILL)


@contextmanager
def atomic(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write to; renamed onto `path` only on success.

    The temporary name keeps the suffix (writers such as np.save and savefig go by it) and
    starts with a dot, so globs and readers never mistake it for the file. A reader sees the
    old file or the new one, never part of one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _wrote(path)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically, so an interrupted stage never leaves half a file."""
    with atomic(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, default=str, ensure_ascii=False) + "\n")


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


#: Files up to this size are hashed whole; larger ones by sampled blocks (see `file_digest`).
FULL_HASH_MAX = 64 << 20
SAMPLE_BLOCKS = 16
SAMPLE_BLOCK = 1 << 20
_digests: dict[str, tuple[tuple[int, int, int], dict[str, Any]]] = {}


def npy_layout(path: Path) -> tuple[tuple[int, ...], str, int] | None:
    """(shape, dtype, bytes the header promises) of a .npy file, or None if it has no header."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read(f)
            return tuple(shape), dtype.str, f.tell() + int(np.prod(shape)) * dtype.itemsize
    except (ValueError, OSError, EOFError):
        return None


def file_digest(path: Path) -> dict[str, Any]:
    """Size and BLAKE2b-128 checksum of a file, recorded for every output a step writes.

    Files up to FULL_HASH_MAX are hashed whole. Larger ones hash the first and last
    SAMPLE_BLOCK bytes and SAMPLE_BLOCKS - 2 blocks evenly spaced between (a truncated or
    overwritten stretch is caught by the size or a sample; a flipped bit between samples is
    not). A .npy also records its shape and dtype, checked against its header.
    """
    path = Path(path)
    stat = path.stat()
    seen = (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    cached = _digests.get(str(path))
    if cached and cached[0] == seen:
        return cached[1]
    size = stat.st_size
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= FULL_HASH_MAX:
            h = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16))
            rule = "whole"
        else:
            last = size - SAMPLE_BLOCK
            for n in range(SAMPLE_BLOCKS):
                f.seek(last * n // (SAMPLE_BLOCKS - 1))
                h.update(f.read(SAMPLE_BLOCK))
            rule = f"{SAMPLE_BLOCKS} blocks of {SAMPLE_BLOCK} bytes"
    digest: dict[str, Any] = {"bytes": size, "blake2b": h.hexdigest(), "hashed": rule}
    if path.suffix == ".npy" and (layout := npy_layout(path)):
        digest["shape"], digest["dtype"] = list(layout[0]), layout[1]
    _digests[str(path)] = (seen, digest)
    return digest


def damage(path: Path, recorded: dict[str, Any] | None) -> str | None:
    """What is wrong with an output, compared with its record (None if it is intact).

    A .npy is also checked against its own header, so a truncated matrix is caught even in a
    run recorded before checksums were.
    """
    path = Path(path)
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if path.suffix == ".npy":
        layout = npy_layout(path)
        if layout is None:
            return "not a .npy matrix (unreadable header)"
        if size < layout[2]:
            return f"truncated: {size:,} bytes, its shape {layout[0]} needs {layout[2]:,}"
        if size > layout[2]:
            return f"{size - layout[2]:,} bytes longer than its shape {layout[0]} needs"
    if not recorded:
        return None
    if size != recorded["bytes"]:
        return (f"{'truncated' if size < recorded['bytes'] else 'grown'}: {size:,} bytes, "
                f"recorded {recorded['bytes']:,}")
    if file_digest(path)["blake2b"] != recorded["blake2b"]:
        return "contents changed (checksum differs from the recorded one)"
    return None


def rebuilt_by(stage: str, name: str, record: dict[str, Any] | None) -> str:
    """The command (stage and options, in backticks) that rebuilds a step's outputs."""
    code = str((record or {}).get("code", ""))
    if stage == "extract":
        command = ("import-features --name" if code.startswith("imported") else
                   "finetune; features" if code.startswith("finetune") else
                   "combine" if "+" in name else "extract --extractors")
        return f"`{command} {name}`"
    if stage == "train" and "/" in name:
        target, features = name.split("/", 1)
        return f"`train --target {target} --features {features}`"
    if stage in ("cluster", "index"):
        return f"`{stage} --features {name}`"
    return f"`{'extract' if stage in ('catalog', 'thumbnails', 'fetch') else stage}`"


@dataclass(frozen=True)
class Step:
    """One unit of a stage's work and everything that changes its output.

    `params` are its settings and constants, `code` the version of the code that makes it (an
    extractor's `version` and preprocessing, a stage's recipe version), `inputs` fingerprints of
    what it reads (catalog columns, the keys of the steps it reads from) and `outputs` every
    file it writes: each is recorded with its size and checksum and verified before it is
    trusted. Its `key` changes when any of `params`, `code` and `inputs` does.
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
                   inputs: dict[str, str | None], outputs: tuple[Path, ...] = (),
                   params: dict[str, Any] | None = None) -> Step:
    """The Step of fitting `estimators` (none for a stage that only computes): its params are
    their `get_params()`, the stage's own `params` (what it is asked for: a feature set, a file)
    and every constant of the stage module; its code the module's `VERSION`."""
    fitted = {key: estimator_params(e) for key, e in estimators.items()}
    return Step(stage, name, {**fitted, **(params or {}), "constants": module_constants(module)},
                module.VERSION, inputs, outputs)


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


#: Run roots whose writer lock this process holds, and the lock file's descriptor.
_held: dict[Path, int] = {}


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
    def fetched_dir(self) -> Path:
        """Images fetched from a IIIF source or a table's URLs, with the table and the record
        of what was fetched (influence.fetch)."""
        return self.root / "fetched"

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
        """True if run.json records this step with the same key and its outputs are intact.

        A damaged output is reported in one line (stderr); the step is then not done, so
        `Run.step` rebuilds it.
        """
        record = self.step_record(step.stage, step.name)
        if record is None or record.get("key") != step.key:
            return False
        recorded = record.get("outputs", {})
        for path in step.outputs:
            problem = damage(path, recorded.get(self._rel(path)))
            if problem:
                print(f"damaged: {self._rel(path)}: {problem}; rebuilding it (as "
                      f"{rebuilt_by(step.stage, step.name, record)} does)", file=sys.stderr)
                return False
        return True

    def _rel(self, path: Path) -> str:
        """How run.json names a file: relative to the run when inside it."""
        path = Path(path).resolve()
        return str(path.relative_to(self.root)) if path.is_relative_to(self.root) else str(path)

    def damaged(self) -> list[str]:
        """One line per damaged or missing output of every recorded step (the `check` stage)."""
        _digests.clear()
        lines = []
        for stage, steps in self.manifest().get("steps", {}).items():
            for name, record in steps.items():
                for rel, recorded in record.get("outputs", {}).items():
                    problem = damage(self.root / rel, recorded)
                    if problem:
                        lines.append(f"{rel}: {problem} (made by step {stage}/{name}; "
                                     f"{rebuilt_by(stage, name, record)} rebuilds it)")
        return lines

    def verified(self, path: Path) -> Path:
        """`path` once checked against its record: what a stage calls before reading a file.

        A damaged or missing file raises a one-line InfluenceError naming the command that
        rebuilds it; a writer (holding the run's lock) also marks the step that made it not
        done, so the next `run` rebuilds it. Readers change nothing.
        """
        rel = self._rel(path)
        # A reader may look between a writer's rename and its record: it looks once more.
        for attempt in range(1 if self.root in _held else 2):
            time.sleep(0.2 * attempt)
            made = self._made(rel)
            if made is None and not Path(path).exists():
                return Path(path)  # neither recorded nor there: the caller says what is missing
            problem = damage(path, made[2] if made else None)
            if not problem:
                return Path(path)
        if made is None:
            raise InfluenceError(f"{rel} in run {self.root} is damaged ({problem})")
        stage, name, _, record = made
        if self.root in _held:
            self.forget(Step(stage, name, {}, "", {}))
        raise InfluenceError(f"{rel} in run {self.root} is damaged ({problem}): "
                             f"{rebuilt_by(stage, name, record)} rebuilds it")

    def _made(self, rel: str) -> tuple[str, str, dict[str, Any], dict[str, Any]] | None:
        """(stage, name, the file's record, the step's record) of the step that wrote `rel`."""
        for stage, steps in self.manifest().get("steps", {}).items():
            for name, record in steps.items():
                if rel in record.get("outputs", {}):
                    return stage, name, record["outputs"][rel], record
        return None

    def done(self, stage: str | None = None) -> list[tuple[str, str]]:
        """(stage, name) of every finished step, or of one stage's."""
        steps = self.manifest().get("steps", {})
        return [(s, n) for s in ([stage] if stage else list(steps)) for n in steps.get(s, {})]

    def record(self, step: Step, **result: Any) -> dict[str, Any]:
        """Record a finished step (its key, what made it, and what it reports) in run.json."""
        outputs = {self._rel(p): file_digest(p) for p in step.outputs if Path(p).is_file()}
        record = {"key": step.key, "params": step.params, "code": step.code,
                  "inputs": step.inputs, **result, "outputs": outputs, "versions": versions(),
                  "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self._update_steps(step, record)
        return record

    def forget(self, step: Step) -> None:
        """Drop a step's record before it is rebuilt, so an interrupted rebuild is not 'done'."""
        if self.step_record(step.stage, step.name) is not None:
            self._update_steps(step, None)

    def _update_steps(self, step: Step, record: dict[str, Any] | None) -> None:
        with self.writing(step.stage):
            manifest = self.manifest()
            steps = manifest.setdefault("steps", {}).setdefault(step.stage, {})
            if record is None:
                steps.pop(step.name, None)
            else:
                steps[step.name] = record
            write_json(self.manifest_path, manifest)

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def holder(self) -> str:
        """Who holds the run's writer lock, as a person reads it (from the lock file)."""
        try:
            who = json.loads(self.lock_path.read_text() or "{}")
        except (OSError, ValueError):
            who = {}
        if not who:
            return "another process"
        return f"pid {who['pid']} on {who['host']} ({who['stage']}, since {who['since']})"

    @contextmanager
    def writing(self, stage: str, wait: bool = True) -> Iterator[None]:
        """Hold the run's writer lock: one process writes to a run at a time.

        An advisory `fcntl.flock` on RUN/.lock, which the kernel releases when its process
        ends however it ends, so a lock left by a killed process is simply free. Re-entrant
        within a process. A second writer waits, saying who holds it, or with `wait=False`
        raises InfluenceError with that. Readers never take it.
        """
        if self.root in _held:
            yield
            return
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if not wait:
                    raise InfluenceError(f"run {self.root} is being written by {self.holder()}; "
                                         "try again when it has finished") from None
                print(f"waiting: run {self.root} is being written by {self.holder()} "
                      "(--no-wait exits instead)", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": platform.node(),
                                      "stage": stage,
                                      "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}).encode(), 0)
            _held[self.root] = fd
            try:
                yield
            finally:
                del _held[self.root]
                os.ftruncate(fd, 0)
        finally:
            os.close(fd)

    def step(self, step: Step, build: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run `build` unless `step` is up to date, record it, and return its report.

        The report is what `build` returned (or what was recorded), with `up_to_date` and
        `seconds`; this is the one place that decides whether a stage's work is still valid.
        """
        with self.writing(step.stage):
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
        return pd.read_parquet(self.verified(self.require(self.catalog_path, "extract")))

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
        return np.load(self.verified(path), mmap_mode="r")

    def features_info(self, name: str) -> dict[str, Any]:
        return read_json(self.verified(self.features_dir / f"{name}.json"))


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of a block to timings[key], for the stage records and benchmarks."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
