"""The JSON API on the production server (`python -m dash_app`, waitress) over the test run: the
similar answer is what `similar --json` prints for the same image, the other answers are the
run's, every answer matches the schema the OpenAPI document gives for it, and each bad input
gets a JSON 4xx with a one-line reason, the run unchanged and no traceback in the log."""

from __future__ import annotations

import io
import json
import re
import shutil
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from jsonschema import Draft202012Validator
from PIL import Image
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from dash_app.api import MAX_K, MAX_REQUEST_BYTES, PREFIX
from dash_app.guard import HEADERS, SMALL_REQUEST_BYTES
from dash_app.pages.upload import MAX_UPLOAD_BYTES
from influence.commands import cmd_index
from influence.influence import load_influence
from influence.pipeline import main as pipeline
from influence.readers import head_paths, trained_heads
from influence.runs import Run, read_json
from influence.similar import Explorer
from tests.test_server import Server, bomb, lying_jpeg, png, snapshot

PATHS = {f"{PREFIX}/similar", f"{PREFIX}/paintings/{{image_id}}",
         f"{PREFIX}/artists/{{artist_id}}", f"{PREFIX}/heads", f"{PREFIX}/openapi.json"}


@pytest.fixture(scope="module")
def api_run(explored_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The explored run with `pca` indexed too, so a query may name a second feature set."""
    dest = tmp_path_factory.mktemp("api-run")
    shutil.copytree(explored_run.root, dest, dirs_exist_ok=True)
    assert cmd_index(run=str(dest), features="pca", progress=False) == 0
    return Run(dest)


@pytest.fixture(scope="module")
def api(api_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = Server(api_run, tmp_path_factory.mktemp("api-server") / "server.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def schemas(api: Server) -> dict:
    """The served OpenAPI document."""
    response = requests.get(f"{api.base}{PREFIX}/openapi.json", timeout=30)
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("application/json")
    return json.loads(response.text)


def conforms(document: dict, schema: str, answer: object) -> None:
    """Assert that an answer is valid against a schema of the document's components."""
    registry = Registry().with_resource(
        "urn:openapi", Resource.from_contents(document, default_specification=DRAFT202012))
    validator = Draft202012Validator({"$ref": f"urn:openapi#/components/schemas/{schema}"},
                                     registry=registry)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(answer)]
    assert not errors, errors[:5]


