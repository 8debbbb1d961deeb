"""Open-access tables: a museum's export, its column names mapped to ours, its image URLs fetched.

A table is a CSV or a JSON export (a list of records, an object holding one, or SPARQL JSON
results), flattened so nested keys read as `webImage.url`. A *preset* (a small TOML file in
`influence/presets/`) lists, per catalog field, the column names an institution's export uses;
`guess_columns` proposes a mapping from any table's header and values, printed as TOML for a
person to confirm. Rows whose `image_url` column holds a URL are fetched like IIIF images
(`influence.fetch`) into the run, and the table is written again with a `file` column for the
catalog; rows without a usable image are handed to `rejected.csv` with the reason.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pandas as pd

from influence.catalog import (
    DEFAULT_COLUMNS,
    IMAGE_SUFFIXES,
    TEXT_FIELDS,
    YEAR_FIELDS,
    Collection,
    _decode,
    read_records,
)
from influence.fetch import FetchSettings, Job, Prepared, fetch_images
from influence.presets import FIELD_NAMES, FIELDS, load_preset, preset_columns, spelled
from influence.runs import InfluenceError, Run, Step, atomic, file_fingerprint

#: Version of the table rules (flattening, the written table): bump it when a change alters them.
VERSION = "1"
#: Values looked at per column when guessing.
GUESS_SAMPLE = 500
#: Share of a column's values that must look like what a field holds.
GUESS_SHARE = 0.6
_YEAR = re.compile(r"(?<!\d)(\d{3,4})(?!\d)")


@dataclass
class Table:
    """A table as read: its header, each record's cells and line (or record number), and the
    records the parser could not read (rows for rejected.csv)."""

    path: Path
    header: list[str]
    lines: list[int]
    records: list[list[str]]
    rejected: list[dict[str, object]]
    kind: str

    def column(self, name: str) -> list[str]:
        i = self.header.index(name)
        return [r[i] for r in self.records]


def read_table(path: Path) -> Table:
    """Read a CSV or a JSON export (.json); InfluenceError if it cannot be read as either."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InfluenceError(f"cannot read table {path}: {e.strerror or e}") from None
    if path.suffix.lower() == ".json":
        return _json_table(path, raw)
    text, _ = _decode(raw)
    header, lines, records, rejected = read_records(text)
    if header is None:
        raise InfluenceError(f"cannot read table {path}: no header line")
    return Table(path, [c.strip() for c in header], lines, records, rejected, "csv")


def _json_table(path: Path, raw: bytes) -> Table:
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise InfluenceError(f"table {path} is not JSON: {e}") from None
    records = _json_records(data)
    if records is None:
        raise InfluenceError(f"table {path}: no list of records found (expected a list of "
                             "objects, an object holding one, or SPARQL JSON results)")
    frame = pd.json_normalize(records, sep=".")
    header = [str(c) for c in frame.columns]
    cells = [[_cell(v) for v in row] for row in frame.itertuples(index=False)]
    return Table(path, header, list(range(1, len(cells) + 1)), cells, [], "json")


def _json_records(data: Any) -> list[dict[str, Any]] | None:
    """The records of a JSON export: a list, the one list of objects in an object (the
    Rijksmuseum API's `artObjects`), or SPARQL results (Wikidata's query service)."""
    if isinstance(data, dict) and isinstance(data.get("results"), dict):
        return [{k: v.get("value") for k, v in b.items() if isinstance(v, dict)}
                for b in data["results"].get("bindings", []) if isinstance(b, dict)]
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list) and v
                 and all(isinstance(x, dict) for x in v)]
        data = lists[0] if len(lists) == 1 else None
    if isinstance(data, list) and all(isinstance(x, dict) for x in data):
        return data
    return None


def _cell(value: Any) -> str:
    if isinstance(value, list):
        return "; ".join(_cell(v) for v in value if _cell(v))
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ------------------------------------------------------------------------------------------- guess
@dataclass(frozen=True)
class Guess:
    field: str
    column: str
    score: float
    why: str


def _header_score(field_name: str, header: str) -> float:
    words = spelled(header)
    best = 0.0
    for rank, hint in enumerate(FIELD_NAMES[field_name]):
        if words == hint:
            best = max(best, 3.0 - rank * 0.01)
        elif set(hint.split()) <= set(words.split()):
            best = max(best, 2.0 - rank * 0.01 - 0.05 * (len(words.split())
                                                          - len(hint.split())))
    return best


