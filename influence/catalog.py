"""The catalog: read a collection, validate every row and image, and keep one row per image.

A collection is a folder of images and a metadata CSV. Every unique image gets a stable
content-hash id; rows that cannot be used go to `rejected.csv` with a reason, never silently.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from influence.images import DEFAULT_LIMITS, BadImage, ImageLimits, open_rgb
from influence.runs import (
    InfluenceError,
    Run,
    Step,
    atomic,
    column_fingerprints,
    file_fingerprint,
    keep_row_order,
    write_json,
)

#: Catalog field -> CSV column name; override any of them with `--columns field=csv_name`.
DEFAULT_COLUMNS: dict[str, str] = {
    "file": "file", "title": "title", "artist": "artist", "nationality": "nationality",
    "birth_year": "birth_year", "death_year": "death_year", "year": "year",
    "style": "style", "genre": "genre",
}
TEXT_FIELDS = ("title", "artist", "nationality", "style", "genre")
YEAR_FIELDS = ("year", "birth_year", "death_year")
LABEL_FIELDS = ("artist", "nationality", "era", "genre", "style")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
ERA_WIDTH = 50
#: Version of the catalog's rules (validation, era): bump it when a change alters the catalog.
VERSION = "1"
REJECTED_COLUMNS = ["row", "file", "reason", "detail", *TEXT_FIELDS]


def artist_slug(name: str) -> str:
    """An artist's id in URLs and JSON: ASCII, lower case, words joined by '-' ("Claude Monet"
    -> "claude-monet"); stable, so a link to an artist survives a rebuilt run."""
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class Collection:
    """Where a collection lives: the metadata CSV, the folder its `file` column is relative to,
    and how its columns are named."""

    metadata: Path
    images: Path
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))

    @classmethod
    def from_dir(cls, folder: Path, columns: dict[str, str] | None = None) -> Collection:
        folder = Path(folder)
        csvs = sorted(folder.glob("*.csv"))
        metadata = folder / "paintings.csv"
        if not metadata.exists():
            if len(csvs) != 1:
                raise InfluenceError(f"{folder}: expected paintings.csv (or a single .csv) in the "
                                     "collection folder; give --metadata CSV --images DIR instead")
            metadata = csvs[0]
        return cls(metadata.resolve(), folder.resolve(), {**DEFAULT_COLUMNS, **(columns or {})})

    def describe(self) -> dict[str, object]:
        return {"metadata": str(self.metadata), "images": str(self.images), "columns": self.columns}


def read_metadata(
    collection: Collection,
) -> tuple[pd.DataFrame, list[dict[str, object]], list[str]]:
    """Read the CSV into catalog field names; returns (rows, rejected lines, warnings).

    Undecodable bytes are read as cp1252 line by line, malformed lines are rejected, missing
    optional columns are left empty; only an unreadable file or a missing `file` column is fatal.
    """
    path = collection.metadata
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InfluenceError(f"cannot read metadata {path}: {e.strerror or e}") from None
    if b"\0" in raw[:4096]:
        raise InfluenceError(f"cannot read metadata {path}: it is a binary file, not a CSV")
    text, notes = _decode(raw)
    header, lines, records, rejected = read_records(text)
    if header is None:
        raise InfluenceError(f"cannot read metadata {path}: No columns to parse (no header line)")
    df = pd.DataFrame(records, columns=_unique([c.strip() for c in header]), dtype=object)
    wanted = collection.columns
    if wanted["file"] not in df.columns:
        raise InfluenceError(
            f"metadata {path} has no '{wanted['file']}' column (columns: {', '.join(df.columns)}); "
            f"name it with --columns file=COLUMN")
    for name, column in wanted.items():
        if column not in df.columns:
            notes.append(f"column '{column}' ({name}) is not in the CSV; it is left empty")
            df[column] = ""
    out = pd.DataFrame({name: df[column].str.strip() for name, column in wanted.items()})
    out = out.replace("", pd.NA)
    # The CSV line each record starts on (the header is line 1), so a person can find the row.
    out.insert(0, "row", np.asarray(lines, dtype=np.int64))
    for name in YEAR_FIELDS:
        parsed = out[name].map(_parse_year, na_action="ignore")
        bad = out[name].notna() & parsed.isna()
        if bad.any():
            notes.append(f"{int(bad.sum())} unreadable '{name}' values left empty")
        out[name] = parsed.astype("Int64")
    swapped = out["birth_year"].notna() & out["death_year"].notna() & (
        out["death_year"] < out["birth_year"])
    if swapped.any():
        notes.append(f"{int(swapped.sum())} rows with death before birth: lifespan left empty")
        out.loc[swapped, ["birth_year", "death_year"]] = pd.NA
    return out, rejected, notes


def read_records(text: str) -> tuple[list[str] | None, list[int], list[list[str]],
                                        list[dict[str, object]]]:
    """Parse CSV text record by record: (header, start lines, records, rejected lines).

    A record the csv module cannot read (a cell over its field limit, a bare carriage return
    in an unquoted cell, a stray quote) or with more cells than the header is rejected with
    the parser's reason and its line, never dropped; short records are padded with empty
    cells. Lines split only at "\\n", so a lone "\\r" is an error, not a line break.
    """
    if "\n" not in text:
        text = text.replace("\r", "\n")  # a file with old Mac line ends
    reader = csv.reader(io.StringIO(text, newline="\n"), strict=True)
    header: list[str] | None = None
    lines: list[int] = []
    records: list[list[str]] = []
    rejected: list[dict[str, object]] = []
    physical = text.split("\n")
    while True:
        start = reader.line_num + 1
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            end = max(reader.line_num, start)
            shown = "\n".join(physical[start - 1:end])
            rejected.append({"row": start, "file": shown.split(",", 1)[0][:300],
                             "reason": "unreadable CSV record",
                             "detail": f"{_csv_problem(e)}: {shown[:300]}"})
            continue
        if not any(c.strip() for c in cells):
            continue
        if header is None:
            header = cells
        elif len(cells) > len(header):
            rejected.append({"row": start, "file": cells[0] if cells else "",
                             "reason": "malformed CSV line",
                             "detail": f"{len(cells)} cells, the header has {len(header)}: "
                                       + ",".join(cells)[:300]})
        else:
            lines.append(start)
            records.append(cells + [""] * (len(header) - len(cells)))
    return header, lines, records, rejected


def _csv_problem(error: csv.Error) -> str:
    """The csv module's complaint in a user's words."""
    text = str(error)
    if "field limit" in text:
        return f"a cell longer than {csv.field_size_limit():,} characters"
    if "new-line character" in text:
        return "a bare carriage return (\\r) in an unquoted cell"
    return text


def _unique(names: list[str]) -> list[str]:
    """Column names made unique as pandas does ('a', 'a.1', ...)."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        n = seen.get(name, 0)
        seen[name] = n + 1
        out.append(f"{name}.{n}" if n else name)
    return out


