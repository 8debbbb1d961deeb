"""The production server (`python -m dash_app`, waitress, on a free loopback port) under
malformed and hostile requests: each gets a 4xx or a message in the page, others are still
answered within a second, memory stays bounded, the log holds no traceback and the run is left
as it was. Also the built-in authentication, the Host allow-list and the shared query object."""

from __future__ import annotations

import base64
import io
import json
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image
from werkzeug.security import generate_password_hash

from dash_app.__main__ import main
from dash_app.app import create_app
from dash_app.data import RunData, load_run_data
from dash_app.guard import HEADERS, SMALL_REQUEST_BYTES
from dash_app.pages.upload import MAX_BASE64_CHARS, MAX_REQUEST_BYTES
from influence.runs import Run

UPLOAD = ("..upload-result.children...upload-answer.data..",
          [("upload-result", "children"), ("upload-answer", "data")])
#: Values every callback input is sent in turn: wrong types, oversized, forged.
HOSTILE = [None, True, -1, 1e308, "x" * 5000, "../../run.json", [], [1] * 5000,
           ["ffffffffffffffff", "../catalog.parquet"] * 300, {"points": [{"customdata": "x"}]},
           {"lassoPoints": {"x": [0.0] * 3, "y": [1.0] * 4}},
           {"lassoPoints": {"x": list(range(50_000)), "y": list(range(50_000))}},
           {"range": {"x": ["a", "b"], "y": [0, 1]}}, {"a": {"b": {"c": [None]}}}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under the run with its size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*")) if p.is_file()}


class Server:
    """`python -m dash_app` over a run, its log in a file."""

    def __init__(self, run: Run, log: Path, *extra: str) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._out = log.open("w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dash_app", "--run", str(run.root), "--port", str(self.port),
             *extra], stdout=self._out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while True:
            try:
                self.health = requests.get(self.base + "/health", timeout=5).json()
                return
            except requests.ConnectionError:
                assert self.process.poll() is None, log.read_text()
                assert time.monotonic() < deadline
                time.sleep(0.5)

    def peak_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(60)
        self._out.close()
        return self.log.read_text()


@pytest.fixture(scope="module")
def server(explored_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # --threads as a user passes it (its default, so the hostile requests meet the usual pool).
    server = Server(explored_run, tmp_path_factory.mktemp("server") / "server.log",
                    "--threads", "8")
    yield server
    server.stop()


def test_python_m_dash_app_serves_with_waitress(server: Server, tmp_path: Path) -> None:
    bad = subprocess.run([sys.executable, "-m", "dash_app", "--run", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert bad.stderr.startswith("error: no run directory")
    health = requests.get(f"{server.base}/health", timeout=30)
    assert health.headers["Server"] == "waitress"
    assert health.json()["status"] == "ok"
    page = requests.get(f"{server.base}/", timeout=30)
    assert page.status_code == 200
    assert "_dash-renderer" in page.text
    assert re.search(r"\d+ MB for the run, \d+ MB resident", server.log.read_text())


def post(server: Server, output: str, outputs: list[tuple[str, str]], inputs: list[dict],
         state: list[dict] | None = None, timeout: float = 120) -> requests.Response:
    """One callback request as the browser sends it."""
    spec = [{"id": i, "property": p} for i, p in outputs]
    body = {"output": output, "outputs": spec if len(spec) > 1 else spec[0], "inputs": inputs,
            "changedPropIds": [f"{inputs[0]['id']}.{inputs[0]['property']}"] if inputs else [],
            "state": state or []}
    return requests.post(f"{server.base}/_dash-update-component", json=body, timeout=timeout)


def upload(server: Server, contents: object, name: object = "x.png") -> requests.Response:
    return post(server, *UPLOAD, [{"id": "upload-payload", "property": "data",
                                   "value": {"contents": contents, "filename": name}}])


def data_url(raw: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(raw).decode()


def png(width: int, height: int, idat: bytes) -> bytes:
    """A grayscale PNG with this header and these compressed pixel rows."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                                 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def bomb(side: int) -> bytes:
    """A real side x side black PNG: a few tens of kilobytes that decode to side² bytes."""
    packer = zlib.compressobj(9)
    row = b"\0" * (side + 1)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    return png(side, side, idat)


def lying_jpeg() -> bytes:
    """A 64x64 JPEG whose frame header claims 7000x7000."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, "JPEG")
    raw = bytearray(buffer.getvalue())
    sof = raw.index(b"\xff\xc0")
    raw[sof + 5:sof + 9] = struct.pack(">HH", 7000, 7000)
    return bytes(raw)


def upload_cases(explored_run: Run) -> dict[str, tuple[object, str]]:
    """Hostile uploads and what the page must say (a regular expression)."""
    painting = explored_run.image_path(explored_run.catalog()["file"].iat[0]).read_bytes()
    small = io.BytesIO()
    Image.new("RGB", (80, 80), (0, 90, 200)).save(small, "PNG")
    return {
        "oversized": ("data:image/jpeg;base64," + "A" * (MAX_BASE64_CHARS + 8), "larger than"),
        "truncated": (data_url(painting[:len(painting) // 2], "image/jpeg"),
                      "corrupt|truncated"),
        "bomb": (data_url(bomb(7100)), "more than|implausible"),
        "lying png": (data_url(png(7000, 7000, zlib.compress(b"\0" * 64))), "implausible"),
        "lying jpeg": (data_url(lying_jpeg(), "image/jpeg"), "implausible"),
        "polyglot png+html": (data_url(small.getvalue() + b"<script>alert(1)</script>" * 20),
                              "Nearest paintings|not an image"),
        "svg with script": (data_url(b"<svg xmlns='http://www.w3.org/2000/svg'><script>"
                                     b"alert(1)</script></svg>", "image/svg+xml"),
                            "not an image"),
        "not base64": ("data:image/png;base64,@@@@", "could not be read"),
        "a number": (12345, "empty upload"),
        "a list": (["data:image/png;base64,AAAA"], "empty upload"),
    }


def run_health(server: Server, stop: threading.Event, latencies: list[float]) -> None:
    """Ask /health every 0.2 s until stopped, recording how long each answer took."""
    while not stop.is_set():
        start = time.perf_counter()
        requests.get(server.base + "/health", timeout=30).raise_for_status()
        latencies.append(time.perf_counter() - start)
        stop.wait(0.2)


def test_hostile_requests_get_a_4xx_or_a_message_and_the_server_stays_well(
        server: Server, explored_run: Run, record_property) -> None:
    before = snapshot(explored_run.root)
    loaded_mb = server.health["memory_mb"]["rss"]
    stop, latencies = threading.Event(), []
    watcher = threading.Thread(target=run_health, args=(server, stop, latencies))
    watcher.start()
    try:
        # Uploads: each answered in the page, eight hostile ones at once as well.
        cases = upload_cases(explored_run)
        for name, (contents, expected) in cases.items():
            response = upload(server, contents)
            assert response.status_code == 200, name
            assert re.search(expected, response.text), (name, response.text[:300])
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda c: upload(server, c), [cases["bomb"][0],
                                                                 cases["lying png"][0]] * 4))
        assert all("implausible" in a.text or "more than" in a.text for a in answers)
        for payload in ("a string", 7, [1, 2], {"error": {"x": 1}}, {"filename": ["x"]}):
            response = post(server, *UPLOAD, [{"id": "upload-payload", "property": "data",
                                               "value": payload}])
            assert response.status_code in (200, 204), payload
        # A body over the largest upload is refused before it is read; any other request
        # over the small cap is refused too, whatever it claims to be.
        huge = requests.post(f"{server.base}/_dash-update-component",
                             data=b"x" * (MAX_REQUEST_BYTES + 10),
                             headers={"Content-Type": "application/json"}, timeout=60)
        assert huge.status_code == 413
        search = post(server, "search-suggestions.children", [("search-suggestions",
                                                               "children")],
                      [{"id": "search", "property": "value", "value": "a" * SMALL_REQUEST_BYTES}])
        assert search.status_code == 413
        # A client that disconnects mid-upload.
        with socket.create_connection(("127.0.0.1", server.port)) as s:
            s.sendall(b"POST /_dash-update-component HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 20000000\r\n\r\n"
                      + b'{"output": "' + b"x" * 1_000_000)
        # The search box: kilobytes of words, eight at once, each answered quickly.
        words = " ".join(f"w{n}" for n in range(1500))
        with ThreadPoolExecutor(8) as pool:
            found = list(pool.map(lambda _: post(
                server, "search-suggestions.children", [("search-suggestions", "children")],
                [{"id": "search", "property": "value", "value": words}]), range(8)))
        assert all(f.status_code == 200 and "Nothing found" in f.text for f in found)
        # Every server-side callback with wrong types and oversized values in every input.
        statuses = fuzz_callbacks(server)
        assert set(statuses) <= {200, 204, 400, 413}, statuses
        # Malformed callback requests.
        for body in (b"not json", b"[]", b'{"output": "nothing.here", "inputs": []}',
                     b'{"output": "search-suggestions.children", "inputs": 5}',
                     json.dumps({"output": "..upload-result.children...upload-answer.data..",
                                 "outputs": {"id": "x"}, "inputs": [{"id": "upload-payload"}]}
                                ).encode()):
            response = requests.post(f"{server.base}/_dash-update-component", data=body,
                                     headers={"Content-Type": "application/json"}, timeout=60)
            assert 400 <= response.status_code < 500, body
        # Path-like and malformed ids, and links that do not parse.
        for path in ("/painting/..%2F..%2Frun.json", "/thumbs/..%2Fcatalog.parquet.jpg",
                     "/images/../../run.json", "/images/%00", "/plots/..%2F..%2Frun/elbow.png",
                     "/_dash-component-suites/dash/..%2F..%2F..%2Fetc%2Fpasswd"):
            response = requests.get(server.base + path, timeout=30)
            assert response.status_code in (200, 400, 404), path
            assert b"root:" not in response.content
            assert b"catalog" not in response.content[:200]
        for pathname, search_text in (("/map", "?year_from=inf&year_to=nan&box=1,2,3"),
                                      ("/map", "?lasso=" + ",".join(["1"] * 9001)),
                                      ("/map", "?focus=..&at=nan,inf&data=x"),
                                      ("/compare", "?a=%00&b=[]"), ("/", "?x=1"),
                                      ("/clusters", "?min_p=nan&cluster=1e400&method=x"),
                                      ("/heads", "?target=../../run.json&features=%00"),
                                      ("/influence", "?links=99&by=..&group=x"),
                                      ("/painting/../../run.json", ""), ("/artist/%00", ""),
                                      ("/journey", "?dimension=[]&measure=1")):
            response = post(server, ".._pages_content.children..._pages_store.data..",
                            [("_pages_content", "children"), ("_pages_store", "data")],
                            [{"id": "_pages_location", "property": "pathname",
                              "value": pathname},
                             {"id": "_pages_location", "property": "search",
                              "value": search_text}])
            assert response.status_code == 200, (pathname, search_text)
        slow_clients(server, 150)
    finally:
        stop.set()
        watcher.join()
    peak = server.peak_mb()
    record_property("server_loaded_mb", loaded_mb)
    record_property("server_peak_mb", peak)
    print(f"server memory: {loaded_mb:.0f} MB loaded, peak {peak:.0f} MB; /health answered in "
          f"at most {max(latencies):.2f} s ({len(latencies)} times)")
    assert max(latencies) < 1.0
    assert peak < loaded_mb + 1000
    assert snapshot(explored_run.root) == before
    response = requests.get(server.base + "/health", timeout=5)
    assert response.status_code == 200
    for name, value in HEADERS.items():
        assert response.headers[name] == value
    log = server.log.read_text()
    assert "Traceback" not in log, log[-3000:]
    assert "callback error" not in log, log[-3000:]


def filled(items: list[dict], value: object) -> list:
    """Callback inputs (or states) all holding `value`; a wildcard one as one forged id."""
    out: list = []
    for item in items:
        if item["id"].startswith("{"):
            ident = {"type": json.loads(item["id"])["type"], "index": "../x"}
            out.append([{"id": ident, "property": item["property"], "value": value}])
        else:
            out.append({"id": item["id"], "property": item["property"], "value": value})
    return out


def fuzz_callbacks(server: Server) -> list[int]:
    """Send each server-side callback every HOSTILE value in all its inputs and states."""
    deps = requests.get(server.base + "/_dash-dependencies", timeout=30).json()
    statuses = []
    for dep in deps:
        if dep.get("clientside_function"):
            continue
        output = dep["output"]
        parts = output.strip(".").split("...") if output.startswith("..") else [output]
        spec = [dict(zip(("id", "property"), p.rsplit(".", 1), strict=True)) for p in parts]
        for value in HOSTILE:
            inputs, state = filled(dep["inputs"], value), filled(dep["state"], value)
            first = inputs[0][0] if isinstance(inputs[0], list) else inputs[0]
            ident = first["id"] if isinstance(first["id"], str) else json.dumps(first["id"])
            body = {"output": output, "outputs": spec if len(spec) > 1 else spec[0],
                    "inputs": inputs, "state": state,
                    "changedPropIds": [f"{ident}.{first['property']}"]}
            response = requests.post(f"{server.base}/_dash-update-component", json=body,
                                     timeout=120)
            statuses.append(response.status_code)
    return statuses


def slow_clients(server: Server, count: int) -> None:
    """More slow clients than waitress's default connection limit, each half-way through its
    headers, while /health must still answer within a second."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.create_connection(("127.0.0.1", server.port))
            s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
            sockets.append(s)
        for s in sockets:
            s.sendall(b"a")
        start = time.perf_counter()
        assert requests.get(server.base + "/health", timeout=10).status_code == 200
        assert time.perf_counter() - start < 1.0
    finally:
        for s in sockets:
            s.close()


# --------------------------------------------------------------- authentication and hosts
@pytest.fixture(scope="module")
def data(explored_run: Run) -> RunData:
    return load_run_data(explored_run.root)


def test_auth_file_lets_in_only_its_users(data: RunData, explored_run: Run,
                                          tmp_path: Path) -> None:
    users = {"ada": generate_password_hash("correct horse")}
    client = create_app(explored_run.root, data, users=users,
                        allowed_hosts=["explorer.example.org"]).server.test_client()
    host = {"Host": "explorer.example.org"}
    good = {**host, "Authorization": "Basic " + base64.b64encode(b"ada:correct horse").decode()}
    bad = {**host, "Authorization": "Basic " + base64.b64encode(b"ada:wrong").decode()}
    for path in ("/", "/health", f"/thumbs/{data.catalog['image_id'].iat[0]}.jpg",
                 "/api/v1/heads"):
        refused = client.get(path, headers=host)
        assert refused.status_code == 401
        assert "Basic" in refused.headers["WWW-Authenticate"]
        assert client.get(path, headers=bad).status_code == 401
        assert client.get(path, headers=good).status_code == 200
        assert client.get(path, headers=good).status_code == 200
    assert client.get("/health", headers={**good, "Host": "evil.example"}).status_code == 400
    # The command line reads the same file, and refuses one it cannot use.
    auth = tmp_path / "users"
    auth.write_text("# explorer users\nada\n")
    assert main(["--run", str(explored_run.root), "--auth-file", str(auth)]) == 2
    auth.write_text("\n".join(f"{u}:{h}" for u, h in users.items()) + "\n")
    from dash_app.guard import read_users
    assert read_users(auth) == users


# -------------------------------------------------------------------- the shared query object
def test_queries_from_many_threads_answer_as_one_at_a_time(data: RunData,
                                                           explored_run: Run) -> None:
    """Uploads, neighbours and selections sharing the one Explorer from eight threads get the
    answers they get alone."""
    catalog = data.catalog
    images = [Image.open(explored_run.image_path(catalog["file"].iat[r])).convert("RGB")
              for r in (0, 60, 120)]
    ids = list(catalog["image_id"].iloc[[5, 70, 150]])

    def ask(n: int) -> list[str]:
        kind, which = n % 3, n // 3
        if kind == 0:
            return [p["image_id"] for p in data.query(images[which], k=5)["paintings"]]
        if kind == 1:
            return [p["image_id"] for p in data.neighbours(ids[which], k=5)["paintings"]]
        return [p["image_id"] for p in data.like(ids[:1 + which], k=5)]

    alone = [ask(n) for n in range(9)]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, list(range(9)) * 4))
    assert together == alone * 4
    assert alone[0][0] == catalog["image_id"].iat[0]
    assert len({tuple(a) for a in alone}) > len(alone) // 2