def _shares(values: list[str]) -> dict[str, float]:
    """What a column's values look like: shares of years, URLs, image URLs, file names, text."""
    n = len(values) or 1

    def share(test: Any) -> float:
        return sum(1 for v in values if test(v)) / n

    def is_year(v: str) -> bool:
        m = _YEAR.search(v)
        return bool(m) and 500 <= int(m.group(1)) <= 2100 and len(v) <= 40

    def is_url(v: str) -> bool:
        return v.startswith(("http://", "https://"))

    def is_image_url(v: str) -> bool:
        path = urlsplit(v).path.lower() if is_url(v) else ""
        return bool(path) and (Path(path).suffix in IMAGE_SUFFIXES or "/iiif/" in path
                               or "filepath" in path or "/images/" in path)

    def is_text(v: str) -> bool:
        return not is_url(v) and sum(c.isalpha() for c in v) >= max(2, len(v) // 2)

    return {"year": share(is_year), "url": share(is_url), "image_url": share(is_image_url),
            "file": share(lambda v: not is_url(v) and Path(v).suffix.lower() in IMAGE_SUFFIXES),
            "text": share(is_text)}


def _evidence(field_name: str, named: bool, shares: dict[str, float]) -> tuple[str, str]:
    """Which share of values speaks for a field, and its words: an image_url column named
    so may hold any URLs (a CDN's without a suffix); unnamed, they must look like images."""
    if field_name in YEAR_FIELDS:
        return "year", "years"
    if field_name == "image_url":
        return ("url", "URLs") if named else ("image_url", "image URLs")
    if field_name == "file":
        return "file", "image file names"
    return "text", "text"


def guess_columns(table: Table) -> list[Guess]:
    """A proposed mapping: each field's best column by its header and its values (years for
    dates, URLs of images for image_url, image file names for file, words for text fields)."""
    candidates: list[Guess] = []
    for i, name in enumerate(table.header):
        values = [r[i].strip() for r in table.records[:GUESS_SAMPLE * 4] if r[i].strip()]
        values = values[:GUESS_SAMPLE]
        if not values:
            continue
        shares = _shares(values)
        for field_name in FIELDS:
            header = _header_score(field_name, name)
            kind, what = _evidence(field_name, header > 0, shares)
            share = shares[kind]
            # A header that suggests the field, or values that show it alone (years for the
            # work's year, image URLs, image file names); never values alone for names.
            alone = kind in ("year", "image_url", "file") and field_name not in (
                "birth_year", "death_year")
            if share < GUESS_SHARE or not (header or alone):
                continue
            why = f"{'header; ' if header else ''}{share:.0%} of {len(values)} values are {what}"
            candidates.append(Guess(field_name, name, header + share, why))
    chosen: dict[str, Guess] = {}
    used: set[str] = set()
    for g in sorted(candidates, key=lambda g: -g.score):
        if g.field not in chosen and g.column not in used:
            chosen[g.field] = g
            used.add(g.column)
    return [chosen[f] for f in FIELDS if f in chosen]


def mapping_toml(mapping: dict[str, str], why: dict[str, str], title: str) -> str:
    """A mapping as TOML a person can check and paste into a config's [extract] section."""
    lines = [f"# {title}",
             "# Check each line, then paste this into a pipeline config, or pass the pairs as",
             "# --columns FIELD=COLUMN (image_url: the column of image URLs to fetch).",
             "[extract.columns]"]
    width = max((len(f"{k} = {json.dumps(v, ensure_ascii=False)}") for k, v in mapping.items()),
                default=0)
    for field_name in FIELDS:
        if field_name in mapping:
            line = f"{field_name} = {json.dumps(mapping[field_name], ensure_ascii=False)}"
            lines.append(f"{line.ljust(width)}  # {why[field_name]}" if why.get(field_name)
                         else line)
    missing = [f for f in FIELDS if f not in mapping]
    if missing:
        lines.append(f"# no column found for: {', '.join(missing)}")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------ table collection
def table_collection(path: Path, run: Run, columns: dict[str, str] | None, images: Path | None,
                     settings: FetchSettings, progress: bool = True,
                     preset: str | None = None) -> Prepared:
    """A table as a collection, its columns named by `preset` (if any) and then `columns`:
    with `images`, its `file` column names local files; otherwise its `image_url` column's
    images are fetched into the run and the table written again (`RUN/fetched/table.csv`)
    with a `file` column and each row's `source_row`."""
    table = read_table(path)
    notes: list[str] = []
    url_query = None
    if preset:
        found, missing = preset_columns(preset, table.header)
        columns = {**found, **(columns or {})}
        url_query = load_preset(preset).get("url_query")
        if missing:
            notes.append(f"preset {preset}: no column for {', '.join(missing)} in {path.name}")
    columns = columns or {}
    table = read_table(path)
    wanted = {k: v for k, v in columns.items() if k != "image_url"}
    if images is not None:
        if table.kind == "csv":
            return Prepared(Collection(Path(path).resolve(), Path(images).resolve(),
                                       {**DEFAULT_COLUMNS, **wanted}), table.rejected, {}, notes)
        out = run.fetched_dir / "table.csv"
        _write(out, table.header, [(line, r) for line, r in zip(table.lines, table.records,
                                                                strict=True)], None)
        return Prepared(Collection(out, Path(images).resolve(), {**DEFAULT_COLUMNS, **wanted}),
                        table.rejected, {}, notes)
    url_column = columns.get("image_url")
    if not url_column or url_column not in table.header:
        named = f" ('{url_column}' is not one of its columns)" if url_column else ""
        raise InfluenceError(
            f"table {path} has no image URL column{named}: name it with --columns "
            "image_url=COLUMN (`columns TABLE` proposes one), or give --images DIR for a table "
            "whose file column names local images")
    urls = table.column(url_column)
    texts = {name: wanted.get(name, name) for name in TEXT_FIELDS}

    def about(record: list[str]) -> dict[str, str]:
        return {name: record[table.header.index(col)] for name, col in texts.items()
                if col in table.header}

    rejected = list(table.rejected)
    jobs: list[tuple[int, list[str], Job]] = []
    for line, record, url in zip(table.lines, table.records, urls, strict=True):
        url = url.strip()
        if not url:
            rejected.append({"row": line, "file": "", "reason": "no image URL",
                             "detail": f"the '{url_column}' cell is empty", **about(record)})
        elif not url.startswith(("http://", "https://")):
            rejected.append({"row": line, "file": url[:300], "reason": "bad URL",
                             "detail": "not an http(s) URL", **about(record)})
        else:
            jobs.append((line, record, Job((_with_query(url, url_query),))))
    cache = run.fetched_dir
    with run.writing("extract"):
        outcomes = fetch_images([j for _, _, j in jobs], cache / "images",
                                cache / "fetched.csv", settings, progress)
        rows: list[tuple[int, list[str]]] = []
        files: list[str] = []
        for line, record, job in jobs:
            got = outcomes[job.urls[0]]
            if got.ok:
                rows.append((line, record))
                files.append(f"images/{got.file}")
            else:
                rejected.append({"row": line, "file": job.urls[0], "reason": got.reason,
                                 "detail": got.detail, **about(record)})
        out = cache / "table.csv"
        new_file = "file" if "file" not in table.header else "fetched file"
        _write(out, table.header, rows, (new_file, files))
        report = {"rows": len(table.records), "fetched": sum(
            o.ok and not o.reused for o in outcomes.values()),
            "kept": sum(o.reused for o in outcomes.values()), "rejected": len(rejected)}
        run.record(Step("fetch", "table", {"table": str(Path(path).resolve()),
                                           "image_url": url_column, "url_query": url_query},
                        VERSION, {"table": file_fingerprint(path)}, (out, cache / "fetched.csv")),
                   **report)
    return Prepared(Collection(out, cache.resolve(), {**DEFAULT_COLUMNS, **wanted,
                                                      "file": new_file}), rejected, report,
                    notes)


def _with_query(url: str, query: str | None) -> str:
    if not query:
        return url
    return f"{url}{'&' if urlsplit(url).query else '?'}{query}"


def _write(path: Path, header: list[str], rows: list[tuple[int, list[str]]],
           files: tuple[str, list[str]] | None) -> None:
    """The table again for the catalog: its cells, each row's `source_row` (its line in the
    table, or its record number in a JSON export) and the fetched files."""
    extra = ["source_row", *([files[0]] if files else [])]
    with atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow([*header, *extra])
        for n, (line, record) in enumerate(rows):
            writer.writerow([*record, line, *([files[1][n]] if files else [])])
