"""The catalog: read a collection, validate every row and image, and keep one row per image.

A collection is a folder of images and a metadata CSV, or a folder of images in one folder per
label (`labels_from_folders`), or both. Every unique image gets a stable content-hash id; rows
that cannot be used go to `rejected.csv` with a reason, never silently. The known columns
(`DEFAULT_COLUMNS`) keep their meaning; every other column of the CSV is kept as text, so any
of them can be a head's target. An optional `split` column fixes a painting's part.
"""

from __future__ import annotations

import csv
import functools
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
    fingerprint,
    keep_row_order,
    write_json,
)

#: Catalog field -> CSV column name; override any of them with `--columns field=csv_name`.
DEFAULT_COLUMNS: dict[str, str] = {
    "file": "file", "title": "title", "artist": "artist", "nationality": "nationality",
    "birth_year": "birth_year", "death_year": "death_year", "year": "year",
    "style": "style", "genre": "genre", "split": "split",
}
#: Known fields a CSV may leave out without a note, and that the catalog then does not hold.
OPTIONAL_FIELDS = ("split",)
TEXT_FIELDS = ("title", "artist", "nationality", "style", "genre")
YEAR_FIELDS = ("year", "birth_year", "death_year")
LABEL_FIELDS = ("artist", "nationality", "era", "genre", "style")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".webp", ".gif"}
ERA_WIDTH = 50
#: Columns the catalog makes itself: a CSV column of one of these names is kept as `<name>_csv`.
MADE_COLUMNS = ("image_id", "era", "era_year", "era_source", "width", "height", "mode", "bytes",
                "row")
#: What a `split` cell may say (any case), and the part each means.
SPLIT_NAMES = {"train": "train", "training": "train", "validation": "validation",
               "valid": "validation", "val": "validation", "test": "test", "testing": "test"}
#: Version of the catalog's rules (validation, era): bump it when a change alters the catalog.
VERSION = "2"
REJECTED_COLUMNS = ["row", "file", "reason", "detail", *TEXT_FIELDS]


@functools.lru_cache(maxsize=1 << 16)
def artist_slug(name: str) -> str:
    """An artist's id in URLs and JSON: ASCII, lower case, words joined by '-' ("Claude Monet"
    -> "claude-monet"); stable, so a link to an artist survives a rebuilt run. Remembered per
    name: search ranks the same few hundred artists for every query."""
    ascii_name = unicodedata.normalize("NFKD", str(name)).encode("ascii", "ignore").decode()
    return re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-") or "unknown"


@dataclass(frozen=True)
class Collection:
    """Where a collection lives: the metadata CSV (None: the images' folders are the labels),
    the folder its `file` column is relative to, and how its columns are named.

    `labels_from_folders` names the column an image's folder fills (`images/DAIM/x.jpg` ->
    "DAIM", nested folders -> "a/b"; with `folders_multi_label` each folder is a label of its
    own, joined by `LABEL_SEPARATOR`); the CSV's value wins where both have one.
    """

    metadata: Path | None
    images: Path
    columns: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_COLUMNS))
    labels_from_folders: str | None = None
    folders_multi_label: bool = False

    def __post_init__(self) -> None:
        if self.metadata is None and not self.labels_from_folders:
            raise InfluenceError(f"{self.images}: no metadata CSV; give one, or read the labels "
                                 "from the folders with --labels-from-folders NAME")
        if self.labels_from_folders in MADE_COLUMNS or self.labels_from_folders == "file":
            raise InfluenceError(f"--labels-from-folders {self.labels_from_folders}: the catalog "
                                 "makes that column itself; name the label column otherwise")
        if self.folders_multi_label and not self.labels_from_folders:
            raise InfluenceError("several labels from folders need --labels-from-folders NAME")

    @classmethod
    def from_dir(cls, folder: Path, columns: dict[str, str] | None = None,
                 labels_from_folders: str | None = None,
                 folders_multi_label: bool = False) -> Collection:
        """The collection in `folder`: its paintings.csv (or single .csv), or none when the
        labels come from the folders."""
        folder = Path(folder)
        csvs = sorted(folder.glob("*.csv"))
        metadata: Path | None = folder / "paintings.csv"
        if not metadata.exists():
            if len(csvs) == 1:
                metadata = csvs[0]
            elif not csvs and labels_from_folders:
                metadata = None
            else:
                raise InfluenceError(f"{folder}: expected paintings.csv (or a single .csv) in the "
                                     "collection folder; give --metadata CSV --images DIR instead"
                                     " (or --labels-from-folders NAME for one folder per label)")
        return cls(metadata.resolve() if metadata else None, folder.resolve(),
                   {**DEFAULT_COLUMNS, **(columns or {})}, labels_from_folders,
                   folders_multi_label)

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {"metadata": str(self.metadata) if self.metadata else None,
                                  "images": str(self.images), "columns": self.columns}
        if self.labels_from_folders:
            out.update(labels_from_folders=self.labels_from_folders,
                       folders_multi_label=self.folders_multi_label)
        return out

    def label_root(self) -> Path:
        """The folder whose subfolders are labels: `images/` inside the collection if there is
        one, else the collection folder itself."""
        inner = self.images / "images"
        return inner if inner.is_dir() else self.images


