"""How long the explorer takes on a run, in headless Chromium and under load; screenshots.

    .venv/bin/python benchmarks/bench_app.py --run data/runs/wikiart-pd [--shots docs]
        [--parts views,load] [--uploads 50] [--pages 200] [--out FILE]
    .venv/bin/python benchmarks/bench_app.py --run data/runs/wikiart-pd --soak
        [--clients 50] [--duration 300] [--out FILE]

views: the app's start (loading the run), each view from navigation until its content is on
screen (cold: a fresh browser, nothing cached), and an upload of a collection painting from the
file picker until the answer is shown, plus the server's own time for that query. With --shots,
a screenshot of each view as app-<view>.png in that folder.

load: the production server (`python -m dash_app`, waitress) in its own process on loopback, hit
at once by `--uploads` concurrent uploads of collection paintings and `--pages` page loads (the
page and its rendered layout, for as many different paintings): every answer must be correct and
its own (an upload's nearest painting is the uploaded painting; a painting's page shows that
painting), none lost. Writes p50 / p95 latency and the server's peak memory. The app only reads
the run.

soak (--soak): the production server on loopback under `--clients` concurrent clients for
`--duration` seconds, each looping over a random mix of painting pages, map pages, uploads of
collection paintings, searches, thumbnails and /health (the app has no other API): zero errors
and every answer the client's own, p50 / p95 / p99 per kind of request, and the server's
resident memory sampled over time, with its growth after the first fifth (the warm-up).
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import platform
import random
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--no-first-run", "--window-size=1400,1000", "--hide-scrollbars")
#: Each view, and what shows it is ready.
VIEWS = {"start": ("/", "#home-families .family-tile"),
         "map": ("/map", "#map-graph .legendtext"),
         "clusters": ("/clusters", "#cluster-gallery img"),
         "scores": ("/scores", "#scores-table .ag-row"),
         "upload": ("/upload", ".dropzone")}
#: Seconds any one request of the load test may take before it counts as lost.
REQUEST_TIMEOUT = 300


def browser() -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in FLAGS:
        options.add_argument(flag)
    return webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)


def timed_wait(driver: webdriver.Chrome, css: str, start: float) -> float:
    WebDriverWait(driver, 300).until(lambda d: d.find_elements(By.CSS_SELECTOR, css))
    # Images in view count too: wait until every <img> on the page has loaded.
    WebDriverWait(driver, 300).until(lambda d: d.execute_script(
        "return [...document.images].every(i => i.complete)"))
    return time.perf_counter() - start


def shoot(driver: webdriver.Chrome, path: Path, full: bool = True) -> None:
    """A screenshot of the page; full height when `full` (up to 3000 px)."""
    if full:
        time.sleep(1.0)
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, min(max(height, 1000), 3000))
        time.sleep(1.0)
    driver.save_screenshot(str(path))
    driver.set_window_size(1400, 1000)


def views(args: argparse.Namespace) -> dict:
    """Start, view and upload times in Chromium over an in-process server; screenshots."""
    from dash_app.app import create_app
    from dash_app.data import load_run_data

    start = time.perf_counter()
    data = load_run_data(args.run)
    app = create_app(args.run, data)
    startup = time.perf_counter() - start
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    shots = Path(args.shots) if args.shots else None
    result: dict = {"paintings": len(data.catalog), "features": data.features,
                    "search_features": getattr(data.explorer, "features", None),
                    "startup_s": round(startup, 2), "views_s": {}}
    driver = browser()
    try:
        for name, (path, css) in VIEWS.items():
            start = time.perf_counter()
            driver.get(base + path)
            result["views_s"][name] = round(timed_wait(driver, css, start), 2)
            print(f"{name}: {result['views_s'][name]} s")
            if shots:
                time.sleep(1.5)
                shoot(driver, shots / f"app-{name}.png", full=name != "map")
        first = data.clusterings[data.features[0]].typical["image_id"].iat[0]
        start = time.perf_counter()
        driver.get(f"{base}/painting/{first}")
        result["views_s"]["painting"] = round(
            timed_wait(driver, "#painting-neighbours img", start), 2)
        print(f"painting: {result['views_s']['painting']} s")
        if shots:
            shoot(driver, shots / "app-painting.png")
        result["views_s"]["selection"] = round(select_region(driver, base, data, shots), 2)
        if data.influence is not None:
            result["views_s"].update(influence_views(driver, base, data, shots))
        totals, servers = [], []
        for n in range(args.browser_uploads):
            image_id = data.catalog["image_id"].iat[(n * 997) % len(data.catalog)]
            driver.get(base + "/upload")
            field = WebDriverWait(driver, 60).until(
                lambda d: d.find_elements(By.CSS_SELECTOR, "#upload-image input[type=file]"))[0]
            start = time.perf_counter()
            field.send_keys(str(data.image_file(image_id)))
            text = WebDriverWait(driver, 300).until(lambda d: (
                (t := d.find_elements(By.ID, "upload-time")) and t[0].text))
            timed_wait(driver, "#upload-neighbours img", start)
            totals.append(time.perf_counter() - start)
            servers.append(float(re.search(r"Answered in ([\d.]+) s", text).group(1)))
        if totals:
            result["upload_s"] = {"browser_median": round(statistics.median(totals), 2),
                                  "browser_all": [round(t, 2) for t in totals],
                                  "server_median": round(statistics.median(servers), 2)}
            print(f"upload: {result['upload_s']}")
            if shots:
                shoot(driver, shots / "app-upload.png")
    finally:
        driver.quit()
        server.shutdown()
    return result


def select_region(driver: webdriver.Chrome, base: str, data: object,
                  shots: Path | None) -> float:
    """Lasso the densest cluster's core on the map; seconds until the selection panel shows."""
    features = data.features[0]
    a = data.clusterings[features].assignments
    centre = a.groupby("kmeans")[["umap_x", "umap_y"]].median().iloc[0].to_numpy()
    radius = 0.08 * float(np.ptp(a["umap_x"]))
    angles = np.linspace(0, 2 * np.pi, 12, endpoint=False)
    driver.get(f"{base}/map?colour=style")
    WebDriverWait(driver, 300).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, "#map-graph .legendtext"))
    start = time.perf_counter()
    driver.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        g.emit('plotly_selected', {points: [], lassoPoints: {x: arguments[0], y: arguments[1]}});
        """, list(centre[0] + radius * np.cos(angles)), list(centre[1] + radius * np.sin(angles)))
    seconds = timed_wait(driver, "#selection-gallery img", start)
    print(f"selection: {seconds:.2f} s")
    if shots:
        shoot(driver, shots / "app-selection.png")
    return seconds


def influence_views(driver: webdriver.Chrome, base: str, data: object,
                    shots: Path | None) -> dict[str, float]:
    """The artist page of the artist with most paintings, the graph and the journey."""
    artist = data.influence.artists.sort_values("paintings", kind="stable").iloc[-1]["artist_id"]
    out = {}
    for name, path, css in (("artist", f"/artist/{artist}", "#artist-later :is(.candidate, p)"),
                            ("influence", "/influence", "#graph-figure .legendtext"),
                            ("journey", "/journey", "#journey-figure .js-plotly-plot")):
        start = time.perf_counter()
        driver.get(base + path)
        out[name] = round(timed_wait(driver, css, start), 2)
        print(f"{name}: {out[name]} s")
        if shots:
            time.sleep(1.5)
            shoot(driver, shots / f"app-{name}.png", full=name == "artist")
    return out


# ---------------------------------------------------------------------------------- load test
def cpu_name() -> str:
    """The CPU's model name (Linux), for the record."""
    found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
    return found.group(1).strip() if found else platform.processor()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def callback(session: requests.Session, base: str, outputs: list[tuple[str, str]],
             inputs: list[tuple[str, str, object]]) -> dict:
    """One Dash callback request, as the browser sends it; the JSON answer."""
    output = ("..." if len(outputs) > 1 else "").join(f"{i}.{p}" for i, p in outputs)
    body = {"output": f"..{output}.." if len(outputs) > 1 else output,
            "outputs": [{"id": i, "property": p} for i, p in outputs] if len(outputs) > 1
            else {"id": outputs[0][0], "property": outputs[0][1]},
            "inputs": [{"id": i, "property": p, "value": v} for i, p, v in inputs],
            "changedPropIds": [f"{inputs[0][0]}.{inputs[0][1]}"], "state": []}
    response = session.post(f"{base}/_dash-update-component", json=body,
                            timeout=REQUEST_TIMEOUT)
    response.raise_for_status()
    return response.json()


