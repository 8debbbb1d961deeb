"""IIIF manifests and open-access tables, served by a local HTTP server made here (never the
internet): real paintings from the shared collection behind a small Image API, and canvases
broken each in its own way (404, a timeout, not an image, oversized, no image at all)."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pytest

from influence.catalog import build_catalog
from influence.commands import cmd_columns
from influence.fetch import FetchSettings, Job, fetch_images
from influence.iiif import iiif_collection
from influence.pipeline import main
from influence.runs import Run
from influence.tables import guess_columns, read_table, table_collection

from .conftest import COLLECTION

#: Patient enough for the local server, short enough that the slow canvas costs about a second.
SETTINGS = FetchSettings(workers=4, timeout=0.5, retries=1, backoff=0.05, max_bytes=1_000_000)
SLOW_S = 1.5
V2_IMAGE = "http://iiif.io/api/image/2/context.json"
V2_PRESENTATION = "http://iiif.io/api/presentation/2/context.json"
V3_PRESENTATION = "http://iiif.io/api/presentation/3/context.json"
#: The Met's MetObjects.csv header (github.com/metmuseum/openaccess), with the API's image field.
MET_HEADER = [
    "Object Number", "Is Highlight", "Is Timeline Work", "Is Public Domain", "Object ID",
    "Gallery Number", "Department", "AccessionYear", "Object Name", "Title", "Culture", "Period",
    "Dynasty", "Reign", "Portfolio", "Constituent ID", "Artist Role", "Artist Prefix",
    "Artist Display Name", "Artist Display Bio", "Artist Suffix", "Artist Alpha Sort",
    "Artist Nationality", "Artist Begin Date", "Artist End Date", "Artist Gender",
    "Artist ULAN URL", "Artist Wikidata URL", "Object Date", "Object Begin Date",
    "Object End Date", "Medium", "Dimensions", "Credit Line", "Geography Type", "City", "State",
    "County", "Country", "Region", "Subregion", "Locale", "Locus", "Excavation", "River",
    "Classification", "Rights and Reproduction", "Link Resource", "Object Wikidata URL",
    "Metadata Date", "Repository", "Tags", "Tags AAT URL", "Tags Wikidata URL", "Primary Image",
]


class Server:
    """A local Image API and document server: /iiif/NAME/full/SIZE/0/default.jpg and
    /img/NAME.jpg serve a painting, /doc/NAME a JSON document; /missing/ answers 404, /slow/
    waits SLOW_S seconds, /notimage/ answers HTML, /big/ two megabytes, /flaky/NAME 503 (with
    Retry-After) the first time and the painting after. Every path is logged."""

    def __init__(self, paintings: dict[str, bytes]) -> None:
        self.paintings = paintings
        self.docs: dict[str, object] = {}
        self.log: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.log.append(self.path)
                kind, _, rest = self.path.lstrip("/").partition("/")
                name = rest.split("/")[0].split("?")[0].removesuffix(".jpg")
                body, ctype = None, "image/jpeg"
                if kind in ("iiif", "img"):
                    body = server.paintings.get(name)
                elif kind == "doc" and name in server.docs:
                    body, ctype = json.dumps(server.docs[name]).encode(), "application/json"
                elif kind == "slow":
                    time.sleep(SLOW_S)
                    body = next(iter(server.paintings.values()))
                elif kind == "notimage":
                    body, ctype = b"<html><body>Sign in first</body></html>", "text/html"
                elif kind == "big":
                    body = b"\xff\xd8" + b"\0" * 2_000_000
                elif kind == "flaky" and server.log.count(self.path) == 1:
                    self.send_response(503)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                elif kind == "flaky":
                    body = server.paintings.get(name)
                try:
                    if body is None:
                        self.send_error(404)
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", ctype)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client stopped reading (an oversized body, a timeout)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.base = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def images_asked(self) -> list[str]:
        return [p for p in self.log if not p.startswith("/doc/")]


@pytest.fixture(scope="module")
def paintings() -> pd.DataFrame:
    """Ten dated shared paintings of ten artists with all their fields, named by their file's
    stem."""
    rows = pd.read_csv(COLLECTION / "paintings.csv", dtype=str, keep_default_na=False)
    rows = rows[(rows[["year", "style", "genre", "birth_year", "death_year"]] != "").all(axis=1)]
    rows = rows.groupby("artist", sort=False).head(1).head(10).reset_index(drop=True)
    return rows.assign(name=[Path(f).stem for f in rows["file"]])


@pytest.fixture(scope="module")
def server(paintings: pd.DataFrame) -> Server:
    served = Server({r.name: (COLLECTION / r.file).read_bytes() for r in paintings.itertuples()})
    yield served
    served.httpd.shutdown()
    served.httpd.server_close()


def content_id(painting: pd.Series) -> str:
    return hashlib.sha256((COLLECTION / painting["file"]).read_bytes()).hexdigest()[:16]


def v2_canvas(base: str, n: int, p: pd.Series | None, service: str | None = "iiif",
              width: int = 224, resource: str | None = None) -> dict:
    canvas = {"@id": f"{base}/canvas/v2/{n}", "@type": "sc:Canvas", "width": width,
              "height": width, "label": p["title"] if p is not None else "blank", "images": []}
    if p is not None:
        canvas["metadata"] = [{"label": "Artist", "value": p["artist"]},
                              {"label": "Date", "value": p["year"]},
                              {"label": "Genre", "value": p["genre"]},
                              {"label": "Style", "value": [{"@value": p["style"],
                                                            "@language": "en"}]}]
        image = {"@id": resource or f"{base}/{service}/{p['name']}.jpg", "@type": "dctypes:Image",
                 "width": width, "height": width}
        if service:
            image["service"] = {"@context": V2_IMAGE, "@id": f"{base}/{service}/{p['name']}",
                                "profile": "http://iiif.io/api/image/2/level2.json"}
        canvas["images"] = [{"@type": "oa:Annotation", "motivation": "sc:painting",
                             "resource": image, "on": canvas["@id"]}]
    return canvas


def v3_canvas(base: str, n: int, p: pd.Series, service: str = "iiif", width: int = 224,
              kind: str = "ImageService3", choice: bool = False) -> dict:
    ident = f"{base}/canvas/v3/{n}"
    body = {"id": f"{base}/{service}/{p['name']}/full/max/0/default.jpg", "type": "Image",
            "format": "image/jpeg", "width": width, "height": width,
            "service": [{"id": f"{base}/{service}/{p['name']}", "type": kind,
                         "profile": "level1"}]}
    if choice:
        body = {"type": "Choice", "items": [body, {**body, "id": f"{base}/missing/x.jpg"}]}
    return {"id": ident, "type": "Canvas", "width": width, "height": width,
            "label": {"en": [f"{p['title']} (v3)"]},
            "metadata": [{"label": {"en": ["Creator"]}, "value": {"none": [p["artist"]]}},
                         {"label": {"en": ["Date created"]}, "value": {"en": [f"c. {p['year']}"]}},
                         {"label": {"en": ["Movement"]}, "value": {"en": [p["style"]]}},
                         {"label": {"en": ["Inventory number"]}, "value": {"none": [f"INV-{n}"]}}],
            "items": [{"id": f"{ident}/page", "type": "AnnotationPage",
                       "items": [{"id": f"{ident}/page/a", "type": "Annotation",
                                  "motivation": "painting", "body": body, "target": ident}]}]}


@pytest.fixture(scope="module")
def served(server: Server, paintings: pd.DataFrame) -> Server:
    """Serve a v2 manifest, a v3 manifest and a v2 collection holding the v2 manifest, a missing
    one and a v3 collection of both manifests (the v2 one a second time)."""
    base, p = server.base, [paintings.iloc[i] for i in range(len(paintings))]
    server.docs["manifest2"] = {
        "@context": V2_PRESENTATION, "@id": f"{base}/doc/manifest2", "@type": "sc:Manifest",
        "label": "Paintings (v2)", "metadata": [{"label": "Repository", "value": "Test museum"}],
        "sequences": [{"@type": "sc:Sequence", "canvases": [
            v2_canvas(base, 1, p[0], width=2000),
            v2_canvas(base, 2, p[1]),
            v2_canvas(base, 3, p[2], service=None, resource=f"{base}/img/{p[2]['name']}.jpg"),
            v2_canvas(base, 4, p[3], service="missing"),
            v2_canvas(base, 5, None),
            v2_canvas(base, 6, p[4])]}]}
    server.docs["manifest3"] = {
        "@context": V3_PRESENTATION, "id": f"{base}/doc/manifest3", "type": "Manifest",
        "label": {"en": ["Paintings (v3)"]}, "items": [
            v3_canvas(base, 1, p[5], width=4000),
            v3_canvas(base, 2, p[6]),
            v3_canvas(base, 3, p[7], kind="ImageService2", width=3000),
            v3_canvas(base, 4, p[8], service="slow"),
            v3_canvas(base, 5, p[8], service="notimage"),
            v3_canvas(base, 6, p[9], service="big"),
            v3_canvas(base, 7, p[8], choice=True)]}
    server.docs["collection3"] = {
        "@context": V3_PRESENTATION, "id": f"{base}/doc/collection3", "type": "Collection",
        "label": {"en": ["v3 collection"]},
        "items": [{"id": f"{base}/doc/manifest3", "type": "Manifest"},
                  {"id": f"{base}/doc/manifest2", "type": "Manifest"}]}
    server.docs["collection"] = {
        "@context": V2_PRESENTATION, "@id": f"{base}/doc/collection", "@type": "sc:Collection",
        "label": "everything", "collections": [{"@id": f"{base}/doc/collection3",
                                                 "@type": "sc:Collection"}],
        "manifests": [{"@id": f"{base}/doc/manifest2", "@type": "sc:Manifest"},
                      {"@id": f"{base}/missing/manifest", "@type": "sc:Manifest"}]}
    return server


def test_a_iiif_collection_becomes_a_catalog_and_every_broken_canvas_a_reason(
        served, paintings, tmp_path):
    run = Run(tmp_path / "run")
    prepared = iiif_collection(f"{served.base}/doc/collection", run, SETTINGS, progress=False)
    result = build_catalog(prepared.collection, run, progress=False, upstream=prepared.rejected)
    good = [0, 1, 2, 4, 5, 6, 7, 8]
    assert sorted(result.catalog["image_id"]) == sorted(content_id(paintings.iloc[i])
                                                        for i in good)
    base = served.base
    reasons = dict(zip(result.rejected["file"], result.rejected["reason"], strict=True))
    assert reasons == {
        f"{base}/canvas/v2/4": "HTTP 404", f"{base}/canvas/v2/5": "no image",
        f"{base}/canvas/v3/4": "timeout", f"{base}/canvas/v3/5": "not an image",
        f"{base}/canvas/v3/6": "oversized", f"{base}/missing/manifest": "manifest unreadable"}
    written = pd.read_csv(run.rejected_path)
    assert set(written["reason"]) == set(reasons.values())
    # The canvas and the manifest; not the server's port, which may hold the digits 404.
    assert written["detail"].str.contains(r"(?<!\d)404(?!\d)").sum() == 2

    # Bounded sizes: !1024,1024 for images known to be larger, the whole (v2 full, v3 max) for
    # those known to fit; an image without a service is fetched as it is.
    asked = served.images_asked()
    name = paintings["name"]
    assert f"/iiif/{name[0]}/full/!1024,1024/0/default.jpg" in asked
    assert f"/iiif/{name[1]}/full/full/0/default.jpg" in asked
    assert f"/img/{name[2]}.jpg" in asked
    assert f"/iiif/{name[5]}/full/!1024,1024/0/default.jpg" in asked
    assert f"/iiif/{name[6]}/full/max/0/default.jpg" in asked
    assert f"/iiif/{name[7]}/full/!1024,1024/0/default.jpg" in asked  # a v2 service in v3
    assert asked.count(f"/missing/{name[3]}/full/full/0/default.jpg") == 1  # 404: not retried
    assert asked.count(f"/missing/{name[3]}.jpg") == 1  # then the resource itself
    assert served.log.count("/doc/manifest2") == 1  # listed twice, read once

    # Fields from the metadata pairs: v2 labels, v3 language maps, a range of dates.
    cat = result.catalog.set_index("image_id")
    for i in (0, 1, 5):
        row, want = cat.loc[content_id(paintings.iloc[i])], paintings.iloc[i]
        assert row["artist"] == want["artist"]
        assert row["year"] == int(want["year"])
        assert row["style"] == want["style"]
    first = cat.loc[content_id(paintings.iloc[0])]
    assert (first["title"], first["genre"]) == (paintings["title"][0], paintings["genre"][0])
    assert cat.loc[content_id(paintings.iloc[5]), "title"] == f"{paintings['title'][5]} (v3)"
    table = pd.read_csv(prepared.collection.metadata, dtype=str)
    assert set(table["Repository"].dropna()) == {"Test museum"}  # manifest-level pair, kept
    assert table["Inventory number"].notna().sum() == 4  # canvas-level pair, kept

    # A second run asks for nothing it already has, and leaves the catalog as it was.
    fetched = (run.fetched_dir / "fetched.csv").read_text()
    served.log.clear()
    again = iiif_collection(f"{served.base}/doc/collection", run, SETTINGS, progress=False)
    assert again.report["fetched"] == 0
    assert again.report["kept"] == len(good)
    retried = {p.split("/")[1] for p in served.images_asked()}
    assert retried == {"missing", "slow", "notimage", "big"}  # only the broken ones
    assert (run.fetched_dir / "fetched.csv").read_text() == fetched
    before = run.step_record("catalog", "catalog")["finished_at"]
    build_catalog(again.collection, run, progress=False, upstream=again.rejected)
    assert run.step_record("catalog", "catalog")["finished_at"] == before
    assert run.step_record("fetch", "iiif")["kept"] == len(good)


def test_a_busy_server_is_asked_again_and_a_missing_image_is_not(served, paintings, tmp_path):
    served.log.clear()
    name = paintings["name"][0]
    flaky, missing = f"{served.base}/flaky/{name}.jpg", f"{served.base}/missing/{name}.jpg"
    got = fetch_images([Job((flaky,)), Job((missing,))], tmp_path / "images",
                       tmp_path / "fetched.csv", SETTINGS, progress=False)
    assert got[flaky].ok
    assert (tmp_path / "images" / got[flaky].file).read_bytes() == served.paintings[name]
    assert served.log.count(f"/flaky/{name}.jpg") == 2  # 503, then the image
    assert (got[missing].reason, served.log.count(f"/missing/{name}.jpg")) == ("HTTP 404", 1)
    record = pd.read_csv(tmp_path / "fetched.csv")
    assert record.set_index("url").loc[missing, "status"] == 404


def test_extract_iiif_runs_the_catalog_and_extraction_on_a_manifest(served, paintings, tmp_path,
                                                                     capsys):
    run = tmp_path / "run"
    status = main(["--no-progress", "extract", "--run", str(run), "--iiif",
                   f"{served.base}/doc/manifest2", "--extractors", "pca",
                   "--fetch-timeout", "5", "--columns", "nationality=Repository"])
    assert status == 0
    out = capsys.readouterr().out
    assert "fetch: 6 canvases; 4 images fetched, 0 kept from before, 2 left out" in out
    catalog = Run(run).catalog()
    assert len(catalog) == 4
    assert set(catalog["nationality"]) == {"Test museum"}  # a kept pair read as a field
    assert Run(run).features("pca").shape[0] == 4
    rejected = pd.read_csv(Run(run).rejected_path)
    assert sorted(rejected["reason"]) == ["HTTP 404", "no image"]
    assert main(["check", "--run", str(run)]) == 0  # the fetch's tables are recorded intact


def test_a_manifest_that_is_not_iiif_is_one_clear_error(served, tmp_path, capsys):
    (tmp_path / "m.json").write_text(json.dumps({"hello": "world"}))
    assert main(["extract", "--run", str(tmp_path / "run"), "--iiif",
                 str(tmp_path / "m.json")]) == 2
    assert "not a IIIF manifest or collection" in capsys.readouterr().err
    assert main(["extract", "--run", str(tmp_path / "run"), "--iiif",
                 f"{served.base}/missing/manifest"]) == 2
    assert "HTTP 404" in capsys.readouterr().err


@pytest.fixture
def met_table(served: Server, paintings: pd.DataFrame, tmp_path: Path) -> Path:
    """Five rows in the Met's own column names: three images on the server, one without a URL
    and one whose URL answers 404."""
    rows = []
    for i, (p, url) in enumerate(zip(paintings.head(5).itertuples(),
                                     [f"/img/{paintings['name'][0]}.jpg",
                                      f"/img/{paintings['name'][1]}.jpg",
                                      f"/img/{paintings['name'][2]}.jpg", "", "/missing/x.jpg"],
                                     strict=True)):
        row = dict.fromkeys(MET_HEADER, "")
        row.update({"Object ID": str(1000 + i), "Title": p.title, "Is Public Domain": "True",
                    "Artist Display Name": p.artist, "Artist Nationality": p.nationality,
                    "Artist Begin Date": p.birth_year, "Artist End Date": p.death_year,
                    "Object Date": f"ca. {p.year}", "Object Begin Date": p.year,
                    "Classification": "Paintings", "Department": "European Paintings",
                    "Link Resource": f"https://www.metmuseum.org/art/collection/search/{1000 + i}",
                    "Primary Image": f"{served.base}{url}" if url else ""})
        rows.append(row)
    path = tmp_path / "MetObjects.csv"
    pd.DataFrame(rows, columns=MET_HEADER).to_csv(path, index=False)
    return path


def test_a_met_table_with_the_met_preset_is_fetched_and_mapped(met_table, paintings, tmp_path):
    run = Run(tmp_path / "run")
    prepared = table_collection(met_table, run, None, None, SETTINGS, progress=False,
                                preset="met")
    result = build_catalog(prepared.collection, run, progress=False, upstream=prepared.rejected)
    cat = result.catalog.set_index("image_id")
    assert sorted(cat.index) == sorted(content_id(paintings.iloc[i]) for i in range(3))
    for i in range(3):
        row, want = cat.loc[content_id(paintings.iloc[i])], paintings.iloc[i]
        assert (row["artist"], row["title"], row["nationality"]) == (
            want["artist"], want["title"], want["nationality"])
        assert (row["year"], row["birth_year"]) == (int(want["year"]), int(want["birth_year"]))
    rejected = result.rejected.set_index("row")
    assert rejected.loc[5, "reason"] == "no image URL"  # CSV lines: the header is line 1
    assert rejected.loc[6, "reason"] == "HTTP 404"
    assert rejected.loc[6, "artist"] == paintings["artist"][4]
    assert not prepared.notes  # every field the preset names is a column of this table


def test_the_guess_maps_the_mets_columns_and_prints_toml(met_table, capsys):
    guessed = {g.field: g.column for g in guess_columns(read_table(met_table))}
    assert guessed["artist"] == "Artist Display Name"
    assert guessed["year"] == "Object Begin Date"
    assert guessed["birth_year"] == "Artist Begin Date"
    assert guessed["death_year"] == "Artist End Date"
    assert guessed["title"] == "Title"
    assert guessed["nationality"] == "Artist Nationality"
    assert guessed["image_url"] == "Primary Image"  # not Link Resource, a page
    assert "file" not in guessed
    assert cmd_columns(str(met_table)) == 0
    printed = tomllib.loads(capsys.readouterr().out)["extract"]["columns"]
    assert printed == guessed


@pytest.mark.parametrize("preset", ["rijksmuseum", "wikidata"])
def test_json_exports_with_their_presets(preset, served, paintings, tmp_path):
    base, p = served.base, paintings.head(2)
    if preset == "rijksmuseum":
        doc = {"count": 2, "artObjects": [
            {"objectNumber": f"SK-A-{i}", "title": r.title, "principalOrFirstMaker": r.artist,
             "webImage": {"url": f"{base}/img/{r.name}.jpg", "width": 224},
             "dating": {"sortingDate": int(r.year)}} for i, r in enumerate(p.itertuples())]}
    else:
        doc = {"head": {"vars": ["item", "itemLabel", "creatorLabel", "inception", "image"]},
               "results": {"bindings": [
                   {"item": {"type": "uri", "value": f"http://www.wikidata.org/entity/Q{i}"},
                    "itemLabel": {"type": "literal", "value": r.title},
                    "creatorLabel": {"type": "literal", "value": r.artist},
                    "inception": {"type": "literal", "value": f"{r.year}-01-01T00:00:00Z"},
                    "image": {"type": "uri", "value": f"{base}/img/{r.name}.jpg"}}
                   for i, r in enumerate(p.itertuples())]}}
    path = tmp_path / "export.json"
    path.write_text(json.dumps(doc))
    run = Run(tmp_path / "run")
    served.log.clear()
    prepared = table_collection(path, run, None, None, SETTINGS, progress=False, preset=preset)
    result = build_catalog(prepared.collection, run, progress=False, upstream=prepared.rejected)
    cat = result.catalog.sort_values("title")
    want = p.sort_values("title")
    assert cat["artist"].tolist() == want["artist"].tolist()
    assert cat["year"].tolist() == [int(y) for y in want["year"]]
    if preset == "wikidata":  # Commons is asked for a 1024-wide rendering
        assert all(path.endswith("?width=1024") for path in served.images_asked())