#: How several labels of one painting are joined in one cell (folders, multi-label columns).
LABEL_SEPARATOR = ";"


def folder_label(collection: Collection, file: str) -> str | None:
    """The label an image's folder gives it ("a/b" for nested folders, "a;b" when each folder is
    a label of its own), None for an image directly in the label root or outside it."""
    path = (collection.images / file).resolve().parent
    root = collection.label_root().resolve()
    if path == root or not path.is_relative_to(root):
        return None
    parts = path.relative_to(root).parts
    return (LABEL_SEPARATOR if collection.folders_multi_label else "/").join(parts)


def image_files(folder: Path) -> list[str]:
    """Every image file under `folder` (hidden files and folders skipped), relative, sorted."""
    found = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.suffix.lower() in IMAGE_SUFFIXES and not any(s.startswith(".") for s in rel.parts):
            found.append(rel.as_posix())
    return found


def read_metadata(
    collection: Collection,
) -> tuple[pd.DataFrame, list[dict[str, object]], list[str]]:
    """Read the CSV into catalog field names; returns (rows, rejected lines, warnings).

    Undecodable bytes are read as cp1252 line by line, malformed lines are rejected, missing
    optional columns are left empty; only an unreadable file or a missing `file` column is fatal.
    """
    path = collection.metadata
    if path is None:
        return _folder_rows(collection), [], []
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
        if column not in df.columns and name not in OPTIONAL_FIELDS:
            notes.append(f"column '{column}' ({name}) is not in the CSV; it is left empty")
            df[column] = ""
    fields = {name: column for name, column in wanted.items() if column in df.columns}
    out = pd.DataFrame({name: df[column].str.strip() for name, column in fields.items()})
    # Every other column is kept as text under its own name (one the catalog makes: `_csv`).
    taken = {*fields, *MADE_COLUMNS}
    for column in df.columns:
        if column not in fields.values():
            name = f"{column}_csv" if column in taken else column
            if name != column:
                notes.append(f"column '{column}' is a name the catalog uses; kept as '{name}'")
            out[name] = df[column].str.strip()
            taken.add(name)
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
    if "split" in out:
        out["split"], bad = _parts(out["split"])
        for at, value in bad:
            rejected.append({"row": int(out.at[at, "row"]), "file": out.at[at, "file"],
                             "reason": "unknown split",
                             "detail": f"split '{value}' is none of train, validation, test; "
                                       "the painting is split with the unassigned ones"})
    return out, rejected, notes