def upload(base: str, path: Path, own: str) -> tuple[float, bool]:
    """Upload a painting; (seconds, whether the nearest painting is that painting)."""
    contents = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    start = time.perf_counter()
    answer = callback(requests.Session(), base, [("upload-result", "children"),
                                                 ("upload-answer", "data")],
                      [("upload-payload", "data", {"contents": contents, "filename": own})])
    seconds = time.perf_counter() - start
    nearest = answer["response"]["upload-answer"]["data"]["paintings"][0]["image_id"]
    return seconds, nearest == own


def page(base: str, image_id: str) -> tuple[float, bool]:
    """Load a painting's page (HTML, then its layout); (seconds, whether it is that painting)."""
    session = requests.Session()
    start = time.perf_counter()
    session.get(f"{base}/painting/{image_id}", timeout=REQUEST_TIMEOUT).raise_for_status()
    answer = callback(session, base, [("_pages_content", "children"), ("_pages_store", "data")],
                      [("_pages_location", "pathname", f"/painting/{image_id}"),
                       ("_pages_location", "search", "")])
    seconds = time.perf_counter() - start
    text = json.dumps(answer["response"]["_pages_content"]["children"], ensure_ascii=False)
    return seconds, '"painting-title"' in text and f'"/images/{image_id}"' in text


