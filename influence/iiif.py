"""IIIF input: Presentation manifests and collections (versions 2 and 3) as a collection.

A manifest's canvases become rows: each canvas's image (through its Image API service at a
bounded size, else the image resource itself), its label, and its metadata pairs mapped to the
catalog's fields where their labels match (artist, date, title, genre, style, ...), every other
pair kept as a column. The images are fetched into the run (`influence.fetch`) and the rows
written as a table that the catalog reads like any collection; canvases that could not be
fetched are handed to the catalog's `rejected.csv` with the HTTP status or the reason.
"""

from __future__ import annotations

import csv
import html
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from influence.catalog import DEFAULT_COLUMNS, Collection
from influence.fetch import (
    Client,
    FetchSettings,
    Job,
    Prepared,
    fetch_images,
    fetch_json,
    parallel,
)
from influence.presets import FIELD_NAMES, spelled
from influence.runs import InfluenceError, Run, Step, atomic, file_fingerprint

#: Version of the manifest reading rules: bump it when a change alters the table written.
VERSION = "1"
#: Longest side asked of an Image API service (`full/!1024,1024/0/default.jpg`).
BOUND = 1024
#: Collections nested deeper than this are not followed.
MAX_DEPTH = 8
#: Metadata labels read as a catalog field: the names influence.presets.FIELD_NAMES lists,
#: matched whole ("Artist", "Date created", "Artist/Maker:"), never a file or an image URL.
_LABEL_FIELD = {name: f for f, names in reversed(FIELD_NAMES.items()) for name in names
                if f not in ("file", "image_url")}
#: Columns the table holds besides the catalog's fields, for a person to trace a row back.
SOURCE_COLUMNS = ("canvas", "canvas_label", "manifest", "manifest_label", "image_url")


@dataclass
class Canvas:
    """One canvas: where it comes from, the image URLs to try and its fields."""

    manifest: str
    manifest_label: str
    canvas: str
    label: str
    urls: tuple[str, ...]
    fields: dict[str, str] = field(default_factory=dict)
    extra: dict[str, str] = field(default_factory=dict)


def text(value: Any) -> str:
    """Plain text of a IIIF label or value: a v3 language map (English, else 'none', else the
    first language), a v2 string, {'@value'} object or list of them; HTML tags removed."""
    if value is None:
        return ""
    if isinstance(value, dict):
        if "@value" in value:
            return text(value["@value"])
        for lang in ("en", "none", *value):
            if lang in value:
                return text(value[lang])
        return ""
    if isinstance(value, list):
        english = [v for v in value if isinstance(v, dict) and
                   str(v.get("@language", "")).startswith("en")]
        parts = [text(v) for v in (english or value)]
        return "; ".join(p for p in parts if p)
    plain = re.sub(r"<[^>]+>", " ", str(value))
    return re.sub(r"\s+", " ", html.unescape(plain)).strip()


def _ident(obj: Any) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        return str(obj.get("id") or obj.get("@id") or "")
    return ""


def _kind(obj: dict[str, Any]) -> str:
    """'manifest', 'collection' or '' from a v2 '@type' or a v3 'type'."""
    kind = str(obj.get("type") or obj.get("@type") or "").lower()
    return next((k for k in ("manifest", "collection") if k in kind), "")


def _version(doc: dict[str, Any]) -> int:
    context = doc.get("@context", "")
    context = " ".join(context) if isinstance(context, list) else str(context)
    if "presentation/3" in context:
        return 3
    if "presentation/2" in context or "sequences" in doc or "@type" in doc:
        return 2
    return 3


def metadata_pairs(obj: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) of an object's `metadata`, as plain text."""
    pairs = []
    for pair in obj.get("metadata") or []:
        if isinstance(pair, dict):
            label, value = text(pair.get("label")), text(pair.get("value"))
            if label and value:
                pairs.append((label, value))
    return pairs


def map_fields(pairs: list[tuple[str, str]]) -> tuple[dict[str, str], dict[str, str]]:
    """Split metadata pairs into catalog fields (the first pair per field) and other columns."""
    fields: dict[str, str] = {}
    extra: dict[str, str] = {}
    for label, value in pairs:
        name = _LABEL_FIELD.get(spelled(label))
        if name and name not in fields:
            fields[name] = value
        else:
            extra[label] = value
    return fields, extra


def _service_version(service: dict[str, Any], default: int) -> int:
    kind = str(service.get("type") or service.get("@type") or "")
    if kind.startswith("ImageService"):
        return int(kind[-1]) if kind[-1].isdigit() else default
    marks = " ".join(str(service.get(k, "")) for k in ("@context", "profile"))
    if "image/2" in marks:
        return 2
    if "image/3" in marks:
        return 3
    return default


