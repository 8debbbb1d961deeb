"""The explorer app on a small built run: its image routes over HTTP, and every view in a real
headless Chromium (Debian's `chromium` + `chromium-driver`, installed by scripts/install.sh)."""

from __future__ import annotations

import base64
import json
import re
import shutil
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait
from werkzeug.serving import make_server

from dash_app.app import create_app
from dash_app.data import RunData, load_run_data
from dash_app.pages.upload import MAX_BASE64_CHARS, open_upload
from influence.catalog import artist_slug
from influence.commands import cmd_train
from influence.readers import head_paths
from influence.runs import Run, read_json
from tests.conftest import SHARED

FEATURES = "mobilenet_v2"
MULTI = "genre+style"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROME_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--no-first-run", "--window-size=1400,1000")
WAIT = 60
# Dash re-renders a component while a test reads it: look again rather than fail.
RETRY = (StaleElementReferenceException, NoSuchElementException)


# ------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def built(explored_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The explored run with a multi-label head too (genre and style as one tag list)."""
    dest = tmp_path_factory.mktemp("app-run")
    shutil.copytree(explored_run.root, dest, dirs_exist_ok=True)
    assert cmd_train(run=str(dest), target=MULTI, features=FEATURES, drop_small_classes=True,
                     progress=False) == 0
    return Run(dest)


@pytest.fixture(scope="module")
def data(built: Run) -> RunData:
    return load_run_data(built.root)


@pytest.fixture(scope="module")
def app(built: Run, data: RunData):
    return create_app(built.root, data)


@pytest.fixture(scope="module")
def base_url(app) -> Iterator[str]:
    """The app on 127.0.0.1 and a free port, served from a thread."""
    server = make_server("127.0.0.1", 0, app.server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


@pytest.fixture(scope="module")
def downloads(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("downloads")


@pytest.fixture(scope="module")
def browser(downloads: Path) -> Iterator[object]:
    """Headless Chromium driven by selenium, saving downloads into `downloads`."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("chromium / chromium-driver not installed (scripts/install.sh installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.execute_cdp_cmd("Page.setDownloadBehavior", {"behavior": "allow",
                                                        "downloadPath": str(downloads)})
    yield driver
    driver.quit()


def wait_for(browser, css: str, count: int = 1) -> list:
    """The elements matching `css` once at least `count` of them are on the page."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, WAIT, ignored_exceptions=RETRY).until(
        lambda d: (found := d.find_elements(By.CSS_SELECTOR, css)) and len(found) >= count
        and found)


def wait_text(browser, css: str, pattern: str) -> str:
    """The text of the first `css` element once it matches the regular expression."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    def match(d) -> str | bool:
        found = d.find_elements(By.CSS_SELECTOR, css)
        return bool(found) and re.search(pattern, found[0].text) is not None and found[0].text

    return WebDriverWait(browser, WAIT, ignored_exceptions=RETRY).until(match)


def downloaded(folder: Path, pattern: str) -> Path:
    """The finished download whose name matches the glob pattern, once there is exactly one."""

    def done(_) -> Path | bool:
        found = [p for p in folder.glob(pattern) if p.stat().st_size > 0]
        return len(found) == 1 and found[0]

    return WebDriverWait(None, WAIT).until(done)


def map_ids(browser, data: RunData) -> list[str]:
    """Every painting drawn on the map (its traces carry catalog row numbers as customdata)."""
    rows = browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        return g.data.flatMap(t => Array.from(t.customdata || []));""")
    return [data.id_at(r) for r in rows]


