"""The run directory: the unit of work every stage reads from and writes to."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
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


#: A step fitted on some paintings extends to paintings added or removed since (the fitted
#: models assign, place or index them) until those changes reach this share of the paintings it
#: was fitted on; past it, or when asked (`--refit`), it is fitted again on all of them.
REFIT_SHARE = 0.2


def row_digests(table: pd.DataFrame) -> np.ndarray:
    """One 64-bit hash per row of a table's values (read as text), to tell a changed row."""
    if table.shape[1] == 0:
        return np.zeros(len(table), dtype=np.uint64)
    text = table.astype("string").reset_index(drop=True)
    return pd.util.hash_pandas_object(text, index=False).to_numpy(dtype=np.uint64)


@dataclass(frozen=True, eq=False)
class Rows:
    """The catalog rows a step's outputs are aligned with (image_id first, then every column it
    reads per painting), which of those columns its fit reads (`fit`), and whether it fits a
    model on its rows at all (`fitted`; False: each row is computed on its own, so added and
    removed paintings always extend it)."""

    table: pd.DataFrame
    fit: tuple[str, ...] = ()
    fitted: bool = True

    @property
    def ids(self) -> pd.Index:
        return pd.Index(self.table["image_id"].astype(str).to_numpy(), dtype=object)

    @property
    def fingerprint(self) -> str:
        """A hash of every value of the table, in order: part of the step's key."""
        return fingerprint([",".join(map(str, self.table.columns)),
                            row_digests(self.table).tobytes().hex()])

    def fit_digests(self) -> np.ndarray:
        """Per row, a hash of the columns the fit reads (zeros when it reads none)."""
        return row_digests(self.table[list(self.fit)])


@dataclass(frozen=True)
class Growth:
    """Paintings added and removed since a step's outputs were written: `before` the image ids
    its outputs hold (in their order), `after` those they must hold (the catalog's order)."""

    before: pd.Index
    after: pd.Index
    #: The step's record before it extends (its fit and what it reported then).
    record: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def take(self) -> np.ndarray:
        """For each row of `after`, its row in `before`, or -1 for a painting added since."""
        return self.before.get_indexer(self.after)

    @property
    def new(self) -> np.ndarray:
        """Mask over `after` of the paintings added since."""
        return self.take < 0

    @property
    def added(self) -> list[str]:
        return [str(i) for i in self.after[self.new]]

    @property
    def removed(self) -> list[str]:
        return [str(i) for i in self.before[~self.before.isin(self.after)]]

    @property
    def appended(self) -> bool:
        """True when `after` is `before` less the removed rows, in order, then the new ones: an
        index can then drop and add rows instead of being refilled."""
        kept = self.take[~self.new]
        n_kept = len(kept)
        return bool(np.all(np.diff(kept) > 0) and not self.new[:n_kept].any())

    def realign(self, old: np.ndarray, new_rows: np.ndarray) -> np.ndarray:
        """Rows for `after`: the kept rows of `old` (aligned with `before`) where the painting was
        there, `new_rows` (one per added painting, in order) where it was added."""
        take = self.take
        out = np.empty((len(take), *old.shape[1:]), dtype=np.result_type(old, new_rows))
        out[take >= 0] = np.asarray(old)[take[take >= 0]]
        out[take < 0] = new_rows
        return out

    def summary(self) -> dict[str, Any]:
        added, removed = self.added, self.removed
        return {"rows": len(self.after), "added": len(added), "removed": len(removed),
                "added_ids": added[:SHOWN_IDS], "removed_ids": removed[:SHOWN_IDS]}


#: Image ids of added and removed paintings listed in run.json (the counts are always whole).
SHOWN_IDS = 50


@dataclass(frozen=True)
class Decision:
    """What `Run.decide` found for a step: `keep` (up to date), `extend` (its fit still holds;
    `growth` says what changed) or `fit`, and why. `refit`: a fit that still held is redone
    (grown past REFIT_SHARE, its fitted paintings' labels changed, or `--refit`)."""

    action: str
    why: str
    growth: Growth | None = None
    record: dict[str, Any] | None = None
    refit: bool = False


