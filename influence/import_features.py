"""Bring your own vectors: a feature set computed elsewhere, checked and stored like any other.

Accepted files: Parquet or CSV with an `image_id` or `file` column and the vector, either as one
column of lists or as one numeric column per dimension; or a `.npy` matrix with `ids`, a CSV or
Parquet table giving each row's `image_id` or `file` in order. Every row is checked on the way
in: its painting must be in the catalog, once, and its vector must have the common dimension and
finite values; every catalog painting needs a vector. Problems are listed, one row per painting
with its reason, in `features/<name>.import-problems.csv`. Rows of paintings the catalog does not
know are left out with a note; any other problem stops the import, so a set never has a hole.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from influence.combine import save_features
from influence.extractors import available
from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    file_fingerprint,
    fingerprint,
    versions,
)

NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
KEYS = ("image_id", "file")


def problems_path(run: Run, name: str) -> Path:
    return run.features_dir / f"{name}.import-problems.csv"


def _table(path: Path) -> pd.DataFrame:
    suffix = path.suffix.lower()
    try:
        if suffix == ".parquet":
            return pd.read_parquet(path)
        if suffix == ".csv":
            return pd.read_csv(path, dtype={k: str for k in KEYS})
    except (OSError, ValueError) as e:
        raise InfluenceError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    raise InfluenceError(f"{path}: expected a .parquet, .csv or .npy file")


def read_vectors(path: Path, ids: Path | None = None) -> tuple[pd.Series, list[np.ndarray | None],
                                                                str]:
    """(keys, one vector per row or None if unreadable, key column) from a file as described."""
    if path.suffix.lower() == ".npy":
        if ids is None:
            raise InfluenceError(f"{path} is a bare matrix: give --ids TABLE with its rows' "
                                 f"image_id or file")
        matrix = np.load(path, allow_pickle=False)
        table = _table(ids)
        if matrix.ndim != 2 or len(matrix) != len(table):
            raise InfluenceError(f"{path} has shape {matrix.shape}; expected a 2-d matrix with "
                                 f"one row per row of {ids} ({len(table)})")
        vectors = list(matrix.astype(np.float32))
    else:
        table = _table(path)
    key = next((k for k in KEYS if k in table.columns), None)
    if key is None:
        raise InfluenceError(f"{ids or path} has no image_id or file column")
    if path.suffix.lower() != ".npy":
        rest = table.drop(columns=[k for k in KEYS if k in table.columns])
        if len(rest.columns) == 1 and rest.iloc[:, 0].map(np.ndim).eq(1).all():
            vectors = [np.asarray(v, dtype=np.float32) for v in rest.iloc[:, 0]]
        else:
            numeric = rest.apply(pd.to_numeric, errors="coerce")
            bad = [c for c in rest.columns if numeric[c].isna().all()]
            if bad or rest.empty:
                raise InfluenceError(f"{path}: expected one column of vectors or numeric columns, "
                                     f"found {', '.join(map(str, bad or rest.columns))[:200]}")
            vectors = list(numeric.to_numpy(dtype=np.float32))
    return table[key].astype(str), vectors, key


def import_features(run: Run, name: str, path: Path, ids: Path | None = None) -> dict[str, Any]:
    """Check and store the vectors in `path` as feature set `name`; returns its JSON."""
    if not NAME.fullmatch(name) or name in available():
        raise InfluenceError(f"'{name}' cannot name an imported set: use letters, digits, _ . - "
                             f"and not an extractor's name")
    path = Path(path).resolve()
    if not path.is_file():
        raise InfluenceError(f"no file {path}")
    digest = file_fingerprint(path)
    if ids is not None:
        ids = Path(ids).resolve()
        digest += file_fingerprint(ids)
    catalog = run.catalog()
    catalog_key = fingerprint(catalog["image_id"].tolist())
    config = {"imported": str(path), "ids": str(ids) if ids else None, "sha256": digest}
    step = Step("extract", name, config, "imported-1", {"catalog": catalog_key},
                (run.features_dir / f"{name}.npy", run.features_dir / f"{name}.json"))
    report = run.step(step, lambda: _import(run, name, path, ids, config, catalog_key))
    return {**run.features_info(name), "up_to_date": report["up_to_date"]}


def _import(run: Run, name: str, path: Path, ids: Path | None, config: dict[str, Any],
            catalog_key: str) -> dict[str, Any]:
    """Read, check and store the vectors; returns what run.json records."""
    catalog = run.catalog()
    keys, vectors, key = read_vectors(path, ids)
    by_key = catalog.set_index(key)["image_id"] if key == "file" else None
    image_ids = keys.map(by_key) if by_key is not None else keys.where(
        keys.isin(catalog["image_id"]))
    dims = pd.Series([len(v) for v in vectors])
    dim = int(dims.mode().iloc[0]) if len(dims) else 0
    problems = []
    for i, (k, image_id, v) in enumerate(zip(keys, image_ids, vectors, strict=True)):
        if pd.isna(image_id):
            problems.append((k, i, "unknown", f"no painting with this {key} in the catalog"))
        elif len(v) != dim:
            problems.append((k, i, "bad", f"dimension {len(v)}, the others have {dim}"))
        elif not np.isfinite(v).all():
            problems.append((k, i, "bad", "NaN or infinite values"))
    counts = image_ids.value_counts()
    for image_id in counts[counts > 1].index:
        problems.append((image_id, None, "bad", f"{counts[image_id]} rows for one painting"))
    for image_id in sorted(set(catalog["image_id"]) - set(image_ids.dropna())):
        problems.append((image_id, None, "bad", "no vector for this catalog painting"))
    listed = pd.DataFrame(problems, columns=["key", "row", "kind", "reason"])
    problem_file = problems_path(run, name)
    problem_file.unlink(missing_ok=True)
    if problems:
        with atomic(problem_file) as tmp:
            listed.to_csv(tmp, index=False)
    bad = listed[listed["kind"] == "bad"]
    if len(bad):
        first = "; ".join(f"{r.key}: {r.reason}" for r in bad.head(2).itertuples())
        raise InfluenceError(f"{name}: {len(bad)} problem rows in {path.name} ({first}); all "
                             f"listed in {problem_file}")
    unknown = int((listed["kind"] == "unknown").sum())
    if unknown:
        print(f"note: {name}: left out {unknown} rows the catalog does not know "
              f"(listed in {problem_file})")
    position = pd.Series(np.arange(len(keys)), index=image_ids.to_numpy())
    order = position.loc[catalog["image_id"]].to_numpy()

    def fill(out: np.ndarray) -> None:
        for start in range(0, len(order), 8192):
            out[start:start + 8192] = np.stack([vectors[i] for i in order[start:start + 8192]])

    info = {"extractor": "imported", "dim": dim, "rows": len(catalog),
            "weights": f"imported from {path}", "preprocessing": "none (vectors as given)",
            "config": config, "catalog": catalog_key, "left_out_unknown": unknown,
            "versions": versions()}
    save_features(run, name, len(catalog), dim, fill, info)
    return {"dim": dim, "rows": len(catalog), "left_out_unknown": unknown}