def image_url(service: dict[str, Any], width: Any, height: Any, default: int) -> str | None:
    """The Image API URL of a service's whole image at most BOUND on its longer side.

    Version 2 asks `full/!1024,1024/0/default.jpg`; version 3 the same size, which must not
    exceed the image (3.0 refuses upscaling without '^'), so an image known to fit is asked at
    `max` (`full` in version 2) instead.
    """
    base = _ident(service).rstrip("/")
    if not base:
        return None
    version = _service_version(service, default)
    try:
        fits = max(int(width), int(height)) <= BOUND
    except (TypeError, ValueError):
        fits = False
    size = ("max" if version >= 3 else "full") if fits else f"!{BOUND},{BOUND}"
    return f"{base}/full/{size}/0/default.jpg"


def _first_image(resource: Any) -> dict[str, Any] | None:
    """The image of a v2 resource or v3 body: a choice's default (v2) or first item (v3)."""
    if isinstance(resource, list):
        return next((r for r in map(_first_image, resource) if r), None)
    if not isinstance(resource, dict):
        return None
    if "default" in resource:
        return _first_image(resource["default"])
    kind = str(resource.get("type") or resource.get("@type") or "")
    if kind in ("Choice", "oa:Choice"):
        return _first_image(resource.get("items") or resource.get("item"))
    return resource


def _urls(image: dict[str, Any] | None, canvas: dict[str, Any], version: int) -> tuple[str, ...]:
    """The URLs to try for a canvas's image: its bounded service URL, then the resource."""
    if image is None:
        return ()
    width = image.get("width") or canvas.get("width")
    height = image.get("height") or canvas.get("height")
    services = image.get("service") or []
    urls = []
    for service in services if isinstance(services, list) else [services]:
        if isinstance(service, dict) and (url := image_url(service, width, height, version)):
            urls.append(url)
            break
    if (resource := _ident(image)) and resource not in urls:
        urls.append(resource)
    return tuple(urls)


def _canvas_items(manifest: dict[str, Any], version: int) -> Iterator[tuple[dict, dict | None]]:
    """(canvas, its image resource or body) of a v2 or v3 manifest, in order."""
    if version == 2:
        for sequence in manifest.get("sequences") or []:
            for canvas in sequence.get("canvases") or []:
                images = [a.get("resource") for a in canvas.get("images") or []
                          if isinstance(a, dict)]
                yield canvas, _first_image(images)
        return
    for canvas in manifest.get("items") or []:
        if not isinstance(canvas, dict) or "canvas" not in str(canvas.get("type", "")).lower():
            continue
        bodies = [a.get("body") for page in canvas.get("items") or []
                  for a in page.get("items") or []
                  if isinstance(a, dict) and a.get("motivation", "painting") in (
                      "painting", ["painting"])]
        yield canvas, _first_image(bodies)


def manifest_canvases(manifest: dict[str, Any], source: str) -> tuple[list[Canvas],
                                                                        list[dict[str, object]]]:
    """A manifest's canvases, and a rejected row for each canvas without an image."""
    version = _version(manifest)
    ident = _ident(manifest) or source
    label = text(manifest.get("label"))
    outer_fields, outer_extra = map_fields(metadata_pairs(manifest))
    items = list(_canvas_items(manifest, version))
    canvases, rejected = [], []
    for n, (canvas, image) in enumerate(items, 1):
        canvas_id = _ident(canvas) or f"{ident}#canvas-{n}"
        canvas_label = text(canvas.get("label"))
        inner_fields, inner_extra = map_fields(metadata_pairs(canvas))
        fields = {**outer_fields, **inner_fields}
        fields.setdefault("title", label if len(items) == 1 and label else canvas_label)
        urls = _urls(image, canvas, version)
        if not urls:
            rejected.append({"row": "", "file": canvas_id, "reason": "no image",
                             "detail": f"canvas {n} of {ident} has no painting image", **fields})
            continue
        canvases.append(Canvas(ident, label, canvas_id, canvas_label, urls, fields,
                               {**outer_extra, **inner_extra}))
    return canvases, rejected