def printed(capsys: pytest.CaptureFixture, *argv: str) -> dict:
    """The JSON object `similar --json` prints for one image."""
    capsys.readouterr()
    assert pipeline(["similar", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def ask(api: Server, raw: bytes, name: str, **form: str) -> requests.Response:
    return requests.post(f"{api.base}{PREFIX}/similar", files={"image": (name, raw)},
                         data=form, timeout=120)


def test_similar_is_what_the_command_line_prints(api: Server, api_run: Run, schemas: dict,
                                                 tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = api_run.catalog()
    painting = api_run.image_path(catalog["file"].iat[7])
    # Enlarged past twice the page's decoding side: the API decodes it whole, as `similar` does.
    with Image.open(painting) as img:
        big = img.convert("RGB").resize((img.width * 1400 // min(img.size),
                                         img.height * 1400 // min(img.size)))
    big.save(tmp_path / "query.jpg", quality=92)
    other = next(f for f in ("mobilenet_v2", "pca") if f != api.health["search"])
    monkeypatch.chdir(tmp_path)
    answers = []
    for raw, name, form, argv in (
            ((tmp_path / "query.jpg").read_bytes(), "query.jpg", {"k": "7"}, ["--k", "7"]),
            (painting.read_bytes(), painting.name, {"features": other}, ["--features", other])):
        (tmp_path / name).write_bytes(raw)
        expected = printed(capsys, "--run", str(api_run.root), name, *argv)
        response = ask(api, raw, name, **form)
        assert response.status_code == 200, response.text
        answer = response.json()
        conforms(schemas, "Similar", answer)
        assert {k: v for k, v in answer.items() if k != "seconds"} == \
            {k: v for k, v in expected.items() if k != "seconds"}
        answers.append(answer)
    assert answers[0]["query"] == "query.jpg"
    assert len(answers[0]["paintings"]) == 7
    assert len(answers[1]["paintings"]) == 10
    assert {a["features"] for a in answers} == {"mobilenet_v2", "pca"}
    learned = next(a for a in answers if a["features"] == "mobilenet_v2")
    assert learned["paintings"][0]["image_id"] == catalog["image_id"].iat[7]
    assert set(learned["predictions"]) == {"style", "artist"}
    assert learned["clusters"]


def test_paintings_artists_and_heads_are_the_runs(api: Server, api_run: Run,
                                                  schemas: dict) -> None:
    catalog = api_run.catalog()
    image_id = catalog["image_id"].iat[40]
    response = requests.get(f"{api.base}{PREFIX}/paintings/{image_id}?k=5", timeout=60)
    assert response.status_code == 200, response.text
    painting = response.json()
    conforms(schemas, "Painting", painting)
    row = catalog.iloc[40]
    assert {k: painting["metadata"][k] for k in ("file", "artist", "title", "style")} == \
        {k: row[k] for k in ("file", "artist", "title", "style")}
    assert requests.get(api.base + painting["thumbnail"], timeout=30).status_code == 200
    explorer = Explorer(api_run, api.health["search"])
    expected = explorer.neighbours_of(image_id, k=5)
    assert {k: v for k, v in painting["similar"].items() if k != "seconds"} == \
        {k: v for k, v in expected.items() if k != "seconds"}
    assert image_id not in [p["image_id"] for p in painting["similar"]["paintings"]]

    response = requests.get(f"{api.base}{PREFIX}/artists/alfred-sisley", timeout=30)
    assert response.status_code == 200, response.text
    artist = response.json()
    conforms(schemas, "Artist", artist)
    assert artist["artist"]["artist"] == "Alfred Sisley"
    earlier = load_influence(api_run).earlier("Alfred Sisley", 5)
    assert [(c["artist"], c["score"], c["percentile"], c["recorded"])
            for c in artist["influences"]] == \
        list(earlier[["influenced_by", "score", "percentile", "recorded"]].itertuples(
            index=False, name=None))
    monet = next(c for c in artist["influences"] if c["artist"] == "Claude Monet")
    assert monet["recorded"]
    assert monet["evidence"]
    assert all(e["image_id"] in set(artist["paintings"]) for e in monet["evidence"])
    assert len(artist["paintings"]) == 30

    response = requests.get(f"{api.base}{PREFIX}/heads", timeout=30)
    assert response.status_code == 200
    heads = response.json()
    conforms(schemas, "Heads", heads)
    assert heads["targets"] == ["style", "artist"]
    assert heads["features"] == ["mobilenet_v2"]
    for head in heads["heads"]:
        stored = read_json(head_paths(api_run, head["target"], head["features"])["json"])
        assert head["accuracy"] == stored["accuracy"]
        assert head["macro_f1"] == stored["macro_f1"]
        assert head["classes"] == stored["classes"]
        assert "model" not in head
    assert len(heads["heads"]) == len(trained_heads(api_run))


def test_openapi_document_names_every_path_and_resolves(schemas: dict) -> None:
    assert schemas["openapi"].startswith("3.1")
    assert set(schemas["paths"]) == PATHS

    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            if "$ref" in node:
                yield node["$ref"]
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    names = set(schemas["components"]["schemas"])
    found = set(refs(schemas))
    assert found == {f"#/components/schemas/{n}" for n in names}
    for name, schema in schemas["components"]["schemas"].items():
        Draft202012Validator.check_schema(schema)
        assert name
    for path, operations in schemas["paths"].items():
        for method, operation in operations.items():
            assert "200" in operation["responses"], (path, method)
            for status, response in operation["responses"].items():
                if status.startswith("4") or status.startswith("5"):
                    assert response["content"]["application/json"]["schema"] == \
                        {"$ref": "#/components/schemas/Error"}, (path, status)


def bad_requests(api_run: Run) -> list[tuple[str, str, dict, int, str]]:
    """(method, path, requests arguments, status, reason as a regular expression)."""
    painting = api_run.image_path(api_run.catalog()["file"].iat[0]).read_bytes()
    image_id = api_run.catalog()["image_id"].iat[0]
    small = io.BytesIO()
    Image.new("RGB", (10, 10)).save(small, "PNG")
    similar = f"{PREFIX}/similar"

    def upload(raw: bytes, **form: str) -> dict:
        return {"files": {"image": ("x.jpg", raw)}, "data": form}

    return [
        ("POST", similar, {"data": {"k": "3"}}, 400, "multipart file field 'image'"),
        ("POST", similar, {"data": {"image": "hello"}}, 400, "multipart file field 'image'"),
        ("POST", similar, upload(b"hello world " * 50), 400, "not an image"),
        ("POST", similar, upload(b"<svg xmlns='http://www.w3.org/2000/svg'><script>alert(1)"
                                 b"</script></svg>"), 400, "not an image"),
        ("POST", similar, upload(b""), 400, "not an image"),
        ("POST", similar, upload(painting[:len(painting) // 2]), 400, "corrupt|truncated"),
        ("POST", similar, upload(bomb(7100)), 400, "more than"),
        ("POST", similar, upload(png(7000, 7000, zlib.compress(b"\0" * 64))), 400,
         "implausible"),
        ("POST", similar, upload(lying_jpeg()), 400, "implausible"),
        ("POST", similar, upload(small.getvalue()), 400, "too small"),
        ("POST", similar, upload(b"\xff\xd8" + b"\0" * MAX_UPLOAD_BYTES), 413,
         "larger than 20 MB"),
        ("POST", similar, upload(b"\0" * (MAX_REQUEST_BYTES + 1000)), 413,
         f"too large \\(at most {MAX_REQUEST_BYTES:,} bytes"),
        *[("POST", similar, upload(painting, k=k), 400, "k must be a whole number")
          for k in ("0", "-3", str(MAX_K + 1), "2.5", "ten", "1e9", "")],
        ("POST", similar, upload(painting, features="nope"), 400, "unknown feature set 'nope'"),
        ("POST", similar, upload(painting, features="../../run.json"), 400,
         "unknown feature set"),
        ("GET", similar, {}, 405, "method not allowed \\(allowed: .*POST"),
        ("GET", f"{PREFIX}/paintings/ffffffffffffffff", {}, 404, "no painting"),
        ("GET", f"{PREFIX}/paintings/..%2F..%2Frun.json", {}, 404, ""),
        ("GET", f"{PREFIX}/paintings/{'a' * 300}", {}, 404, "no painting"),
        ("GET", f"{PREFIX}/paintings/{image_id}?k=1000", {}, 400, "k must be"),
        ("GET", f"{PREFIX}/paintings/{image_id}?features=nope", {}, 400, "unknown feature set"),
        ("GET", f"{PREFIX}/artists/nobody", {}, 404, "no artist with artist_id 'nobody'"),
        ("GET", f"{PREFIX}/artists/{'x' * 300}", {}, 404, "no artist"),
        ("GET", f"{PREFIX}/nothing", {}, 404, "no such API path"),
        ("POST", f"{PREFIX}/heads", {"data": b"x" * (SMALL_REQUEST_BYTES + 1)}, 413,
         "too large"),
    ]


def test_bad_input_gets_a_json_4xx_with_a_one_line_reason(api: Server, api_run: Run) -> None:
    before = snapshot(api_run.root)
    for method, path, kwargs, status, reason in bad_requests(api_run):
        response = requests.request(method, api.base + path, timeout=120, **kwargs)
        assert response.status_code == status, (path, status, response.text[:300])
        assert response.headers["Content-Type"].startswith("application/json"), path
        body = response.json()
        assert set(body) == {"error"}, (path, body)
        assert body["error"], path
        assert "\n" not in body["error"], (path, body)
        assert re.search(reason, body["error"]), (path, reason, body)
        assert "Traceback" not in body["error"]
        assert str(api_run.root) not in body["error"]
        for name, value in HEADERS.items():
            assert response.headers[name] == value
    assert requests.get(f"{api.base}{PREFIX}/heads", timeout=30).status_code == 200
    assert snapshot(api_run.root) == before
    log = api.log.read_text()
    assert "Traceback" not in log, log[-3000:]
