"""The `review` stage on the small slice with problems injected: near-copies (one with another
artist), a byte-identical copy, a swapped style, and two records whose image is no painting."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image, ImageEnhance, ImageOps
from sklearn.model_selection import KFold
from werkzeug.serving import make_server

from influence.commands import cmd_export, cmd_extract, cmd_index, cmd_review, cmd_train
from influence.export import table_bytes
from influence.review import (
    FOLDS,
    Scored,
    combine_views,
    context_agreement,
    fit_labels,
    load_review,
    out_of_fold,
    reduction,
)
from influence.runs import Run
from tests.conftest import MOBILENET
from tests.test_app import browser, downloaded, downloads, painting_ids, wait_for, wait_text

__all__ = ["browser", "downloads"]  # fixtures shared with the app's browser tests

#: (source row, mirrored, crop share, artist changed) of each injected near-copy.
COPIES = [(3, False, 0.03, False), (40, True, 0.05, True), (100, True, 0.0, False)]


def near_copy(path: Path, mirrored: bool, crop: float) -> Image.Image:
    """The picture re-scanned: cropped by a few percent, maybe mirrored, smaller, recoloured."""
    with Image.open(path) as img:
        image = img.convert("RGB")
    w, h = image.size
    dx, dy = int(w * crop), int(h * crop)
    image = image.crop((dx, dy, w - dx // 2, h - dy // 2))
    image = ImageOps.mirror(image) if mirrored else image
    image = image.resize((int(image.width * 0.8), int(image.height * 0.8)))
    return ImageEnhance.Brightness(image).enhance(1.08)


@pytest.fixture(scope="module")
def injected(slice_collection: Path, small_run: Run, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, pd.DataFrame]:
    """The slice with the problems written in: (collection folder, its rows)."""
    dest = tmp_path_factory.mktemp("injected")
    shutil.copytree(slice_collection, dest, dirs_exist_ok=True)
    rows = pd.read_csv(dest / "paintings.csv", dtype=str, keep_default_na=False)
    added = []
    for n, (source, mirrored, crop, changed) in enumerate(COPIES):
        row = rows.iloc[source].to_dict()
        near_copy(dest / row["file"], mirrored, crop).save(dest / f"images/copy-{n}.jpg",
                                                           quality=80)
        other = rows.loc[rows["artist"] != row["artist"], "artist"].iloc[0]
        added.append({**row, "file": f"images/copy-{n}.jpg",
                      "artist": other if changed else row["artist"]})
    shutil.copy(dest / rows.at[7, "file"], dest / "images/identical.jpg")
    added.append({**rows.iloc[7].to_dict(), "file": "images/identical.jpg"})
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(
        dest / "images/noise.png")
    Image.new("RGB", (400, 300), (240, 236, 225)).save(dest / "images/blank.png")
    for name in ("noise", "blank"):
        added.append({**rows.iloc[10].to_dict(), "file": f"images/{name}.png"})
    # A Rembrandt recorded as Ukiyo-e.
    swapped = rows.index[rows["artist"] == "Rembrandt"][5]
    rows.at[swapped, "style"] = "Ukiyo-e"
    rows = pd.concat([rows, pd.DataFrame(added)], ignore_index=True)
    rows.to_csv(dest / "paintings.csv", index=False)
    return dest, rows


@pytest.fixture(scope="module")
def reviewed(injected: tuple[Path, pd.DataFrame], small_run: Run,
             tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A copy of `small_run` over the injected slice (only the new images extracted), indexed,
    with style and artist heads, reviewed."""
    dest = tmp_path_factory.mktemp("review-run")
    shutil.copytree(small_run.root, dest, dirs_exist_ok=True)
    assert cmd_extract(run=str(dest), collection=str(injected[0]), extractors="mobilenet_v2",
                       weights={"mobilenet_v2": str(MOBILENET)}, progress=False) == 0
    assert cmd_index(run=str(dest), features="mobilenet_v2", progress=False) == 0
    # genre leaves some paintings unlabelled: the review must score the others and skip those.
    assert cmd_train(run=str(dest), target="style,artist,genre", features="mobilenet_v2",
                     head="logistic", drop_small_classes=True, progress=False) == 0
    assert cmd_review(run=str(dest), features="mobilenet_v2", progress=False) == 0
    return Run(dest)


def ids_of(run: Run) -> dict[str, str]:
    catalog = run.catalog()
    return dict(zip(catalog["file"], catalog["image_id"], strict=True))


def test_near_copies_are_paired_and_a_changed_artist_comes_first(
        reviewed: Run, injected: tuple[Path, pd.DataFrame]) -> None:
    _, rows = injected
    review = load_review(reviewed)
    ids = ids_of(reviewed)
    pairs = {frozenset(p) for p in zip(review.duplicates["image_id_a"],
                                       review.duplicates["image_id_b"], strict=True)}
    for n, (source, *_) in enumerate(COPIES):
        assert frozenset((ids[f"images/copy-{n}.jpg"], ids[rows.at[source, "file"]])) in pairs
    first = review.duplicates.iloc[0]
    assert first["conflict"]
    assert list(first["conflicts"]) == ["artist"]
    assert {first["image_id_a"], first["image_id_b"]} == {ids["images/copy-1.jpg"],
                                                          ids[rows.at[40, "file"]]}
    assert review.duplicates_of(ids["images/copy-0.jpg"])[0] == ids[rows.at[3, "file"]]
    # Noise and a blank page are nobody's copy.
    assert not {ids["images/noise.png"], ids["images/blank.png"]} & set().union(*pairs)