def peak_memory_mb(pid: int) -> float:
    """The process's peak resident memory (VmHWM), MB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024, 1)


def quantiles(values: list[float]) -> dict[str, float]:
    return {"p50_s": round(float(np.percentile(values, 50)), 3),
            "p95_s": round(float(np.percentile(values, 95)), 3),
            "max_s": round(max(values), 3)}


def load(args: argparse.Namespace) -> dict:
    """The production server under concurrent uploads and page loads (see the module doc)."""
    from influence.runs import Run

    run = Run(Path(args.run))
    catalog = run.catalog()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dash_app", "--run", args.run, "--port",
                               str(port), "--threads", str(args.threads)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        start = time.perf_counter()
        while True:
            try:
                health = requests.get(f"{base}/health", timeout=5).json()
                break
            except requests.ConnectionError:
                if server.poll() is not None or time.perf_counter() - start > 600:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        ready = time.perf_counter() - start
        requests.get(base + "/", timeout=60).raise_for_status()
        step = max(1, len(catalog) // max(args.uploads, args.pages))
        rows = [(n * step) % len(catalog) for n in range(max(args.uploads, args.pages))]
        uploads = [(run.image_path(catalog["file"].iat[r]), catalog["image_id"].iat[r])
                   for r in rows[:args.uploads]]
        pages = [catalog["image_id"].iat[r] for r in rows[:args.pages]]
        with ThreadPoolExecutor(args.uploads + args.concurrency) as pool:
            start = time.perf_counter()
            upload_jobs = [pool.submit(upload, base, p, i) for p, i in uploads]
            page_jobs = [pool.submit(page, base, i) for i in pages]
            up = [j.result() for j in upload_jobs]
            pg = [j.result() for j in page_jobs]
            wall = time.perf_counter() - start
        result = {
            "server": f"waitress, {args.threads} threads (python -m dash_app)",
            "startup_s": round(ready, 2), "loaded_memory_mb": health["memory_mb"],
            "uploads": {"count": len(up), "correct": sum(ok for _, ok in up),
                        **quantiles([s for s, _ in up])},
            "pages": {"count": len(pg), "correct": sum(ok for _, ok in pg),
                      "concurrent": args.concurrency, **quantiles([s for s, _ in pg])},
            "wall_s": round(wall, 2), "server_peak_memory_mb": peak_memory_mb(server.pid)}
    finally:
        server.terminate()
        server.wait(30)
    print(f"load: {json.dumps(result)}")
    if result["uploads"]["correct"] != len(up) or result["pages"]["correct"] != len(pg):
        raise SystemExit("load test: some answers were wrong or not their own")
    return result


#: The soak's mix: kind of request and its weight.
SOAK_MIX = {"painting": 4, "map": 1, "upload": 1, "search": 2, "thumbnail": 4, "health": 1}
SAMPLE_SECONDS = 5


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return round(int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024, 1)


def soak_request(kind: str, base: str, session: requests.Session, catalog: object,
                 run: object, rng: random.Random) -> bool:
    """One request of a kind, for a random painting; whether the answer is the client's own."""
    row = rng.randrange(len(catalog))
    image_id = catalog["image_id"].iat[row]
    if kind == "painting":
        return page(base, image_id)[1]
    if kind == "upload":
        return upload(base, run.image_path(catalog["file"].iat[row]), image_id)[1]
    if kind == "thumbnail":
        response = session.get(f"{base}/thumbs/{image_id}.jpg", timeout=REQUEST_TIMEOUT)
        return response.status_code == 200 and response.content[:3] == b"\xff\xd8\xff"
    if kind == "health":
        return session.get(f"{base}/health", timeout=REQUEST_TIMEOUT).json()["status"] == "ok"
    if kind == "map":
        answer = callback(session, base, [("_pages_content", "children"),
                                          ("_pages_store", "data")],
                          [("_pages_location", "pathname", "/map"),
                           ("_pages_location", "search", "?colour=style")])
        return '"map-graph"' in json.dumps(answer)
    title, artist = catalog["title"].iat[row], catalog["artist"].iat[row]
    text = str(title if isinstance(title, str) and title.strip() else artist)
    answer = callback(session, base, [("search-suggestions", "children")],
                      [("search", "value", text)])
    return json.dumps(text, ensure_ascii=False)[1:-1] in json.dumps(answer, ensure_ascii=False)