def map_thumbs(browser) -> list[str]:
    """The paintings the map draws as thumbnails (its layout images)."""
    return [src.rsplit("/", 1)[1].removesuffix(".jpg") for src in browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        return (g.layout.images || []).map(i => i.source);""")]


def painting_ids(elements: list) -> list[str]:
    return [e.get_attribute("href").rsplit("/", 1)[1] for e in elements]


# --------------------------------------------------------------------------- routes, no browser
def test_thumbnails_are_small_cached_and_addressed_by_id_only(app, data: RunData,
                                                              built: Run) -> None:
    client = app.server.test_client()
    image_id = data.catalog["image_id"].iat[0]
    thumb = client.get(f"/thumbs/{image_id}.jpg")
    assert thumb.status_code == 200
    assert thumb.mimetype == "image/jpeg"
    assert "immutable" in thumb.headers["Cache-Control"]
    assert thumb.data == (built.root / "thumbs" / f"{image_id}.jpg").read_bytes()
    full = client.get(f"/images/{image_id}")
    assert full.data == data.image_file(image_id).read_bytes()
    for bad in ("/thumbs/ffffffffffffffff.jpg", "/images/ffffffffffffffff",
                "/images/..%2Fpaintings.csv", "/plots/pca/elbow.png", f"/plots/{FEATURES}/x.png"):
        response = client.get(bad)
        assert response.status_code == 404 or response.mimetype == "text/html", bad
        assert b"image_id" not in response.data


def test_thumbnail_made_in_memory_when_the_run_has_none(built: Run, data: RunData,
                                                        tmp_path: Path) -> None:
    bare = tmp_path / "run"
    shutil.copytree(built.root, bare, ignore=shutil.ignore_patterns("thumbs", "*.parts"))
    app = create_app(bare, RunData(Run(bare), data.catalog, data.clusterings, None, "none",
                                   None, None))
    response = app.server.test_client().get(f"/thumbs/{data.catalog['image_id'].iat[0]}.jpg")
    assert response.status_code == 200
    assert response.data[:3] == b"\xff\xd8\xff"
    assert not (bare / "thumbs").exists()


def upload_request(client, contents: str, name: str) -> dict:
    """What the browser sends when the upload store changes; returns the rendered answer."""
    body = {"output": "..upload-result.children...upload-answer.data..",
            "outputs": [{"id": "upload-result", "property": "children"},
                        {"id": "upload-answer", "property": "data"}],
            "inputs": [{"id": "upload-payload", "property": "data",
                        "value": {"contents": contents, "filename": name}}],
            "changedPropIds": ["upload-payload.data"], "state": []}
    response = client.post("/_dash-update-component", json=body)
    assert response.status_code == 200
    return response.get_json()


def test_two_simultaneous_uploads_each_get_their_own_answer(app, data: RunData,
                                                            built: Run) -> None:
    rows = [0, 100, 40, 150]

    def ask(row: int) -> str:
        raw = built.image_path(data.catalog["file"].iat[row]).read_bytes()
        answer = upload_request(app.server.test_client(),
                                "data:image/jpeg;base64," + base64.b64encode(raw).decode(),
                                f"../../{row}.jpg")
        return json.dumps(answer)

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, rows * 2))
    for row, answer in zip(rows * 2, answers, strict=True):
        own = data.catalog["image_id"].iat[row]
        first = re.search(r'/painting/([0-9a-f]+)"', answer).group(1)
        assert first == own, f"upload of row {row} answered with another painting"


def test_upload_limits_and_bad_input_answer_with_a_message(app) -> None:
    client = app.server.test_client()
    cases = {
        "data:text/plain;base64," + base64.b64encode(b"hello, not a picture").decode():
            "not an image",
        "data:image/jpeg;base64,%%%not-base64%%%": "could not be read",
        "data:image/jpeg;base64," + base64.b64encode(b"\xff\xd8\xff\xe0" + b"\0" * 64).decode():
            "corrupt|not an image",
        "data:image/jpeg;base64," + "A" * MAX_BASE64_CHARS: "larger than",
    }
    for contents, expected in cases.items():
        text = json.dumps(upload_request(client, contents, "x.jpg"))
        assert re.search(expected, text), (contents[:40], text[:300])
        assert '"upload-error"' in text


# ------------------------------------------------------------------------------ in the browser
def test_map_shows_every_painting_and_opens_one_on_click(browser, base_url: str,
                                                         data: RunData) -> None:
    browser.get(base_url + "/map")
    legend = wait_for(browser, "#map-graph .legendtext")
    counts = [int(re.search(r"\((\d+)\)", e.text).group(1)) for e in legend]
    assert sum(counts) == len(data.catalog)
    a = data.clusterings[FEATURES].assignments
    # The default view spans the 1st to 99th percentile (widened by 8% of it), not every
    # outlier; each family is labelled at its middle with what it holds most often.
    view = browser.execute_script("""
        const l = document.querySelector('#map-graph .js-plotly-plot').layout;
        return [l.xaxis.range, l.yaxis.range, (l.annotations || []).map(n => n.text)];""")
    for axis, got in zip(("umap_x", "umap_y"), view[:2], strict=True):
        low, high = np.percentile(a[axis], [1, 99])
        assert got == pytest.approx([low - 0.08 * (high - low), high + 0.08 * (high - low)],
                                    rel=1e-4)
    profiles = data.clusterings[FEATURES].profiles
    utamaro = profiles[(profiles["method"] == "kmeans") & (profiles["value"] == "Kitagawa Utamaro")]
    family = int(utamaro.sort_values("share").iloc[-1]["cluster"])
    assert len(view[2]) == data.clusterings[FEATURES].summary["k"]
    assert f"family {family}<br>Kitagawa Utamaro" in view[2]
    assert any(f"family {family} · Kitagawa Utamaro" in e.text for e in legend)
    # 180 paintings are few enough to be drawn as thumbnails; zoomed in, only those in view.
    assert sorted(map_thumbs(browser)) == sorted(data.catalog["image_id"])
    a = data.clusterings[FEATURES].assignments
    x0, x1 = (float(v) for v in np.quantile(a["umap_x"], [0.2, 0.6]))
    y0, y1 = (float(v) for v in np.quantile(a["umap_y"], [0.2, 0.6]))
    in_view = a["image_id"][a["umap_x"].between(x0, x1) & a["umap_y"].between(y0, y1)]
    assert 0 < len(in_view) < len(a)
    browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        Plotly.relayout(g, {'xaxis.range[0]': arguments[0], 'xaxis.range[1]': arguments[1],
                            'yaxis.range[0]': arguments[2], 'yaxis.range[1]': arguments[3]});
        """, x0, x1, y0, y1)
    WebDriverWait(browser, WAIT).until(lambda d: len(map_thumbs(d)) == len(in_view))
    assert sorted(map_thumbs(browser)) == sorted(in_view)
    image_id = data.id_at(browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        const point = {curveNumber: 0, pointNumber: 0, customdata: g.data[0].customdata[0],
                       x: g.data[0].x[0], y: g.data[0].y[0],
                       bbox: {x0: 300, x1: 305, y0: 300, y1: 305}};
        g.emit('plotly_hover', {points: [point]});
        return point.customdata;"""))
    assert image_id is not None
    tip = wait_for(browser, ".tooltip-thumb")[0]
    assert tip.get_attribute("src").endswith(f"/thumbs/{image_id}.jpg")
    # The card is drawn beside the point (the box is relative to the chart), not a controls'
    # height above it.
    chart_box, card = browser.execute_script("""
        return [document.querySelector('#map-graph').getBoundingClientRect(),
                document.querySelector('#map-tooltip').getBoundingClientRect()];""")
    point_y = chart_box["top"] + 302.5
    assert card["top"] - 2 <= point_y <= card["bottom"] + 2, (chart_box, card)
    assert chart_box["left"] + 305 <= card["left"] <= chart_box["left"] + 340, (chart_box, card)
    browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        g.emit('plotly_click', {points: [{curveNumber: 0, pointNumber: 0,
                                          customdata: g.data[0].customdata[0]}]});""")
    title = wait_for(browser, "#painting-title")[0]
    assert browser.current_url.endswith(f"/painting/{image_id}")
    assert title.text == data.painting(image_id)["title"]


