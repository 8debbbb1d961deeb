"""How long the explorer takes on a run, measured in headless Chromium; optionally screenshots.

    .venv/bin/python benchmarks/bench_app.py --run data/runs/wikiart-pd [--shots docs] [--out FILE]

Measures the app's start (loading the run), each view from navigation until its content is on
screen (cold: a fresh browser, nothing cached), and an upload of a collection painting from the
file picker until the answer is shown, plus the server's own time for that query. The app only
reads the run. With --shots, saves a screenshot of each view as app-<view>.png in that folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import statistics
import threading
import time
from pathlib import Path

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
VIEWS = {"map": ("/", "#map-graph .legendtext"),
         "clusters": ("/clusters", "#cluster-gallery img"),
         "scores": ("/scores", "#scores-table tbody tr"),
         "upload": ("/upload", ".dropzone")}


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--shots", help="folder for app-<view>.png screenshots")
    parser.add_argument("--uploads", type=int, default=5, help="uploads to time")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "app.json"))
    args = parser.parse_args()
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
    result: dict = {"run": str(Path(args.run).resolve()), "paintings": len(data.catalog),
                    "features": data.features, "search_features": getattr(
                        data.explorer, "features", None), "startup_s": round(startup, 2),
                    "machine": platform.platform(), "views_s": {}}
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
        totals, servers = [], []
        for n in range(args.uploads):
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
        result["upload_s"] = {"browser_median": round(statistics.median(totals), 2),
                              "browser_all": [round(t, 2) for t in totals],
                              "server_median": round(statistics.median(servers), 2)}
        print(f"upload: {result['upload_s']}")
        if shots:
            shoot(driver, shots / "app-upload.png")
    finally:
        driver.quit()
        server.shutdown()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