def _parts(values: pd.Series) -> tuple[pd.Series, list[tuple[object, str]]]:
    """The `split` column as train / validation / test (NA where empty or unknown), and the
    (index, value) of each unknown value."""
    parts = values.str.lower().map(SPLIT_NAMES, na_action="ignore")
    bad = values.notna() & parts.isna()
    return parts.astype("string"), [(at, str(v)) for at, v in
                                    zip(values.index[bad], values[bad], strict=True)]


def _folder_rows(collection: Collection) -> pd.DataFrame:
    """The rows of a collection without a CSV: one per image file, every field empty (its
    folder label is added by `build_catalog`); `row` 0 says no CSV line made it."""
    files = image_files(collection.images)
    out = pd.DataFrame({name: pd.Series([pd.NA] * len(files), dtype=object)
                        for name, column in collection.columns.items()
                        if name not in OPTIONAL_FIELDS})
    out["file"] = files
    out.insert(0, "row", np.zeros(len(files), dtype=np.int64))
    for name in YEAR_FIELDS:
        out[name] = out[name].astype("Int64")
    return out


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
        fields = old[list(FileCheck.__dataclass_fields__)]
        values = fields.astype(object).where(fields.notna(), None)
        cache = {(path, int(size), int(mtime)): FileCheck(*checked) for path, size, mtime, checked
                 in zip(old["path"], old["size"], old["mtime_ns"],
                        values.itertuples(index=False, name=None), strict=True)}
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