def test_clusters_gallery_leads_to_a_painting_with_its_neighbours(
        browser, base_url: str, data: RunData) -> None:
    clustering = data.clusterings[FEATURES]
    browser.get(base_url + "/clusters")
    tiles = wait_for(browser, ".cluster-tile", clustering.summary["k"])
    assert len(tiles) == clustering.summary["k"]
    last = int(re.search(r"Family (\d+)", tiles[-1].text).group(1))
    tiles[-1].click()
    wait_text(browser, "#cluster-title", rf"^Family {last}: ")
    typical = clustering.typical
    expected = typical[(typical["method"] == "kmeans") & (typical["cluster"] == last)]
    shown = painting_ids(wait_for(browser, "#cluster-gallery a"))
    assert shown == list(expected.sort_values("rank")["image_id"][:len(shown)])
    assert len(wait_for(browser, ".chart-grid .js-plotly-plot", 5)) == 5
    browser.find_element("css selector", "#cluster-gallery a").click()
    wait_for(browser, "#painting-title")
    assert browser.current_url.endswith(f"/painting/{shown[0]}")
    neighbours = painting_ids(wait_for(browser, "#painting-neighbours a"))
    assert len(neighbours) == 12
    assert shown[0] not in neighbours
    assert neighbours == [p["image_id"] for p in
                          data.explorer.neighbours_of(shown[0], k=12)["paintings"]]
    wait_for(browser, "#painting-responsibilities .js-plotly-plot")
    artists = data.explorer.neighbours_of(shown[0], k=12)["artists"][:10]
    links = wait_for(browser, "#painting-artists-links a", len(artists))
    assert [a.get_attribute("href").split("/artist/")[1] for a in links] == \
        [a["artist_id"] for a in artists]
    # The heads' predictions, the artist's page, and the painting on the map.
    predicted = data.explorer.neighbours_of(shown[0], k=12)["predictions"]
    assert set(predicted) == {"style", "artist", MULTI}
    for target, labels in predicted.items():
        if target == MULTI:
            continue
        bars = WebDriverWait(browser, WAIT).until(lambda d, t=target: d.execute_script(
            "const g = document.querySelector('#painting-predict-' + arguments[0] "
            "+ ' .js-plotly-plot'); return g && g.data && g.data[0].y;", t))
        assert bars[::-1] == [p["label"] for p in labels]
    row = data.painting(shown[0])
    artist = wait_for(browser, "#painting-artist")[0]
    assert artist.text == row["artist"]
    assert artist.get_attribute("href").endswith(f"/artist/{artist_slug(row['artist'])}")
    wait_for(browser, "#painting-on-map")[0].click()
    star = WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        const t = g && g.data && g.data.find(t => t.name === 'this painting');
        return t && [t.x[0], t.y[0], g.layout.xaxis.range, g.layout.yaxis.range];"""))
    a = data.clusterings[FEATURES].assignments.set_index("image_id").loc[shown[0]]
    assert star[:2] == pytest.approx([a["umap_x"], a["umap_y"]], rel=1e-5)
    for centre, (low, high) in zip(star[:2], star[2:], strict=True):
        assert low < centre < high
        assert centre == pytest.approx((low + high) / 2, rel=1e-4)
    assert f"focus={shown[0]}" in browser.current_url


def test_upload_in_the_page_finds_the_painting_itself(browser, base_url: str, data: RunData,
                                                      built: Run, downloads: Path) -> None:
    row = 42
    path = built.image_path(data.catalog["file"].iat[row])
    browser.get(base_url + "/upload")
    wait_for(browser, "#upload-image input[type=file]")[0].send_keys(str(path))
    timing = wait_text(browser, "#upload-time", r"Answered in [\d.]+ s")
    assert float(re.search(r"Answered in ([\d.]+) s", timing).group(1)) < 60
    nearest = painting_ids(wait_for(browser, "#upload-neighbours a"))
    assert nearest[0] == data.catalog["image_id"].iat[row]
    wait_for(browser, "#upload-predict-style .js-plotly-plot")
    wait_for(browser, "#upload-artists .js-plotly-plot")
    # The multi-label head lists its labels above their thresholds (the page's own decoding).
    raw = "data:image/jpeg;base64," + base64.b64encode(path.read_bytes()).decode()
    above = data.query(open_upload(raw))["predictions"][MULTI]
    assert all(p["p"] >= p["threshold"] for p in above)
    shown = wait_for(browser, "#upload-predict-genre\\+style")[0]
    if above:
        bars = WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("""
            const g = document.querySelector('#upload-predict-genre\\\\+style .js-plotly-plot');
            return g && g.data && g.data[0].y;"""))
        assert bars[::-1] == [p["label"] for p in above]
    else:
        assert "No label is above its threshold" in shown.text
    # The upload is the painting itself: the map's projection places it where the painting is.
    landed = WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("""
        const g = document.querySelector('#upload-map .js-plotly-plot');
        const t = g && g.data && g.data.find(t => t.name === 'your image');
        return t && [t.x[0], t.y[0], g.layout.images.slice(-1)[0].source.slice(0, 23)];"""))
    a = data.clusterings[FEATURES].assignments
    own = a.iloc[row]
    span = max(np.ptp(a["umap_x"]), np.ptp(a["umap_y"]))
    assert np.hypot(landed[0] - own["umap_x"], landed[1] - own["umap_y"]) < 0.15 * span
    assert landed[2] == "data:image/jpeg;base64,"
    assert "at=" in wait_for(browser, "#upload-map-link")[0].get_attribute("href")
    wait_for(browser, "#upload-parquet")[0].click()
    table = pd.read_parquet(downloaded(downloads, f"*_similar-to-{Path(path).stem}_*.parquet"))
    assert list(table["image_id"]) == nearest
    assert list(table["rank"]) == list(range(1, 13))
    assert table["similarity"].is_monotonic_decreasing


def test_upload_of_a_non_image_says_so_in_the_page(browser, base_url: str,
                                                   tmp_path: Path) -> None:
    fake = tmp_path / "holiday.jpg"
    fake.write_bytes(b"this is a text file wearing a .jpg name\n" * 10)
    browser.get(base_url + "/upload")
    wait_for(browser, "#upload-image input[type=file]")[0].send_keys(str(fake))
    assert "not an image" in wait_text(browser, "#upload-error", "not an image")


def test_scores_table_and_sweep_plots(browser, base_url: str, data: RunData) -> None:
    browser.get(base_url + "/scores")
    rows = wait_for(browser, "#scores-table .ag-center-cols-container .ag-row",
                    len(data.comparison))
    assert len(rows) == len(data.comparison)              # one per (features, method)
    assert len(wait_for(browser, "#heads-table .ag-center-cols-container .ag-row", 3)) == 3
    plots = wait_for(browser, "img.score-plot", 2)
    assert all(browser.execute_script("return arguments[0].naturalWidth", p) > 0 for p in plots)
    assert "Weights: file mobilenet_v2_imagenet_features.pth" in wait_text(
        browser, "main", "Weights: ")


def click_cell(browser, x: str, y: str) -> None:
    """A click on the heads page's confusion matrix cell (x, y), as Plotly reports one, once
    the matrix is drawn."""
    WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("""
        const g = document.querySelector('#heads-confusion .js-plotly-plot');
        if (!g || !g.emit || !g.data) { return false; }
        g.emit('plotly_click', {points: [{curveNumber: 0, x: arguments[0], y: arguments[1]}]});
        return true;""", x, y))


def test_head_page_metrics_confusion_cells_losses_and_thresholds(
        browser, base_url: str, built: Run) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from sklearn.metrics import precision_score, recall_score

    catalog = built.catalog().set_index("image_id")
    paths = head_paths(built, "style", FEATURES)
    info = read_json(paths["json"])
    browser.get(base_url + f"/heads?target=style&features={FEATURES}")
    tiles = [t.text for t in wait_for(browser, "#heads-metrics .metric", 6)]
    assert tiles[0] == f"{info['accuracy']:.1%}\naccuracy"
    assert tiles[3] == f"{info['macro_f1']:.1%}\nmacro F1"
    rows = wait_for(browser, "#heads-per-class .ag-center-cols-container .ag-row",
                    len(info["classes"]))
    assert len(rows) == len(info["classes"])
    # A cell's paintings: the held-out ones of that true style the stored probabilities put
    # in that predicted style (recomputed here from the stored test predictions).
    test = pd.read_parquet(paths["test"])
    truth = catalog.loc[test["image_id"], "style"].to_numpy()
    predicted = test[info["classes"]].idxmax(axis=1).to_numpy()
    pairs = pd.Series(list(zip(truth, predicted, strict=True))).value_counts()
    off = [pair for pair in pairs.index if pair[0] != pair[1]]
    true, guess = off[0] if off else pairs.index[0]
    expected = set(test["image_id"][(truth == true) & (predicted == guess)])
    stored = pd.read_csv(paths["confusion"], index_col=0)
    assert stored.loc[true, guess] == len(expected) > 0
    click_cell(browser, guess, true)
    wait_text(browser, "#heads-cell-title", rf"^True {re.escape(true)}, predicted "
              rf"{re.escape(guess)}: {len(expected)} held-out painting")
    assert set(painting_ids(wait_for(browser, "#heads-cell-gallery a", len(expected)))) == \
        expected
    wrong = pd.read_csv(paths["wrong"])
    assert painting_ids(wait_for(browser, "#heads-wrong a", min(len(wrong), 24))) == \
        list(wrong["image_id"][:24])
    # The multi-label head: its missed paintings of a label, and the threshold sliders.
    paths = head_paths(built, MULTI, FEATURES)
    info = read_json(paths["json"])
    test = pd.read_parquet(paths["test"])
    tags = [{v for v in catalog.loc[i, ["genre", "style"]] if not pd.isna(v)}
            for i in test["image_id"]]
    browser.get(base_url + "/heads?target=genre%2Bstyle&features=" + FEATURES)
    sliders = wait_for(browser, "#heads-thresholds .threshold-row", len(info["classes"]))
    label = next(c for c in info["classes"]
                 if info["pr_curves"][c] and len(info["pr_curves"][c]["threshold"]) >= 4)
    j = info["classes"].index(label)
    missed = {i for i, t, p in zip(test["image_id"], tags, test[label], strict=True)
              if label in t and p < info["thresholds"][label]}
    click_cell(browser, "missed (false negative)", label)
    wait_text(browser, "#heads-cell-title", rf"^{re.escape(label)}: missed .*: "
              rf"{len(missed)} held-out painting")
    if missed:
        assert set(painting_ids(wait_for(browser, "#heads-cell-gallery a", len(missed)))) == \
            missed
    row = sliders[j]
    assert row.find_element(By.CSS_SELECTOR, ".threshold-label").text == label
    chosen = info["per_label"][j]
    readout = row.find_element(By.CSS_SELECTOR, ".threshold-readout")
    assert readout.text == (f"at {info['thresholds'][label]:.3f}: precision "
                            f"{chosen['precision']:.2f} · recall {chosen['recall']:.2f}")
    # Halfway between two stored thresholds the readout is what scikit-learn computes there.
    curve = info["pr_curves"][label]["threshold"]
    gap = int(np.argmax(np.diff(curve)))
    at = round((curve[gap] + curve[gap + 1]) / 2, 3)
    assert curve[gap] < at < curve[gap + 1]
    truth = np.array([label in t for t in tags])
    given = test[label].to_numpy() >= at
    box = row.find_element(By.CSS_SELECTOR, "input")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(str(at), Keys.ENTER)
    wait_text(browser, f"#heads-thresholds .threshold-row:nth-child({j + 1}) .threshold-readout",
              rf"^at {at:.3f}: precision {precision_score(truth, given):.2f} · recall "
              rf"{recall_score(truth, given):.2f}$")


def test_a_run_with_only_features_says_what_to_run(small_run: Run) -> None:
    client = create_app(small_run.root).server.test_client()
    for path, stage in (("/", "cluster"), ("/clusters", "cluster"), ("/upload", "index"),
                        ("/scores", "cluster"), ("/heads", "train"),
                        (f"/painting/{'0' * 16}", "no painting"),
                        ("/artist/claude-monet", "influence"), ("/influence", "influence"),
                        ("/journey", "influence"), ("/nowhere", "No page here"),
                        ("/map", "cluster")):
        body = {"output": ".._pages_content.children..._pages_store.data..",
                "outputs": [{"id": "_pages_content", "property": "children"},
                            {"id": "_pages_store", "property": "data"}],
                "inputs": [{"id": "_pages_location", "property": "pathname", "value": path},
                           {"id": "_pages_location", "property": "search", "value": ""}],
                "changedPropIds": ["_pages_location.pathname"], "state": []}
        response = client.post("/_dash-update-component", json=body)
        assert response.status_code == 200, path
        assert stage in response.get_data(as_text=True), path
        assert str(small_run.root) not in json.dumps(response.get_json()), path


def test_lasso_selection_lists_exports_and_reopens_from_its_link(
        browser, base_url: str, data: RunData, downloads: Path) -> None:
    a = data.clusterings[FEATURES].assignments
    x, y = a["umap_x"].to_numpy(), a["umap_y"].to_numpy()
    # Edges halfway between neighbouring points, so no point lies near the outline.
    xs, ys = np.sort(x), np.sort(y)
    x0, x1 = float(xs[0]) - 0.01, float(xs[71] + xs[72]) / 2
    y0, y1 = float(ys[0]) - 0.01, float(ys[125] + ys[126]) / 2
    inside = (x >= x0) & (x <= x1) & (y >= y0) & (y <= y1)
    expected = set(a["image_id"][inside])
    assert 0 < len(expected) < len(a)
    browser.get(base_url + "/map?colour=style")
    wait_for(browser, "#map-graph .legendtext")
    browser.execute_script("""
        const g = document.querySelector('#map-graph .js-plotly-plot');
        g.emit('plotly_selected', {points: [], lassoPoints: {x: arguments[0], y: arguments[1]}});
        """, [x0, x1, x1, x0], [y0, y0, y1, y1])
    wait_text(browser, "#selection-title", rf"^Selection: {len(expected)} paintings$")
    shown = painting_ids(wait_for(browser, "#selection-gallery a"))
    assert len(shown) == min(48, len(expected))
    assert set(shown) <= expected
    like = painting_ids(wait_for(browser, "#selection-like a"))
    assert len(like) == 12
    assert not set(like) & expected
    wait_for(browser, "#selection-csv")[0].click()
    table = pd.read_csv(downloaded(downloads, "*_mobilenet-v2-map-selection-*.csv"))
    assert len(table) == len(expected)
    assert set(table["image_id"]) == expected
    assert {"title", "artist", "style", "year"} <= set(table.columns)
    # The address bar now carries the view: opening it again shows the same selection.
    link = browser.current_url
    assert "lasso=" in link
    assert "colour=style" in link
    browser.get(base_url + "/clusters")
    wait_for(browser, ".cluster-tile")
    browser.get(link)
    wait_text(browser, "#selection-title", rf"^Selection: {len(expected)} paintings$")
    legend = " ".join(e.text for e in wait_for(browser, "#map-graph .legendtext"))
    assert "Baroque" in legend
    assert "family" not in legend


def test_a_filter_leaves_only_matching_points(browser, base_url: str, data: RunData) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/map")
    wait_for(browser, "#map-graph .legendtext")
    assert sorted(map_ids(browser, data)) == sorted(data.catalog["image_id"])
    browser.find_element(By.CSS_SELECTOR, "#map-style").click()
    wait_for(browser, "label.dash-dropdown-option input[value='Baroque']")[0].click()
    baroque = set(data.catalog["image_id"][data.catalog["style"] == "Baroque"])
    wait_text(browser, "#map-count", rf"^{len(baroque)} of {len(data.catalog)} paintings$")
    WebDriverWait(browser, WAIT).until(lambda d: len(map_ids(d, data)) == len(baroque))
    assert set(map_ids(browser, data)) == baroque
    assert "style=Baroque" in browser.current_url


def test_search_finds_a_painting_by_title(browser, base_url: str, data: RunData) -> None:
    titles = data.catalog["title"].dropna()
    title = titles[~titles.duplicated(keep=False)].iloc[20]
    image_id = data.catalog.loc[titles.index[titles == title][0], "image_id"]
    browser.get(base_url + "/scores")
    box = wait_for(browser, "#search")[0]
    box.send_keys(title[1:-1].lower())
    hit = wait_for(browser, f".search-hit.painting[href='/painting/{image_id}']")[0]
    assert hit.text.startswith(title)
    hit.click()
    wait_text(browser, "#painting-title", "^" + re.escape(title) + "$")
    assert browser.current_url.endswith(f"/painting/{image_id}")


def test_search_by_keyboard_moves_opens_and_closes(browser, base_url: str,
                                                   data: RunData) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    def shown() -> bool:
        found = browser.find_elements(By.CSS_SELECTOR, "#search-suggestions")
        return bool(found) and found[0].is_displayed()

    def active() -> list[str]:
        return [h.get_attribute("href") for h in
                browser.find_elements(By.CSS_SELECTOR, ".search-hit.active")]

    browser.get(base_url + "/scores")
    box = wait_for(browser, "#search")[0]
    box.send_keys("portrait")
    hits = [h.get_attribute("href") for h in wait_for(browser, ".search-hit", 3)]
    box.send_keys(Keys.ARROW_DOWN)
    assert active() == hits[:1]
    box.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN)
    assert active() == hits[2:3]
    box.send_keys(Keys.ARROW_UP)
    assert active() == hits[1:2]
    box.send_keys(Keys.ESCAPE)
    WebDriverWait(browser, WAIT).until(lambda _: not shown())
    box.send_keys("q")                                       # typing opens them again
    wait_for(browser, ".search-none")
    assert shown()
    browser.find_element(By.CSS_SELECTOR, "h1").click()      # a click outside closes them
    WebDriverWait(browser, WAIT).until(lambda _: not shown())
    box.send_keys(Keys.BACKSPACE)
    assert [h.get_attribute("href") for h in wait_for(browser, ".search-hit", 3)] == hits
    assert shown()
    box.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN, Keys.ENTER)   # opens the highlighted one
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url == hits[1])
    box = wait_for(browser, "#search")[0]
    WebDriverWait(browser, WAIT).until(lambda _: box.get_attribute("value") == "")
    box.send_keys("sisley", Keys.ENTER)                      # Enter at once: the first match
    first = data.search("sisley", 12)[0]
    assert first["kind"] == "artist"
    WebDriverWait(browser, WAIT).until(lambda d: d.current_url.endswith(
        f"/artist/{artist_slug(first['value'])}"))
    wait_text(browser, "#artist-name", "^Alfred Sisley$")


def test_health_says_the_run_is_loaded(app, data: RunData) -> None:
    health = app.server.test_client().get("/health").get_json()
    assert health["status"] == "ok"
    assert health["paintings"] == len(data.catalog)
    assert health["search"] == FEATURES
    memory = health["memory_mb"]
    assert memory["peak"] >= memory["loaded"] > memory["before_load"] > 0
    assert memory["rss"] > 0


def test_artist_page_lists_look_alikes_with_their_painting_pairs(
        browser, base_url: str, data: RunData) -> None:
    inf = data.influence
    browser.get(base_url + "/artist/alfred-sisley")
    assert wait_text(browser, "#artist-name", "Sisley") == "Alfred Sisley"
    own = set(data.catalog["image_id"][data.catalog["artist"] == "Alfred Sisley"])
    shown = painting_ids(wait_for(browser, "#artist-paintings a", 24))
    assert len(shown) == 24
    assert set(shown) <= own
    earlier = inf.earlier("Alfred Sisley", 5)
    later = inf.later("Alfred Sisley", 5)
    assert len(earlier)
    assert len(later)
    for css, pairs, other in (("#artist-earlier", earlier, "influenced_by"),
                              ("#artist-later", later, "artist")):
        cards = wait_for(browser, f"{css} .candidate", len(pairs))
        assert [c.find_element("css selector", ".candidate-name").text for c in cards] == \
            list(pairs[other])
        evidence = pairs.iloc[0]["evidence"]
        first = painting_ids(cards[0].find_elements("css selector", ".evidence-pair a"))
        assert first == [i for e in evidence for i in (e["influenced_by_image_id"],
                                                      e["image_id"])]
    recorded = wait_for(browser, "#artist-earlier .candidate")
    marked = [c.find_element("css selector", ".candidate-name").text for c in recorded
              if "recorded influence" in c.text]
    assert marked == list(earlier[earlier["recorded"]]["influenced_by"]) == ["Claude Monet"]
    wait_for(browser, "#artist-earlier .candidate-name")[0].click()
    wait_text(browser, "#artist-name", "^" + re.escape(earlier.iloc[0]["influenced_by"]) + "$")


def test_influence_graph_opens_an_artist_and_the_journey_a_family(
        browser, base_url: str, data: RunData) -> None:
    inf = data.influence
    browser.get(base_url + "/influence")
    wait_for(browser, "#graph-figure .legendtext")
    drawn = browser.execute_script("""
        const g = document.querySelector('#graph-figure .js-plotly-plot');
        return g.data.filter(t => t.mode === 'markers+text')
                     .flatMap(t => Array.from(t.customdata));""")
    assert sorted(drawn) == sorted(inf.artists.dropna(subset=["active_mid"])["artist_id"])
    browser.execute_script("""
        const g = document.querySelector('#graph-figure .js-plotly-plot');
        g.emit('plotly_click', {points: [{curveNumber: 0, pointNumber: 0,
                                          customdata: 'rembrandt'}]});""")
    assert wait_text(browser, "#artist-name", "Rembrandt") == "Rembrandt"
    assert browser.current_url.endswith("/artist/rembrandt")
    browser.get(base_url + "/journey")
    wait_for(browser, "#journey-figure .js-plotly-plot")
    rows = WebDriverWait(browser, WAIT).until(lambda d: d.execute_script("""
        const g = document.querySelector('#journey-figure .js-plotly-plot');
        return g && g.data && g.data.length && g.data[0].y;"""))
    families = sorted(inf.flows["family"].unique())
    assert rows == [f"family {f}" for f in families]
    browser.execute_script("""
        const g = document.querySelector('#journey-figure .js-plotly-plot');
        g.emit('plotly_click', {points: [{curveNumber: 0, x: g.data[0].x[0],
                                          y: g.data[0].y[1]}]});""")
    wait_text(browser, "#cluster-title", rf"^Family {families[1]}: ")
    assert f"cluster={families[1]}" in browser.current_url


# ------------------------------------------------------------- the explorer as a curator meets it
#: Colour contrast (WCAG AA: 4.5:1, 3:1 for large text) of every visible text: its colour over
#: the first opaque background behind it (Plotly's SVG text is left out).
CONTRAST = """
const lum = c => { const [r, g, b] = c.map(v => { v /= 255; return v <= 0.03928 ? v / 12.92
                   : Math.pow((v + 0.055) / 1.055, 2.4); });
                   return 0.2126 * r + 0.7152 * g + 0.0722 * b; };