def _decode(raw: bytes) -> tuple[str, list[str]]:
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        pass
    lines, fixed = [], 0
    for line in raw.splitlines(keepends=True):
        try:
            lines.append(line.decode("utf-8"))
        except UnicodeDecodeError:
            lines.append(line.decode("cp1252", errors="replace"))
            fixed += 1
    text = "".join(lines).lstrip("\ufeff")
    return text, [f"{fixed} lines were not UTF-8 and were read as Windows-1252"]


_YEAR = re.compile(r"(?<!\d)(\d{3,4})(?!\d)")


def _parse_year(value: str) -> float:
    """A year from '1889', '1889.0', 'c. 1889' or '1889-1890' (the first); NaN if none."""
    match = _YEAR.search(str(value))
    return float(match.group(1)) if match else np.nan


def derive_era(df: pd.DataFrame) -> pd.DataFrame:
    """Add era_year, era (a half-century such as '1850-1899') and era_source.

    The work's own year is used where known. Otherwise the year is estimated from the artist's
    life as the middle of their working life, from age 20 to death; with only a birth year,
    birth + 40; with only a death year, death - 15. Rows with none of these have no era.
    """
    birth, death = df["birth_year"].astype("Float64"), df["death_year"].astype("Float64")
    from_life = ((birth + 20 + death) / 2).fillna(birth + 40).fillna(death - 15)
    year = df["year"].astype("Float64")
    era_year = year.fillna(from_life).round().astype("Int64")
    source = pd.Series(pd.NA, index=df.index, dtype="string")
    source[from_life.notna()] = "artist_life"
    source[year.notna()] = "year"
    start = (era_year // ERA_WIDTH) * ERA_WIDTH
    era = start.astype("string") + "-" + (start + ERA_WIDTH - 1).astype("string")
    return df.assign(era_year=era_year, era=era, era_source=source)


@dataclass(frozen=True)
class FileCheck:
    """What validating one image file found: its content id and size, or why it is unusable."""

    image_id: str | None
    width: int | None
    height: int | None
    mode: str | None
    nbytes: int | None
    error: str | None


def check_image(path: Path, limits: ImageLimits = DEFAULT_LIMITS) -> FileCheck:
    """Hash and fully decode one image, so that extraction later never meets a bad file."""
    try:
        data = path.read_bytes() if path.is_file() else None
    except OSError as e:
        return FileCheck(None, None, None, None, None, f"unreadable file: {e.strerror}")
    if data is None:
        return FileCheck(None, None, None, None, None, "file not found")
    try:
        img = open_rgb(data, limits)
        with Image.open(io.BytesIO(data)) as probe:
            mode = probe.mode
    except BadImage as e:
        return FileCheck(None, None, None, None, len(data), str(e))
    except Exception as e:
        return FileCheck(None, None, None, None, len(data), f"unreadable image: {e}")
    digest = hashlib.sha256(data).hexdigest()[:16]
    return FileCheck(digest, img.width, img.height, mode, len(data), None)


def _checks(paths: list[Path], cache_path: Path, limits: ImageLimits,
            progress: bool) -> list[FileCheck]:
    """check_image for every path, reusing results for files whose size and mtime are unchanged."""
    cache: dict[tuple[str, int, int], FileCheck] = {}
    if cache_path.exists():
        old = pd.read_parquet(cache_path)
        for rec in old.to_dict("records"):
            key = (rec.pop("path"), rec.pop("size"), rec.pop("mtime_ns"))
            cache[key] = FileCheck(**{k: (None if pd.isna(v) else v) for k, v in rec.items()})
    keys = []
    for p in paths:
        try:
            st = p.stat()
            keys.append((str(p), st.st_size, st.st_mtime_ns))
        except OSError:
            keys.append((str(p), -1, -1))
    todo = [i for i, k in enumerate(keys) if k not in cache or k[1] < 0]
    results: dict[int, FileCheck] = {}
    if todo:
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            bar = tqdm(pool.map(lambda i: check_image(paths[i], limits), todo), total=len(todo),
                       desc="checking images", unit="img", disable=not progress)
            results = dict(zip(todo, bar, strict=True))
    checks = [results.get(i) or cache[k] for i, k in enumerate(keys)]
    records = [{"path": k[0], "size": k[1], "mtime_ns": k[2], **c.__dict__}
               for k, c in zip(keys, checks, strict=True) if k[1] >= 0]
    with atomic(cache_path) as tmp:
        pd.DataFrame.from_records(records, columns=["path", "size", "mtime_ns",
                                                    *FileCheck.__dataclass_fields__]).to_parquet(
            tmp, index=False)
    return checks


@dataclass
class CatalogResult:
    catalog: pd.DataFrame
    rejected: pd.DataFrame
    notes: list[str]


def build_catalog(collection: Collection, run: Run, limits: ImageLimits = DEFAULT_LIMITS,
                  progress: bool = True,
                  upstream: Sequence[dict[str, object]] = ()) -> CatalogResult:
    """Validate a collection and write catalog.parquet and rejected.csv into the run.

    `upstream` are rows left out before the collection was made (canvases or table rows whose
    image could not be fetched, influence.fetch); rejected.csv lists them first.
    """
    if not collection.images.is_dir():
        raise InfluenceError(f"image folder {collection.images} does not exist")
    rows, rejected, notes = read_metadata(collection)
    rejected = [*upstream, *rejected]
    root = collection.images
    resolved_root = root.resolve()

    no_file = rows["file"].isna()
    for r in rows[no_file].itertuples():
        rejected.append(_reject(r, "no file name", "the file cell is empty"))
    rows = rows[~no_file]
    paths = [(root / f).resolve() for f in rows["file"]]
    outside = np.array([not p.is_relative_to(resolved_root) for p in paths], dtype=bool)
    for r in rows[outside].itertuples():
        rejected.append(_reject(r, "path outside the collection", str(r.file)))
    rows = rows[~outside]
    paths = [p for p, o in zip(paths, outside, strict=True) if not o]

    checks = _checks(paths, run.root / ".cache" / "files.parquet", limits, progress)
    info = pd.DataFrame([c.__dict__ for c in checks], index=rows.index,
                        columns=list(FileCheck.__dataclass_fields__))
    bad = info["error"].notna()
    for r, err in zip(rows[bad].itertuples(), info.loc[bad, "error"], strict=True):
        reason = "missing file" if err == "file not found" else "unusable image"
        rejected.append(_reject(r, reason, err))
    rows = pd.concat([rows[~bad], info.loc[~bad].drop(columns="error")], axis=1)

    dup = rows.duplicated("image_id", keep="first")
    first = rows[~dup].set_index("image_id")
    for r in rows[dup].itertuples():
        kept = first.loc[r.image_id]
        conflicts = [f"{name}: {_show(getattr(r, name))} vs kept {_show(kept[name])}"
                     for name in (*TEXT_FIELDS, *YEAR_FIELDS)
                     if not _same(getattr(r, name), kept[name])]
        detail = f"same content as {kept['file']} (row {kept['row']})"
        if conflicts:
            detail += "; conflicting " + "; ".join(conflicts)
        rejected.append(_reject(r, "duplicate content", detail))
    rows = rows[~dup]

    listed = {str(p) for p in paths}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and str(p.resolve()) not in listed:
            rejected.append({"row": "", "file": str(p.relative_to(root)),
                             "reason": "not in metadata", "detail": "image file with no CSV row"})

    catalog = derive_era(rows).rename(columns={"nbytes": "bytes"})
    catalog = catalog[["image_id", "file", *TEXT_FIELDS, *YEAR_FIELDS, "era", "era_year",
                       "era_source", "width", "height", "mode", "bytes", "row"]]
    for name in TEXT_FIELDS:
        catalog[name] = catalog[name].astype("string")
    catalog = catalog.astype({"width": "int32", "height": "int32", "bytes": "int64",
                              "row": "int64", "mode": "string", "image_id": "string",
                              "file": "string"}).reset_index(drop=True)
    catalog = keep_row_order(catalog, run.catalog_path)
    rejected_df = pd.DataFrame.from_records(rejected, columns=REJECTED_COLUMNS)

    # Always made again (checking unchanged files is cached), but written and recorded only when
    # it differs from the run's intact copy: a second `extract` leaves the run as it was.
    step = Step("catalog", "catalog", collection.describe(), VERSION,
                {"metadata": file_fingerprint(collection.metadata),
                 **column_fingerprints(catalog, LABEL_FIELDS)},
                (run.catalog_path, run.rejected_path))
    table = io.BytesIO()
    catalog.to_parquet(table, index=False)
    listing = rejected_df.to_csv(index=False)
    with run.writing("extract"):
        if (run.is_done(step) and run.catalog_path.read_bytes() == table.getvalue()
                and run.rejected_path.read_text() == listing):
            return CatalogResult(catalog, rejected_df, notes)
        with atomic(run.catalog_path) as tmp:
            tmp.write_bytes(table.getvalue())
        with atomic(run.rejected_path) as tmp:
            tmp.write_text(listing)
        manifest = run.manifest()
        manifest["collection"] = collection.describe()
        write_json(run.manifest_path, manifest)
        run.record(step, images=len(catalog), rejected=len(rejected_df))
    return CatalogResult(catalog, rejected_df, notes)


def _same(a: object, b: object) -> bool:
    return (pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and a == b)


def _show(value: object) -> str:
    return "(empty)" if pd.isna(value) else f"'{value}'"


def _reject(row: object, reason: str, detail: str) -> dict[str, object]:
    rec = {"row": row.row, "file": row.file, "reason": reason, "detail": detail}
    rec.update({name: getattr(row, name) for name in TEXT_FIELDS})
    return rec