def test_a_byte_identical_copy_is_still_reported_by_the_catalog(reviewed: Run,
                                                                injected: tuple) -> None:
    _, rows = injected
    rejected = pd.read_csv(reviewed.rejected_path)
    found = rejected[rejected["file"] == "images/identical.jpg"]
    assert len(found) == 1
    assert found["reason"].iat[0] == "duplicate content"
    assert rows.at[7, "file"] in found["detail"].iat[0]


def test_a_swapped_style_ranks_at_the_top_of_the_labels(reviewed: Run, injected: tuple) -> None:
    _, rows = injected
    review = load_review(reviewed)
    swapped = ids_of(reviewed)[rows.loc[rows["style"] == "Ukiyo-e"]
                               .query("artist == 'Rembrandt'")["file"].iat[0]]
    style = review.labels[review.labels["target"] == "style"].reset_index(drop=True)
    assert len(style) == len(reviewed.catalog())
    found = style[style["image_id"] == swapped].iloc[0]
    assert found.name < 5
    assert found["suggested"] == "Baroque"
    assert found["issue"]
    assert found["p_recorded"] < 0.1
    assert found["log_p_recorded"] < np.log(0.1)
    # Its look-alikes' recorded styles are likely, its own is not.
    assert found["log_p_vs_nearest"] < style["log_p_vs_nearest"].quantile(0.02)
    assert found["log_p_recorded"] <= found["log_p_vs_nearest"] < found["log_p_recorded"] + 1
    assert found["neighbour_agreement"] < 0.2
    genre = review.labels[review.labels["target"] == "genre"]
    catalog = reviewed.catalog()
    unlabelled = set(catalog.loc[catalog["genre"].isna(), "image_id"])
    assert unlabelled
    assert 0 < len(genre) <= len(catalog) - len(unlabelled)
    assert not set(genre["image_id"]) & unlabelled
    assert genre["neighbour_agreement"].between(0, 1).all()
    closest = reviewed.catalog().set_index("image_id").loc[found["closest_suggested"]]
    assert closest["style"] == "Baroque"
    assert set(review.labels["target"]) == {"style", "artist", "genre"}
    # Artists are checked against the styles their other paintings are recorded in.
    artist = review.labels[review.labels["target"] == "artist"]
    assert artist["style_agreement"].notna().all()
    assert "style_agreement" not in review.labels[review.labels["target"] == "style"].dropna(
        axis=1, how="all")


def test_the_out_of_fold_probabilities_never_use_a_paintings_own_label(small_run: Run) -> None:
    x = np.asarray(small_run.features("mobilenet_v2"), dtype=np.float32)
    y = small_run.catalog()["artist"].astype("category").cat.codes.to_numpy()
    folds = list(KFold(FOLDS, shuffle=True, random_state=0).split(x))
    before = out_of_fold(x, y, folds)
    changed = y.copy()
    changed[0] = (y[0] + 1) % y.max()
    after = out_of_fold(x, changed, folds)
    np.testing.assert_array_equal(before[0], after[0])
    # The other rows of its fold are also predicted without it; the rest learnt from it.
    others = np.setdiff1d(np.arange(len(y)), next(t for _, t in folds if 0 in t))
    assert not np.array_equal(before[others], after[others])


def test_the_views_heads_never_use_a_paintings_own_label(small_run: Run) -> None:
    # Two views (pca and mobilenet_v2, as a combined set's parts are): the stage's
    # probabilities are each view's out-of-fold ones combined row by row, so a painting's own
    # label still never enters its own, and they differ from either view's alone.
    catalog = small_run.catalog()
    views = [np.asarray(small_run.features(n), dtype=np.float32) for n in ("pca", "mobilenet_v2")]
    scored, _, _ = fit_labels(catalog, ["artist"], views)
    y = scored["artist"].y
    zs = [reduction().fit_transform(v[scored["artist"].use]) for v in views]
    each = [out_of_fold(z, y) for z in zs]
    # float32 log-probabilities reach -30 and below: equal to float32's precision of each.
    np.testing.assert_allclose(scored["artist"].log_p, combine_views(each), rtol=1e-6,
                               atol=1e-5)
    assert not any(np.allclose(scored["artist"].log_p, e) for e in each)
    folds = list(KFold(FOLDS, shuffle=True, random_state=0).split(zs[0]))
    changed = y.copy()
    changed[0] = (y[0] + 1) % (y.max() + 1)
    before = combine_views([out_of_fold(z, y, folds) for z in zs])
    after = combine_views([out_of_fold(z, changed, folds) for z in zs])
    np.testing.assert_array_equal(before[0], after[0])