class Resolver:
    """A collection's file names as real paths (`Path.resolve`), each folder resolved once.

    A collection's thousands of images sit in a few folders; resolving every whole path (a
    system call per part of it) took half of cataloguing the unchanged shared collection (4 of
    8 s on the loaded 2-core box). A file that is itself a link is still followed.
    """

    def __init__(self, root: Path) -> None:
        self.root = os.path.realpath(root)
        self._base = str(root)
        self._folders: dict[str, str] = {}

    def __call__(self, file: str) -> Path:
        path = os.path.join(self._base, file)
        folder, name = os.path.split(path)
        if name in ("", ".", "..") or os.path.islink(path):
            return Path(os.path.realpath(path))
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return Path(real, name)


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
    resolve = Resolver(root)
    inside = f"{resolve.root.rstrip(os.sep)}{os.sep}"

    no_file = rows["file"].isna()
    for r in _records(rows[no_file]):
        rejected.append(_reject(r, "no file name", "the file cell is empty"))
    rows = rows[~no_file]
    paths = [resolve(f) for f in rows["file"]]
    outside = np.array([not str(p).startswith(inside) for p in paths], dtype=bool)
    for r in _records(rows[outside]):
        rejected.append(_reject(r, "path outside the collection", str(r["file"])))
    rows = rows[~outside]
    paths = [p for p, out in zip(paths, outside, strict=True) if not out]
    if collection.labels_from_folders and collection.metadata is not None:
        # Images the CSV does not list join its rows.
        rows = _with_folder_labels(collection, rows, rejected)
        paths = [resolve(f) for f in rows["file"]]
    elif collection.labels_from_folders:
        rows = rows.assign(**{collection.labels_from_folders: [
            folder_label(collection, f) for f in rows["file"]]})

    checks = _checks(paths, run.root / ".cache" / "files.parquet", limits, progress)
    info = pd.DataFrame([c.__dict__ for c in checks], index=rows.index,
                        columns=list(FileCheck.__dataclass_fields__))
    bad = info["error"].notna()
    for r, err in zip(_records(rows[bad]), info.loc[bad, "error"], strict=True):
        reason = "missing file" if err == "file not found" else "unusable image"
        rejected.append(_reject(r, reason, err))
    rows = pd.concat([rows[~bad], info.loc[~bad].drop(columns="error")], axis=1)

    made = ("row", "file", *FileCheck.__dataclass_fields__)
    compared = [c for c in rows.columns if c not in made]
    dup = rows.duplicated("image_id", keep="first")
    first = rows[~dup].set_index("image_id")
    for r in _records(rows[dup]):
        kept = first.loc[r["image_id"]]
        conflicts = [f"{name}: {_show(r[name])} vs kept {_show(kept[name])}"
                     for name in compared if not _same(r[name], kept[name])]
        detail = f"same content as {kept['file']} (row {kept['row']})"
        if conflicts:
            detail += "; conflicting " + "; ".join(conflicts)
        rejected.append(_reject(r, "duplicate content", detail))
    rows = rows[~dup]

    listed = {str(p) for p in paths}
    unlisted = [p for p in root.rglob("*")
                if p.suffix.lower() in IMAGE_SUFFIXES and str(resolve(str(p))) not in listed]
    for p in sorted(unlisted):
        rejected.append({"row": "", "file": str(p.relative_to(root)),
                         "reason": "not in metadata", "detail": "image file with no CSV row"})

    catalog = derive_era(rows).rename(columns={"nbytes": "bytes"})
    base = ["image_id", "file", *TEXT_FIELDS, *YEAR_FIELDS, "era", "era_year", "era_source",
            "width", "height", "mode", "bytes", "row"]
    extra = [c for c in catalog.columns if c not in base]
    catalog = catalog[base + extra]
    for name in (*TEXT_FIELDS, *extra):
        catalog[name] = catalog[name].astype("string")
    catalog = catalog.astype({"width": "int32", "height": "int32", "bytes": "int64",
                              "row": "int64", "mode": "string", "image_id": "string",
                              "file": "string"}).reset_index(drop=True)
    catalog = keep_row_order(catalog, run.catalog_path)
    rejected_df = pd.DataFrame.from_records(rejected, columns=REJECTED_COLUMNS)

    # Always made again (checking unchanged files is cached), but written and recorded only when
    # it differs from the run's intact copy: a second `extract` leaves the run as it was.
    step = Step("catalog", "catalog", collection.describe(), VERSION,
                {"metadata": (file_fingerprint(collection.metadata) if collection.metadata
                              else fingerprint(catalog["file"])),
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


def _with_folder_labels(collection: Collection, rows: pd.DataFrame,
                        rejected: list[dict[str, object]]) -> pd.DataFrame:
    """The CSV's rows with their folders' labels where the CSV has none, and a row for each image
    the CSV does not list; each disagreement is kept as the CSV says and listed in `rejected`."""
    name = collection.labels_from_folders
    listed = {(collection.images / f).resolve() for f in rows["file"]}
    unlisted = [f for f in image_files(collection.images)
                if (collection.images / f).resolve() not in listed]
    extra = pd.DataFrame({"row": np.zeros(len(unlisted), dtype=np.int64), "file": unlisted})
    rows = pd.concat([rows, extra], ignore_index=True)
    for column in YEAR_FIELDS:
        rows[column] = rows[column].astype("Int64")
    from_folder = pd.Series([folder_label(collection, f) for f in rows["file"]],
                            index=rows.index, dtype="string")
    recorded = (rows[name].astype("string") if name in rows
                else pd.Series(pd.NA, index=rows.index, dtype="string"))
    conflict = (recorded.notna() & from_folder.notna() & (recorded != from_folder)).fillna(False)
    for r, folder in zip(_records(rows[conflict]), from_folder[conflict], strict=True):
        rejected.append(_reject(r, "label conflict",
                                f"{name}: the folder says '{folder}', the CSV says "
                                f"'{r[name]}'; kept the CSV's"))
    return rows.assign(**{name: recorded.fillna(from_folder)})


def _records(rows: pd.DataFrame) -> list[dict[str, object]]:
    return rows.to_dict("records")


def _same(a: object, b: object) -> bool:
    return (pd.isna(a) and pd.isna(b)) or (not pd.isna(a) and not pd.isna(b) and a == b)


def _show(value: object) -> str:
    return "(empty)" if pd.isna(value) else f"'{value}'"


def _reject(row: dict[str, object], reason: str, detail: str) -> dict[str, object]:
    rec = {"row": row["row"] or "", "file": row["file"], "reason": reason, "detail": detail}
    rec.update({name: row.get(name) for name in TEXT_FIELDS})
    return rec