@dataclass(frozen=True)
class Step:
    """One unit of a stage's work and everything that changes its output.

    `params` are its settings and constants, `code` the version of the code that makes it (an
    extractor's `version` and preprocessing, a stage's recipe version), `inputs` fingerprints of
    what it reads (catalog columns, the keys of the steps it reads from) and `outputs` every
    file it writes: each is recorded with its size and checksum and verified before it is
    trusted. Its `key` changes when any of `params`, `code`, `inputs` and `rows` does.

    A step whose outputs are aligned with the catalog declares its `rows` (`Rows`) instead of
    the image-id and label fingerprints: its `lineage` (params, code and inputs: what its fit
    depends on, the `fit_key` of each step it reads) then tells a collection that grew or
    shrank, which `Run.step` extends, from a change that must fit it again.
    """

    stage: str
    name: str
    params: dict[str, Any]
    code: str
    inputs: dict[str, str | None]
    outputs: tuple[Path, ...] = ()
    rows: Rows | None = None

    @property
    def lineage(self) -> str:
        return fingerprint([json.dumps({"params": self.params, "code": self.code,
                                        "inputs": self.inputs}, sort_keys=True, default=str)])

    @property
    def key(self) -> str:
        if self.rows is None:
            return self.lineage
        return fingerprint([self.lineage, self.rows.fingerprint])


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
                   params: dict[str, Any] | None = None, rows: Rows | None = None) -> Step:
    """The Step of fitting `estimators` (none for a stage that only computes): its params are
    their `get_params()`, the stage's own `params` (what it is asked for: a feature set, a file)
    and every constant of the stage module; its code the module's `VERSION`."""
    fitted = {key: estimator_params(e) for key, e in estimators.items()}
    return Step(stage, name, {**fitted, **(params or {}), "constants": module_constants(module)},
                module.VERSION, inputs, outputs, rows)


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
#: Serialises this process's read-modify-write of run.json: `run` records steps from two
#: threads (train and review beside cluster and influence).
_MANIFEST_LOCK = threading.RLock()