def test_a_picture_unlike_its_artists_styles_is_doubted(small_run: Run) -> None:
    # A Utamaro print filed under Rembrandt: the style heads see Ukiyo-e, and Rembrandt's
    # other paintings are recorded as Baroque.
    catalog = small_run.catalog()
    utamaro = catalog.index[catalog["artist"] == "Kitagawa Utamaro"][3]
    catalog.loc[utamaro, "artist"] = "Rembrandt"
    views = [np.asarray(small_run.features("mobilenet_v2"), dtype=np.float32)]
    scored, _, _ = fit_labels(catalog, ["artist", "style"], views)
    artist, style = scored["artist"], scored["style"]
    agreement = pd.Series(context_agreement(len(catalog), artist, style), index=artist.use)
    rembrandt = agreement[catalog.loc[artist.use, "artist"].to_numpy() == "Rembrandt"]
    assert rembrandt.idxmin() == utamaro
    assert rembrandt[utamaro] < rembrandt.median() - 1.0
    # Its own recorded style is not among its artist's others: changing it changes nothing.
    row = int(np.flatnonzero(style.use == utamaro)[0])
    y = style.y.copy()
    y[row] = (y[row] + 1) % len(style.classes)
    moved = context_agreement(len(catalog), artist, Scored(style.use, y, style.log_p,
                                                           style.classes))
    assert moved[artist.use == utamaro] == pytest.approx(agreement[utamaro])
    others = artist.y == artist.y[artist.use == utamaro][0]
    assert not np.allclose(moved[others], agreement.to_numpy()[others])


def test_non_paintings_are_the_first_outliers(reviewed: Run) -> None:
    review = load_review(reviewed)
    ids = ids_of(reviewed)
    assert set(review.outliers["image_id"].head(2)) == {ids["images/noise.png"],
                                                        ids["images/blank.png"]}
    assert "closest" in review.outliers["reason"].iat[0]
    assert len(review.outliers) == len(reviewed.catalog())


def test_a_second_review_is_up_to_date_and_export_writes_the_same_tables(
        reviewed: Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    before = (reviewed.root / "review" / "review.json").read_text()
    assert cmd_review(run=str(reviewed.root), features="mobilenet_v2", progress=False) == 0
    assert "up to date" in capsys.readouterr().out
    assert (reviewed.root / "review" / "review.json").read_text() == before
    review = load_review(reviewed)
    for table in ("duplicates", "labels", "outliers"):
        assert cmd_export(run=str(reviewed.root), out=str(tmp_path), review=table) == 0
        stored = review.table(table)
        (parquet,) = tmp_path.glob(f"*review-{table}*.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(parquet), stored)
        (csv,) = tmp_path.glob(f"*review-{table}*.csv")
        assert list(pd.read_csv(csv)["image_id" if table != "duplicates" else "image_id_a"]) \
            == list(stored["image_id" if table != "duplicates" else "image_id_a"])


# -------------------------------------------------------------------------------- the page
@pytest.fixture(scope="module")
def review_url(reviewed: Run) -> Iterator[str]:
    """The explorer over the reviewed run, served from a thread."""
    from dash_app.app import create_app

    server = make_server("127.0.0.1", 0, create_app(reviewed.root).server, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(10)


def test_the_review_page_shows_each_list_and_exports_the_stages_table(
        browser, review_url: str, reviewed: Run, injected: tuple, downloads: Path) -> None:
    from selenium.webdriver.common.by import By

    _, rows = injected
    ids = ids_of(reviewed)
    review = load_review(reviewed)
    browser.get(review_url + "/review")
    first = wait_for(browser, ".review-pair")[0]
    marked = [e.text for e in first.find_elements(By.CSS_SELECTOR, "tr.conflict th")]
    assert marked == ["artist", "artist"]
    assert {ids["images/copy-1.jpg"], ids[rows.at[40, "file"]]} == set(
        painting_ids(first.find_elements(By.CSS_SELECTOR, ".card a")))
    wait_for(browser, "#review-csv")[0].click()
    saved = downloaded(downloads, "*_review-duplicates_*.csv")
    assert saved.read_bytes() == table_bytes(review.duplicates, "csv")
    wait_for(browser, "#review-tab-labels")[0].click()
    wait_text(browser, ".review-labels", r"recorded: .*\nsuggested: ")
    wait_for(browser, "#review-tab-outliers")[0].click()
    shown = painting_ids(wait_for(browser, "#review-outliers a", 2))
    assert shown[:2] == list(review.outliers["image_id"].head(2))
    assert "tab=outliers" in browser.current_url
    # An artist's row says how likely the picture is in that artist's recorded styles.
    browser.get(review_url + "/review?tab=labels&target=artist")
    wait_text(browser, ".review-labels", r"likely in a style the other paintings of .+ are "
                                         r"recorded in")
    # The painting page of a copy says what it may duplicate.
    browser.get(review_url + f"/painting/{ids['images/copy-0.jpg']}")
    note = wait_text(browser, "#painting-duplicates", "^Possible duplicate of")
    assert rows.at[3, "title"] in note