const rgba = s => { const m = (s.match(/[\\d.]+/g) || [0, 0, 0, 0]).map(Number);
                    const k = s.startsWith('color(') ? 255 : 1;
                    return [m[0] * k, m[1] * k, m[2] * k, m.length > 3 ? m[3] : 1]; };
const behind = el => { for (let e = el; e; e = e.parentElement) {
    const c = rgba(getComputedStyle(e).backgroundColor); if (c[3] > 0.5) { return c; } }
    return [255, 255, 255, 1]; };
const low = [];
for (const el of document.querySelectorAll('body *')) {
  if (el.closest('svg')) { continue; }
  if (!Array.from(el.childNodes).some(n => n.nodeType === 3 && n.textContent.trim())) { continue; }
  const box = el.getBoundingClientRect(), st = getComputedStyle(el);
  if (!box.width || !box.height || st.visibility === 'hidden') { continue; }
  const fg = rgba(st.color), bg = behind(el);
  const mixed = fg.slice(0, 3).map((v, i) => v * fg[3] + bg[i] * (1 - fg[3]));
  const [a, b] = [lum(mixed), lum(bg.slice(0, 3))];
  const ratio = (Math.max(a, b) + 0.05) / (Math.min(a, b) + 0.05);
  const size = parseFloat(st.fontSize), bold = Number(st.fontWeight) >= 700;
  if (ratio < ((size >= 24 || (size >= 18.66 && bold)) ? 3 : 4.5)) {
    low.push(`${el.tagName}.${el.className} '${el.textContent.trim().slice(0, 30)}' ` +
             `${ratio.toFixed(2)}:1`);
  }
}
return low;"""
#: Form fields without an accessible name, images without alt text.
UNLABELLED = """
return [Array.from(document.querySelectorAll('input, select, textarea')).filter(
          i => i.type !== 'hidden' && !(i.labels && i.labels.length)
               && !i.getAttribute('aria-label') && !i.getAttribute('aria-labelledby'))
          .map(i => i.outerHTML.slice(0, 100)),
        Array.from(document.images).filter(i => !i.hasAttribute('alt')).map(i => i.src)];"""


def page_urls(data: RunData) -> dict[str, str]:
    """One address of every page, and what shows that page is drawn."""
    painting = data.catalog["image_id"].iat[42]
    return {"/": "#home-families .family-tile", "/map": "#map-graph .legendtext",
            "/clusters?method=gmm": "#cluster-gallery a", f"/painting/{painting}":
            "#painting-neighbours a", "/artist/rembrandt": "#artist-paintings a",
            "/compare": "#compare-pairs .evidence-pair", "/influence": "#graph-figure .legendtext",
            "/journey": "#journey-figure .js-plotly-plot", "/upload": "#upload-image input",
            "/scores": "#scores-table .ag-row", "/review": "h1", "/nowhere": "#not-found"}


def test_wrong_addresses_answer_404_with_a_page_that_helps(app, data: RunData) -> None:
    client = app.server.test_client()
    painting = data.catalog["image_id"].iat[0]
    fine = ["/", "/map", f"/map?features={FEATURES}&colour=style", f"/map?focus={painting}",
            "/clusters?method=gmm&cluster=1", f"/painting/{painting}", "/artist/rembrandt",
            "/compare?a=rembrandt&b=claude-monet", "/influence", "/upload", "/health",
            f"/thumbs/{painting}.jpg", "/map?data=1"]
    wrong = ["/nowhere", "/map/extra", "/map?features=nope", "/map?focus=ffffffffffffffff",
             "/map?at=1,x", "/clusters?cluster=99", "/clusters?method=dbscan",
             "/clusters?features=nope", "/painting/ffffffffffffffff",
             f"/painting/{painting}?features=nope", "/artist/nobody", "/compare?a=nobody",
             f"/painting/{painting}?image_id=nope"]
    for path in fine:
        assert client.get(path).status_code == 200, path
    for path in wrong:
        response = client.get(path)
        assert response.status_code == 404, path
        assert b"_dash-renderer" in response.data, path       # the app still draws its page


def test_no_page_shows_a_path_on_the_server(app, data: RunData, built: Run) -> None:
    client = app.server.test_client()
    for path in page_urls(data):
        route, _, search = path.partition("?")
        body = {"output": ".._pages_content.children..._pages_store.data..",
                "outputs": [{"id": "_pages_content", "property": "children"},
                            {"id": "_pages_store", "property": "data"}],
                "inputs": [{"id": "_pages_location", "property": "pathname", "value": route},
                           {"id": "_pages_location", "property": "search",
                            "value": "?" + search if search else ""}],
                "changedPropIds": ["_pages_location.pathname"], "state": []}
        # Decoded: Dash's JSON writes "/" as "\\/".
        text = json.dumps(client.post("/_dash-update-component", json=body).get_json())
        for secret in (str(built.root), str(built.root.parent), str(SHARED), str(Path.home())):
            assert secret not in text, (path, secret)


def test_influence_graph_folds_unknown_nationalities_into_other(data: RunData) -> None:
    from dataclasses import replace

    from dash_app.pages.graph import figure

    artists = data.influence.artists.copy()
    artists["nationality"] = artists["nationality"].astype("object")
    artists.loc[artists["artist"] == "Niko Pirosmani", "nationality"] = None
    fig, order = figure(replace(data.influence, artists=artists), "nationality", 2, [])
    bands = list(fig.layout.yaxis.ticktext)
    assert "unknown" not in bands
    assert "unknown" not in order
    assert bands[-1] == order[-1] == "other"
    other = next(t for t in fig.data if t.name.startswith("other"))
    assert list(other.hovertext) == ["Niko Pirosmani"]


def test_start_page_explains_the_collection_and_what_was_found(
        browser, base_url: str, data: RunData) -> None:
    inf = data.influence
    browser.get(base_url + "/")
    counts = wait_text(browser, "#home-counts", "paintings")
    assert counts.startswith(f"{len(data.catalog)} paintings by "
                             f"{data.catalog['artist'].nunique()} artists")
    years = pd.to_numeric(data.catalog["year"], errors="coerce").dropna()
    assert f"from {int(years.min())} to {int(years.max())}" in counts
    clustering = data.clusterings[inf.features]
    tiles = wait_for(browser, "#home-families .family-tile", clustering.summary["k"])
    assert len(tiles) == clustering.summary["k"]
    for tile in tiles:
        image = tile.find_element("css selector", "img")
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 0
        assert re.match(r"Family \d+ · \d+", tile.text)
        assert "/clusters?" in tile.get_attribute("href")
    strongest = inf.strongest(6)
    links = wait_for(browser, "#home-links li", len(strongest))
    assert [li.text.split(":")[0] for li in links] == \
        [f"{b} → {a}" for a, b in zip(strongest["artist"], strongest["influenced_by"],
                                      strict=True)]
    pairs = wait_for(browser, "#home-pairs .evidence-pair", 3)
    first = painting_ids(pairs[0].find_elements("css selector", "a"))
    evidence = strongest.iloc[0]["evidence"][0]
    assert first == [evidence["influenced_by_image_id"], evidence["image_id"]]
    starts = [a.get_attribute("href") for a in wait_for(browser, ".start-links a", 5)]
    assert {f"{base_url}/map", f"{base_url}/clusters", f"{base_url}/influence",
            f"{base_url}/compare", f"{base_url}/upload"} <= set(starts)


def test_wrong_addresses_say_what_is_wrong_in_the_page(browser, base_url: str) -> None:
    browser.get(base_url + "/nowhere")
    assert wait_text(browser, "#not-found", "No page") == "No page here"
    assert len(wait_for(browser, "main .start-links a", 5)) >= 5
    browser.get(base_url + "/map?features=nope")
    note = wait_text(browser, "#address-problem", "nope")
    assert "no feature set 'nope'" in note
    assert FEATURES in note
    wait_for(browser, "#map-graph .legendtext")                 # and the map is there
    browser.get(base_url + "/clusters?cluster=99")
    assert "no family '99'" in wait_text(browser, "#address-problem", "99")


def test_charts_have_no_share_button_and_legends_clear_the_toolbar(
        browser, base_url: str, data: RunData) -> None:
    painting = data.catalog["image_id"].iat[42]
    for path, legend in (("/map", True), ("/influence", True), ("/journey", False),
                         (f"/painting/{painting}", False), ("/compare", False)):
        browser.get(base_url + path)
        wait_for(browser, ".js-plotly-plot .main-svg")
        titles, logos, overlaps = WebDriverWait(browser, WAIT).until(lambda d: d.execute_script(
            """
            const bars = document.querySelectorAll('.modebar');
            if (!document.querySelector('.js-plotly-plot .main-svg .cartesianlayer')) {
                return null; }
            const meet = (a, b) => a.left < b.right && b.left < a.right && a.top < b.bottom
                                   && b.top < a.bottom;
            const overlaps = [];
            for (const bar of bars) {
                const legend = bar.closest('.js-plotly-plot').querySelector('.legend');
                if (legend && meet(bar.getBoundingClientRect(),
                                   legend.getBoundingClientRect())) { overlaps.push(1); }
            }
            return [Array.from(document.querySelectorAll('.modebar-btn'))
                        .map(b => b.getAttribute('data-title')),
                    document.querySelectorAll('.modebar-btn--logo').length, overlaps.length];
            """))
        assert not [t for t in titles if re.search(r"share|cloud|chart studio", t, re.I)], path
        assert logos == 0, path
        assert overlaps == 0, path
        if legend:
            assert titles, path                                  # the toolbar is there


def test_gmm_threshold_box_is_valid_and_only_shown_for_gmm(browser, base_url: str) -> None:
    from selenium.webdriver.common.by import By

    browser.get(base_url + "/clusters?method=gmm")
    box = wait_for(browser, "#clusters-min-p")[0]
    assert box.is_displayed()
    assert browser.execute_script("return arguments[0].checkValidity()", box)
    browser.get(base_url + "/clusters?method=kmeans")
    wait_for(browser, "#cluster-gallery a")
    assert not browser.find_element(By.ID, "clusters-min-p").is_displayed()
    browser.find_element(By.CSS_SELECTOR, "#clusters-method").click()
    wait_for(browser, ".dash-dropdown-option")
    next(o for o in browser.find_elements(By.CSS_SELECTOR, ".dash-dropdown-option")
         if o.text == "GMM").click()
    WebDriverWait(browser, WAIT).until(
        lambda d: d.find_element(By.ID, "clusters-min-p").is_displayed())


def test_compare_two_artists_side_by_side_with_their_closest_pairs(
        browser, base_url: str, data: RunData, built: Run) -> None:
    browser.get(base_url + "/compare?a=claude-monet&b=alfred-sisley")
    for field in ("style", "genre", "nationality", "families"):
        names = WebDriverWait(browser, WAIT).until(lambda d, f=field: d.execute_script(
            "const g = document.querySelector('#compare-' + arguments[0] + ' .js-plotly-plot');"
            "return g && g.data && g.data.map(t => t.name);", f))
        assert names == ["Claude Monet", "Alfred Sisley"], field
    pairs = wait_for(browser, "#compare-pairs .evidence-pair", 6)
    shown = [painting_ids(p.find_elements("css selector", "a")) for p in pairs]
    monet = data.catalog.index[data.catalog["artist"] == "Claude Monet"].to_numpy()
    sisley = data.catalog.index[data.catalog["artist"] == "Alfred Sisley"].to_numpy()
    x = np.asarray(built.features(FEATURES), dtype=np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    sims = x[monet] @ x[sisley].T
    i, j = np.unravel_index(np.argmax(sims), sims.shape)
    ids = data.catalog["image_id"].to_numpy()
    assert shown[0] == [ids[monet[i]], ids[sisley[j]]]
    flat = [i for pair in shown for i in pair]
    assert len(set(flat)) == len(flat)                        # each painting in one pair
    assert {p[0] for p in shown} <= set(ids[monet])
    assert {p[1] for p in shown} <= set(ids[sisley])


def test_influence_graph_names_the_strongest_and_points_earlier_to_later(
        browser, base_url: str, data: RunData) -> None:
    inf = data.influence
    browser.get(base_url + "/influence")
    wait_for(browser, "#graph-figure .legendtext")
    script = """
        const g = document.querySelector('#graph-figure .js-plotly-plot');
        const nodes = {}, named = [];
        for (const t of g.data.filter(t => t.mode === 'markers+text')) {
            t.customdata.forEach((id, n) => { nodes[id] = [t.x[n], t.y[n]];
                                              if (t.text[n]) { named.push(t.hovertext[n]); } });
        }
        const links = [];
        for (const t of g.data.filter(t => t.name === 'links')) {
            for (let n = 0; n + 2 < t.x.length; n += 4) {
                links.push([t.x[n], t.y[n], t.x[n + 2], t.y[n + 2], t.marker.size[n + 1],
                            t.marker.symbol, t.marker.angleref]); }
        }
        return [nodes, named, links];"""
    nodes, named, links = browser.execute_script(script)
    edges = inf.edges(2)
    slug = dict(zip(inf.artists["artist"], inf.artists["artist_id"], strict=True))
    expected = sorted([*nodes[slug[b]], *nodes[slug[a]]] for a, b in
                      zip(edges["artist"], edges["influenced_by"], strict=True))
    assert sorted(link[:4] for link in links) == expected   # from the earlier to the later
    assert all(size > 0 and symbol == "arrow" and ref == "previous"
               for *_, size, symbol, ref in links)
    linked = pd.concat([edges["artist"], edges["influenced_by"]]).value_counts()
    assert set(linked.index[:3]) <= set(named)
    browser.execute_script("""
        const g = document.querySelector('#graph-figure .js-plotly-plot');
        Plotly.relayout(g, {'xaxis.range[0]': 1500, 'xaxis.range[1]': 2000,
                            'yaxis.range[0]': -1, 'yaxis.range[1]': 10});""")
    every = sorted(inf.artists.dropna(subset=["active_mid"])["artist"])
    WebDriverWait(browser, WAIT).until(
        lambda d: sorted(d.execute_script(script)[1]) == every)


def test_pages_fit_narrow_screens_and_meet_accessibility_basics(
        browser, base_url: str, data: RunData) -> None:
    """No horizontal scrolling at 390 and 1024 px; at every width: the language declared, one
    <h1>, labelled fields, alt text, AA contrast, and "family" the one word for the groups.
    (axe-core is not available offline here, so these properties are checked directly.)"""
    urls = page_urls(data)
    medium = {"/", "/map", next(p for p in urls if p.startswith("/painting/"))}
    try:
        for width in (390, 1024, 1400):
            browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
                "width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False})
            for path, ready in urls.items():
                if width == 1024 and path not in medium:
                    continue
                browser.get(base_url + path)
                wait_for(browser, ready)
                wide, inner = browser.execute_script(
                    "return [document.documentElement.scrollWidth, window.innerWidth]")
                assert wide <= inner, (path, width, wide)
                if width != 1400:
                    continue
                assert browser.execute_script("return document.documentElement.lang") == "en"
                assert len(browser.find_elements("css selector", "h1")) == 1, path
                unlabelled, no_alt = browser.execute_script(UNLABELLED)
                assert not unlabelled, (path, unlabelled)
                assert not no_alt, (path, no_alt)
                assert not browser.execute_script(CONTRAST), path
                text = browser.find_element("css selector", "main").text
                assert not re.search(r"\bclusters?\b", text, re.I), (path, text[:300])
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
