"""Screenshots of the explorer for the README: `python scripts/screenshots.py --run RUN_DIR
[--out docs]` serves the app on a free loopback port and saves each page at 1400 px wide
(docs/app-<name>.png) and the start page at 390 px (docs/app-start-390.png), in headless
Chromium."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name: (address, what shows the page is ready).
PAGES = {"start": ("/", "#home-families .family-tile"),
         "map": ("/map", "#map-graph .legendtext"),
         "clusters": ("/clusters", "#cluster-gallery img"),
         "compare": ("/compare", "#compare-pairs .evidence-pair"),
         "artist": ("/artist/claude-monet", "#artist-earlier"),
         "review": ("/review", "#review-content"),
         "influence": ("/influence", "#graph-figure .legendtext"),
         "journey": ("/journey", "#journey-figure .js-plotly-plot"),
         "upload": ("/upload", ".dropzone"),
         "scores": ("/scores", "#scores-table .ag-row")}
NARROW = {"start-390": ("/", "#home-families .family-tile")}
#: Seconds to let images and charts settle once a page's content is there.
SETTLE = 2.0


def shoot(driver: webdriver.Chrome, base: str, pages: dict[str, tuple[str, str]], width: int,
          out: Path) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
    for name, (path, ready) in pages.items():
        driver.get(base + path)
        WebDriverWait(driver, 300).until(lambda d, c=ready: d.find_elements(By.CSS_SELECTOR, c))
        time.sleep(SETTLE)
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": min(height, 2400), "deviceScaleFactor": 1,
            "mobile": False})
        driver.save_screenshot(str(out / f"app-{name}.png"))
        driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": 1000, "deviceScaleFactor": 1, "mobile": False})
        print(out / f"app-{name}.png")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args()
    from dash_app.app import create_app

    server = make_server("127.0.0.1", 0, create_app(args.run).server, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--hide-scrollbars"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    base = f"http://127.0.0.1:{server.server_port}"
    # Chromium's save_screenshot returns False, silently, into a folder that does not exist.
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        shoot(driver, base, PAGES, 1400, out)
        shoot(driver, base, NARROW, 390, out)
    finally:
        driver.quit()
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