@dataclass(frozen=True)
class Run:
    """Paths inside a run directory, and the shared readers of what stages wrote there.

    `refit`: the steps this process brings up to date are fitted again even where their fit
    would still extend to paintings added or removed since (`--refit`).
    """

    root: Path
    refit: bool = False

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

    def fit_key(self, stage: str, name: str) -> str | None:
        """The key a finished step had when it was last fitted (its key when it never was
        extended): what a step that extends with it reads, so that paintings added upstream
        extend it too, and a refit upstream fits it again."""
        record = self.step_record(stage, name)
        if record is None:
            return None
        return (record.get("fit") or {}).get("key", record["key"])

    def rows_path(self, step: Step) -> Path:
        """Where the protocol keeps the image ids a step's outputs hold (steps with `rows`)."""
        return self.root / "rows" / step.stage / f"{step.name}.parquet"

    def _files(self, step: Step) -> tuple[Path, ...]:
        return step.outputs + ((self.rows_path(step),) if step.rows is not None else ())

    def is_done(self, step: Step) -> bool:
        """True if run.json records this step with the same key and its outputs are intact.

        A damaged output is reported in one line (stderr); the step is then not done, so
        `Run.step` rebuilds it.
        """
        record = self.step_record(step.stage, step.name)
        if record is None or record.get("key") != step.key:
            return False
        return self._intact(step, record)

    def _intact(self, step: Step, record: dict[str, Any]) -> bool:
        recorded = record.get("outputs", {})
        for path in self._files(step):
            problem = damage(path, recorded.get(self._rel(path)))
            if problem:
                print(f"damaged: {self._rel(path)}: {problem}; rebuilding it (as "
                      f"{rebuilt_by(step.stage, step.name, record)} does)", file=sys.stderr)
                return False
        return True

    def decide(self, step: Step, extendable: bool = True) -> Decision:
        """Whether a step is up to date (`keep`), extends its fit to paintings added or removed
        since (`extend`) or must be fitted (`fit`): the one place that decides.

        It extends when it can (`extendable`, `rows` declared), its lineage is the one it was
        fitted with, its outputs are intact, and, for a step that fits on its rows, the paintings
        added and removed since its fit are at most REFIT_SHARE of those it was fitted on, no
        fitted painting's `rows.fit` columns changed, and the run was not asked to refit.
        """
        record = self.step_record(step.stage, step.name)
        if record is None:
            return Decision("fit", "first fit")
        fit = record.get("fit")
        refit_asked = (self.refit and step.rows is not None and step.rows.fitted
                       and bool(record.get("growth")))
        # Its files are checked (and a damaged one reported) once: when its key is the same,
        # or when it could extend them.
        intact = self._intact(step, record) if record.get("key") == step.key else None
        if intact and not refit_asked:
            return Decision("keep", "up to date", record=record)
        before = self._rows_before(step)
        growth = None if before is None else Growth(
            pd.Index(before["image_id"].astype(str).to_numpy(), dtype=object), step.rows.ids,
            record)
        if step.rows is None or not extendable or not fit:
            return Decision("fit", "its settings, code or inputs changed", growth, record)
        if fit.get("lineage") != step.lineage:
            return Decision("fit", "its settings, code or what it reads changed", growth, record)
        if intact is None:
            intact = self._intact(step, record)
        if before is None or growth is None or not intact:
            return Decision("fit", "its outputs are damaged", growth, record)
        if not step.rows.fitted:
            return Decision("extend", "nothing is fitted on its rows", growth, record)
        if self.refit:
            return Decision("fit", "asked (--refit)", growth, record, refit=True)
        take = growth.take
        fitted = before["fitted"].to_numpy(dtype=bool)
        both = take >= 0
        old_digest = before["digest"].to_numpy().view(np.uint64)[take[both]]
        changed = int((fitted[take[both]] & (old_digest != step.rows.fit_digests()[both])).sum())
        if changed:
            return Decision("fit", f"{', '.join(step.rows.fit)} of {changed} of the paintings "
                                   "it was fitted on changed", growth, record, refit=True)
        # Added since the fit (now or in an earlier extension), and fitted ones gone since.
        n_fit = int(fit["rows"])
        still = fitted[take[both]]
        since = int(growth.new.sum()) + int((~still).sum()) + n_fit - int(still.sum())
        share = since / max(n_fit, 1)
        if share > REFIT_SHARE:
            return Decision("fit", f"{since} paintings added or removed since its fit on "
                                   f"{n_fit} ({share:.0%}, past REFIT_SHARE {REFIT_SHARE:.0%})",
                            growth, record, refit=True)
        return Decision("extend", f"{since} paintings added or removed since its fit on {n_fit} "
                                  f"({share:.0%}, within REFIT_SHARE {REFIT_SHARE:.0%})",
                        growth, record)

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

    def _rows_before(self, step: Step) -> pd.DataFrame | None:
        """The rows file a step wrote last (None without rows, or if it is unreadable)."""
        if step.rows is None:
            return None
        try:
            return pd.read_parquet(self.rows_path(step))
        except (OSError, ValueError):
            return None

    def record(self, step: Step, decision: Decision | None = None,
               **result: Any) -> dict[str, Any]:
        """Record a finished step (its key, what made it, and what it reports) in run.json.

        A step with `rows` also records its rows (RUN/rows/), its fit (the key, lineage, rows
        and time it was fitted with, and why) and every extension since; a step that extended
        or was refitted because paintings were added or removed is listed under that change of
        the catalog in run.json's `changes`.
        """
        now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        extra: dict[str, Any] = {}
        change = None
        if step.rows is not None:
            decision = decision or Decision("fit", "first fit")
            extra, change = self._record_rows(step, decision, now)
        outputs = {self._rel(p): file_digest(p) for p in self._files(step) if Path(p).is_file()}
        record = {"key": step.key, "params": step.params, "code": step.code,
                  "inputs": step.inputs, **extra, **result, "outputs": outputs,
                  "versions": versions(), "finished_at": now}
        self._update_steps(step, record, change)
        return record

    def _record_rows(self, step: Step, decision: Decision, now: str
                     ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Write the step's rows file; return its fit and growth entries and its catalog
        change (None when no painting was added or removed)."""
        rows = step.rows
        assert rows is not None
        growth = decision.growth
        extended = decision.action == "extend"
        if extended and growth is not None:
            before = pd.read_parquet(self.rows_path(step))
            was_fitted = before["fitted"].to_numpy(dtype=bool)
            fitted = np.where(growth.new, False, was_fitted[np.maximum(growth.take, 0)])
        else:
            fitted = np.ones(len(rows.table), dtype=bool)
        table = pd.DataFrame({"image_id": pd.array(rows.ids, dtype="string"),
                              "digest": rows.fit_digests().view(np.int64), "fitted": fitted})
        with atomic(self.rows_path(step)) as tmp:
            table.to_parquet(tmp, index=False)
        moved = growth.summary() if growth is not None else None
        if extended:
            old = decision.record or {}
            fit, history = old["fit"], [*old.get("growth", []),
                                        {"at": now, **(moved or {}), "why": decision.why}]
        else:
            fit = {"key": step.key, "lineage": step.lineage, "rows": len(rows.table), "at": now,
                   "why": decision.why}
            history = []
        action = "extended" if extended else "fitted"
        change = None
        if moved and (moved["added"] or moved["removed"]):
            change = {**moved, "catalog": fingerprint(rows.ids),
                      "step": f"{step.stage}/{step.name}",
                      "action": action if extended else f"refitted: {decision.why}"}
        return {"action": action, "rows": len(rows.table), "fit": fit, "growth": history}, change

    def forget(self, step: Step) -> None:
        """Drop a step's record before it is rebuilt, so an interrupted rebuild is not 'done'."""
        if self.step_record(step.stage, step.name) is not None:
            self._update_steps(step, None)

    def _update_steps(self, step: Step, record: dict[str, Any] | None,
                      change: dict[str, Any] | None = None) -> None:
        with _MANIFEST_LOCK, self.writing(step.stage):
            manifest = self.manifest()
            steps = manifest.setdefault("steps", {}).setdefault(step.stage, {})
            if record is None:
                steps.pop(step.name, None)
            else:
                steps[step.name] = record
            if change is not None:
                _log_change(manifest.setdefault("changes", []), change, record["finished_at"])
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

    def step(self, step: Step, build: Callable[[], dict[str, Any]],
             extend: Callable[[Growth], dict[str, Any]] | None = None) -> dict[str, Any]:
        """Run `build` (or `extend`) unless `step` is up to date, record it, return its report.

        `extend(growth)`, for a step with `rows`, brings outputs made by its kept fit up to the
        catalog's rows (paintings added, removed, reordered or relabelled); `decide` says when
        it may. The report is what `build` or `extend` returned (or what was recorded), with
        `up_to_date` and `seconds`; this is the one place that decides whether a stage's work
        is still valid.
        """
        with self.writing(step.stage):
            decision = self.decide(step, extend is not None)
            if decision.action == "keep":
                return {**self.step_record(step.stage, step.name), "up_to_date": True}
            self.forget(step)
            start = time.perf_counter()
            if decision.action == "extend" and extend and decision.growth is not None:
                result = extend(decision.growth)
            else:
                result = build()
            record = self.record(step, decision, **result,
                                 seconds=round(time.perf_counter() - start, 2))
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


def keep_row_order(catalog: pd.DataFrame, previous: Path) -> pd.DataFrame:
    """The catalog with the paintings of the run's previous catalog first, in their previous
    order, then the others in the collection's: so a grown run's aligned files only append."""
    try:
        old = pd.read_parquet(previous, columns=["image_id"])["image_id"].astype(str)
    except (OSError, ValueError, KeyError):
        return catalog
    position = pd.Index(old).get_indexer(catalog["image_id"].astype(str))
    order = np.where(position >= 0, position, len(old) + np.arange(len(catalog)))
    return catalog.iloc[np.argsort(order, kind="stable")].reset_index(drop=True)


def _log_change(changes: list[dict[str, Any]], change: dict[str, Any], at: str) -> None:
    """Add a step's extension or refit to the entry of its catalog in run.json's `changes`
    (made by the first step that meets that catalog: when, how many added and removed). Only
    the last entry is its catalog's: a collection back to an earlier state (paintings removed,
    then added again) is a change of its own."""
    entry = changes[-1] if changes and changes[-1].get("catalog") == change["catalog"] else None
    if entry is None:
        entry = {"at": at, **{k: change[k] for k in ("catalog", "rows", "added", "removed",
                                                     "added_ids", "removed_ids")},
                 "extended": [], "refitted": {}}
        changes.append(entry)
    if change["action"] == "extended":
        if change["step"] not in entry["extended"]:
            entry["extended"].append(change["step"])
    else:
        entry["refitted"][change["step"]] = change["action"].removeprefix("refitted: ")


@contextmanager
def timed(timings: dict[str, float], key: str) -> Iterator[None]:
    """Add the wall time of a block to timings[key], for the stage records and benchmarks."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