def soak_client(n: int, base: str, catalog: object, run: object, deadline: float,
                times: dict[str, list[float]], errors: list[str]) -> None:
    """One client: requests of random kinds, one after the other, until the deadline."""
    rng = random.Random(n)
    session = requests.Session()
    kinds, weights = list(SOAK_MIX), list(SOAK_MIX.values())
    while time.perf_counter() < deadline:
        kind = rng.choices(kinds, weights)[0]
        start = time.perf_counter()
        try:
            ok = soak_request(kind, base, session, catalog, run, rng)
        except (requests.RequestException, KeyError, ValueError, IndexError) as e:
            ok = False
            errors.append(f"{kind}: {type(e).__name__}: {str(e)[:120]}")
        else:
            if not ok:
                errors.append(f"{kind}: an answer that was not the client's own")
        times[kind].append(time.perf_counter() - start)


def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, dict, float]:
    """`python -m dash_app` on a free loopback port; (process, base URL, health, seconds)."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "dash_app", "--run", args.run, "--port",
                               str(port), "--threads", str(args.threads)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    start = time.perf_counter()
    while True:
        try:
            return server, base, requests.get(f"{base}/health", timeout=5).json(), \
                time.perf_counter() - start
        except requests.ConnectionError:
            if server.poll() is not None or time.perf_counter() - start > 600:
                raise SystemExit("the server did not start") from None
            time.sleep(0.5)


def soak(args: argparse.Namespace) -> dict:
    """The production server under a mixed load for a while (see the module doc)."""
    from influence.runs import Run

    run = Run(Path(args.run))
    catalog = run.catalog()
    server, base, health, ready = start_server(args)
    times: dict[str, list[float]] = {k: [] for k in SOAK_MIX}
    errors: list[str] = []
    memory: list[tuple[float, float]] = []
    try:
        requests.get(base + "/", timeout=60).raise_for_status()
        start = time.perf_counter()
        deadline = start + args.duration
        clients = [threading.Thread(target=soak_client, args=(n, base, catalog, run, deadline,
                                                              times, errors))
                   for n in range(args.clients)]
        for client in clients:
            client.start()
        while any(c.is_alive() for c in clients):
            memory.append((round(time.perf_counter() - start, 1), resident_mb(server.pid)))
            time.sleep(SAMPLE_SECONDS)
        for client in clients:
            client.join()
        wall = time.perf_counter() - start
        peak = peak_memory_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    warm = [m for t, m in memory if t >= args.duration / 5]
    result = {
        "server": f"waitress, {args.threads} threads (python -m dash_app)",
        "clients": args.clients, "duration_s": args.duration, "wall_s": round(wall, 1),
        "startup_s": round(ready, 2), "loaded_memory_mb": health["memory_mb"],
        "requests": sum(len(t) for t in times.values()), "errors": len(errors),
        "first_errors": errors[:10],
        "kinds": {k: {"count": len(t), **soak_quantiles(t)} for k, t in times.items() if t},
        "memory_mb": {"samples": memory, "peak": peak,
                      "after_warm_up": warm[0] if warm else None,
                      "growth_after_warm_up": round(max(warm) - warm[0], 1) if warm else None}}
    print(f"soak: {json.dumps({k: v for k, v in result.items() if k != 'memory_mb'})}")
    if errors:
        raise SystemExit(f"soak: {len(errors)} errors, e.g. {errors[0]}")
    return result


def soak_quantiles(values: list[float]) -> dict[str, float]:
    return {f"p{q}_s": round(float(np.percentile(values, q)), 3) for q in (50, 95, 99)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--parts", default="views,load", help="views, load or both (default)")
    parser.add_argument("--shots", help="folder for app-<view>.png screenshots")
    parser.add_argument("--browser-uploads", type=int, default=5,
                        help="uploads timed in the browser")
    parser.add_argument("--uploads", type=int, default=50, help="concurrent uploads (load)")
    parser.add_argument("--pages", type=int, default=200, help="page loads (load)")
    parser.add_argument("--concurrency", type=int, default=16,
                        help="page loads in flight at once beside the uploads (load)")
    parser.add_argument("--threads", type=int, default=8,
                        help="the server's threads (load, soak)")
    parser.add_argument("--soak", action="store_true",
                        help="only the soak: --clients clients for --duration seconds")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (soak)")
    parser.add_argument("--duration", type=float, default=300, help="seconds (soak)")
    parser.add_argument("--out", help="the JSON record (default benchmarks/results/app.json, "
                                      "app-soak.json for --soak)")
    args = parser.parse_args()
    parts = {"soak"} if args.soak else {p.strip() for p in args.parts.split(",")}
    result: dict = {"run": str(Path(args.run).resolve()), "machine": platform.platform()}
    if "views" in parts:
        result.update(views(args))
    if "load" in parts:
        result["load"] = load(args)
    if "soak" in parts:
        result["cpu"] = cpu_name()
        result["soak"] = soak(args)
    out = Path(args.out or ROOT / "benchmarks" / "results"
               / ("app-soak.json" if args.soak else "app.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