def read_iiif(source: str, client: Client, progress: bool = True) -> tuple[
        list[Canvas], list[dict[str, object]]]:
    """Every canvas of a manifest or of the manifests a collection reaches (nested collections
    followed to MAX_DEPTH, each document read once); rejected rows for what could not be read."""
    top = fetch_json(client, source)
    if not isinstance(top, dict) or _kind(top) not in ("manifest", "collection"):
        raise InfluenceError(f"{source} is not a IIIF manifest or collection (no Manifest or "
                             "Collection type)")
    base = source if source.startswith(("http://", "https://")) else None
    canvases: list[Canvas] = []
    rejected: list[dict[str, object]] = []
    seen: set[str] = {source}
    level: list[tuple[dict[str, Any], str]] = [(top, source)]
    for depth in range(MAX_DEPTH + 1):
        refs: list[str] = []
        for doc, where in level:
            if _kind(doc) == "manifest":
                found, bad = manifest_canvases(doc, where)
                canvases += found
                rejected += bad
                continue
            for ref in _members(doc):
                ident = _ident(ref)
                if isinstance(ref, dict) and ("sequences" in ref or "items" in ref) and \
                        _kind(ref) == "manifest":
                    found, bad = manifest_canvases(ref, ident or where)
                    canvases += found
                    rejected += bad
                elif ident and ident not in seen:
                    seen.add(ident)
                    refs.append(ident if base or ident.startswith(("http://", "https://"))
                                else str(Path(where).parent / ident))
        if not refs:
            break
        if depth == MAX_DEPTH:
            rejected += [{"row": "", "file": r, "reason": "manifest unreadable",
                          "detail": f"nested deeper than {MAX_DEPTH} collections"} for r in refs]
            break
        level = []
        for ref, got in zip(refs, parallel(refs, lambda r: _try_json(client, r),
                                           client.settings, "reading manifests", progress),
                            strict=True):
            if isinstance(got, dict) and _kind(got):
                level.append((got, ref))
            else:
                detail = got if isinstance(got, str) else "not a IIIF manifest or collection"
                rejected.append({"row": "", "file": ref, "reason": "manifest unreadable",
                                 "detail": detail})
    return canvases, rejected


def _members(collection: dict[str, Any]) -> list[Any]:
    """The manifests and collections a v2 or v3 collection lists."""
    out: list[Any] = []
    for key in ("collections", "manifests", "members", "items"):
        out += [m for m in collection.get(key) or [] if isinstance(m, dict | str)]
    return out


def _try_json(client: Client, ref: str) -> Any:
    try:
        return fetch_json(client, ref)
    except InfluenceError as e:
        return str(e)


def iiif_collection(source: str, run: Run, settings: FetchSettings,
                    progress: bool = True) -> Prepared:
    """Read a IIIF manifest or collection, fetch its images into the run and write the table
    the catalog reads (`RUN/fetched/paintings.csv`); canvases not fetched come back as rejected
    rows with the HTTP status or the reason."""
    cache = run.fetched_dir
    client = Client(settings)
    try:
        with run.writing("extract"):
            canvases, rejected = read_iiif(source, client, progress)
            if not canvases and not rejected:
                raise InfluenceError(f"{source} has no canvases")
            outcomes = fetch_images([Job(c.urls) for c in canvases], cache / "images",
                                    cache / "fetched.csv", settings, progress, client)
            rows = []
            for c in canvases:
                got = outcomes[c.urls[0]]
                if not got.ok:
                    rejected.append({"row": "", "file": c.canvas, "reason": got.reason,
                                     "detail": got.detail, **c.fields})
                    continue
                rows.append({"file": f"images/{got.file}", **c.fields, "canvas": c.canvas,
                             "canvas_label": c.label, "manifest": c.manifest,
                             "manifest_label": c.manifest_label, "image_url": got.fetched_from,
                             **{_column(k): v for k, v in c.extra.items()}})
            table = cache / "paintings.csv"
            write_table(table, rows)
            blank = sum(r["reason"] == "no image" for r in rejected)
            report = {"canvases": len(canvases) + blank, "fetched": sum(
                o.ok and not o.reused for o in outcomes.values()),
                "kept": sum(o.reused for o in outcomes.values()), "rejected": len(rejected)}
            inputs = {} if source.startswith(("http://", "https://")) else {
                "manifest": file_fingerprint(Path(source))}
            run.record(Step("fetch", "iiif", {"source": source, "bound": BOUND}, VERSION, inputs,
                            (table, cache / "fetched.csv")), **report)
    finally:
        client.close()
    return Prepared(Collection(table, cache, dict(DEFAULT_COLUMNS)), rejected, report)


def _column(label: str) -> str:
    """A metadata label as a column name, never one of the catalog's or the source columns."""
    return f"{label} (metadata)" if label in DEFAULT_COLUMNS or label in SOURCE_COLUMNS else label


def write_table(path: Path, rows: list[dict[str, str]]) -> None:
    """The rows as the CSV the catalog reads: the catalog's fields first, then the rest."""
    columns = list(DEFAULT_COLUMNS.values())
    for row in rows:
        columns += [k for k in row if k not in columns]
    with atomic(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, columns, restval="")
        writer.writeheader()
        writer.writerows(rows)
