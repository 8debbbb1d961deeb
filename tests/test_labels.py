"""Your own labels: any column as a target, multi-label heads with thresholds, folders as labels,
a split column, and one split shared by every target."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import average_precision_score, precision_recall_fscore_support

from influence.catalog import Collection, artist_slug, build_catalog
from influence.commands import cmd_extract, cmd_index, cmd_train
from influence.finetune import finetune
from influence.pipeline import main
from influence.readers import head_paths, load_head, split_path
from influence.review import review_targets
from influence.runs import InfluenceError, Run, read_json
from influence.train import PR_POINTS, choose_threshold

from .conftest import COLLECTION
from .test_index import copy_run

SCHOOLS = {"Claude Monet": "impressionists", "Alfred Sisley": "impressionists",
           "Rembrandt": "dutch", "Kitagawa Utamaro": "ukiyo-e", "Francois Boucher": "rococo",
           "Niko Pirosmani": "naive"}


def _extract(run: Run, csv: Path, images: Path) -> None:
    """Catalog the run again from another CSV over the same images (features stay up to date)."""
    assert cmd_extract(run=str(run.root), metadata=str(csv), images=str(images),
                       extractors="pca", progress=False) == 0


def _ids(frame: pd.DataFrame, *parts: str) -> set[str]:
    return set(frame.loc[frame["part"].isin(parts), "image_id"])


def test_a_custom_column_is_a_target_and_too_small_labels_are_named(
        small_run: Run, slice_collection: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run = copy_run(small_run, tmp_path / "run")
    rows = pd.read_csv(slice_collection / "paintings.csv", dtype=str, keep_default_na=False)
    rows["school"] = rows["artist"].map(SCHOOLS)
    rows.loc[rows.index[:3], "school"] = "lonely"
    rows.to_csv(tmp_path / "with-school.csv", index=False)
    _extract(run, tmp_path / "with-school.csv", slice_collection)
    catalog = run.catalog()
    assert catalog["school"].dtype == "string"
    assert catalog["school"].value_counts()["lonely"] == 3
    capsys.readouterr()
    # Too small: named with its count, in one line, and nothing trained.
    assert main(["train", "--run", str(run.root), "--target", "school", "--features",
                 "pca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'lonely' 3" in err
    assert "--drop-small-classes" in err
    assert not head_paths(run, "school", "pca")["model"].exists()
    assert main(["train", "--run", str(run.root), "--target", "school", "--features", "pca",
                 "--head", "logistic", "--drop-small-classes"]) == 0
    info = read_json(head_paths(run, "school", "pca")["json"])
    assert info["classes"] == sorted(set(SCHOOLS.values()))
    assert info["dropped_classes"] == {"lonely": 3}
    assert info["n_test"] == len(pd.read_parquet(head_paths(run, "school", "pca")["test"]))
    # An unknown column: one line listing the catalog's columns, the new one among them.
    capsys.readouterr()
    assert main(["train", "--run", str(run.root), "--target", "colour"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown target(s) colour" in err
    assert "school" in err


@pytest.fixture(scope="module")
def tagged(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A multi-label head of genre and style as one tag list, and an artist head, on
    mobilenet_v2."""
    run = copy_run(small_run, tmp_path_factory.mktemp("tagged"))
    assert cmd_train(run=str(run.root), target="genre+style,artist", features="mobilenet_v2",
                     drop_small_classes=True, progress=False) == 0
    return run


def _truth(catalog: pd.DataFrame, ids: pd.Series, labels: list[str]) -> np.ndarray:
    """Each painting's genre and style as an indicator matrix over `labels`."""
    by_id = catalog.set_index("image_id")
    tags = [{v for v in by_id.loc[i, ["genre", "style"]] if not pd.isna(v)} for i in ids]
    return np.array([[label in t for label in labels] for t in tags], dtype=int)


def test_multi_label_metrics_equal_scikit_learn_from_the_stored_test_predictions(
        tagged: Run) -> None:
    paths = head_paths(tagged, "genre+style", "mobilenet_v2")
    info = read_json(paths["json"])
    assert info["multi_label"]
    labels = info["classes"]
    catalog = tagged.catalog()
    assert set(catalog["style"].dropna()) <= set(labels)
    stored = pd.read_parquet(paths["test"])
    assert stored.columns.tolist() == ["image_id", *labels]
    assert set(stored["image_id"]) <= _ids(pd.read_parquet(split_path(tagged)), "test")
    truth = _truth(catalog, stored["image_id"], labels)
    proba = stored[labels].to_numpy()
    thresholds = np.array([info["thresholds"][label] for label in labels])
    p, r, f, support = precision_recall_fscore_support(truth, proba >= thresholds,
                                                       average=None, zero_division=0)
    per_label = pd.DataFrame(info["per_label"])
    assert per_label["label"].tolist() == labels
    np.testing.assert_allclose(per_label[["precision", "recall", "f1"]].to_numpy(),
                               np.column_stack([p, r, f]))
    assert per_label["support"].tolist() == support.tolist()
    for j, label in enumerate(labels):
        recorded = per_label.loc[j, "average_precision"]
        if truth[:, j].any():
            assert recorded == pytest.approx(average_precision_score(truth[:, j], proba[:, j]))
            curve = info["pr_curves"][label]
            assert 2 <= len(curve["threshold"]) <= PR_POINTS
            assert len(curve["precision"]) == len(curve["recall"]) == len(curve["threshold"])
        else:
            assert recorded is None
    assert info["micro_f1"] > 0.5  # chance for 10+ labels is far below
    assert info["validation"].startswith("a seeded")


def test_a_multi_label_head_predicts_every_label_above_its_threshold(tagged: Run) -> None:
    head = load_head(tagged, "genre+style", "mobilenet_v2")
    info = read_json(head_paths(tagged, "genre+style", "mobilenet_v2")["json"])
    assert head.multi_label
    np.testing.assert_allclose(head.thresholds,
                               [info["thresholds"][label] for label in head.classes])
    stored = pd.read_parquet(head_paths(tagged, "genre+style", "mobilenet_v2")["test"])
    catalog = tagged.catalog()
    row = pd.Series(np.arange(len(catalog)), index=catalog["image_id"])
    x = np.asarray(tagged.features("mobilenet_v2"))[row.loc[stored["image_id"]].to_numpy()]
    np.testing.assert_allclose(head.proba(x), stored[list(head.classes)].to_numpy(),
                               rtol=1e-4, atol=1e-6)
    predicted = head.labels(x)
    above = head.proba(x) >= head.thresholds
    for answer, wanted in zip(predicted, above, strict=True):
        assert {a["label"] for a in answer} == set(head.classes[wanted])
        assert [a["p"] for a in answer] == sorted((a["p"] for a in answer), reverse=True)
    assert any(len(a) >= 2 for a in predicted)  # a genre and a style at once
    assert all(len(t) == 3 for t in head.top(x[:5], k=3))
    # A single-label head's labels are its most probable one.
    artist = load_head(tagged, "artist", "mobilenet_v2")
    assert not artist.multi_label
    assert artist.labels(x[:4]) == artist.top(x[:4], k=1)


def test_a_multi_label_heads_most_confidently_wrong_paintings(tagged: Run) -> None:
    paths = head_paths(tagged, "genre+style", "mobilenet_v2")
    info = read_json(paths["json"])
    wrong = pd.read_csv(paths["wrong"])
    stored = pd.read_parquet(paths["test"]).set_index("image_id")
    truth = pd.DataFrame(_truth(tagged.catalog(), stored.index, info["classes"]),
                         index=stored.index, columns=info["classes"]).astype(bool)
    given = stored[info["classes"]] >= pd.Series(info["thresholds"])
    errors = (truth != given).any(axis=1)
    assert len(wrong) == min(int(errors.sum()), 50) > 0
    assert wrong["confidence"].is_monotonic_decreasing
    for row in wrong.itertuples():
        p, has = stored.loc[row.image_id, row.label], truth.loc[row.image_id, row.label]
        assert row.threshold == pytest.approx(info["thresholds"][row.label], abs=1e-4)
        assert row.mistake == ("missed" if has else "wrongly predicted")
        assert (p < row.threshold) if has else (p >= row.threshold)
        assert row.confidence == pytest.approx(1 - p if has else p, abs=1e-4)
        assert set(row.predicted.split("; ") if isinstance(row.predicted, str) else []) == \
            set(given.columns[given.loc[row.image_id]])


def test_similar_lists_a_multi_label_heads_labels_above_their_thresholds(
        tagged: Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = Run(shutil.copytree(tagged.root, tmp_path / "run"))
    assert cmd_index(run=str(run.root), features="mobilenet_v2", progress=False) == 0
    head = load_head(run, "genre+style", "mobilenet_v2")
    proba = head.proba(np.asarray(run.features("mobilenet_v2")))
    # A painting no label of which is near its threshold, so float noise cannot move one.
    row = int(np.argmax(np.abs(proba - head.thresholds).min(axis=1)))
    expected = set(head.classes[proba[row] >= head.thresholds])
    image = run.image_path(run.catalog()["file"].iat[row])
    capsys.readouterr()
    assert main(["similar", "--run", str(run.root), str(image), "--json"]) == 0
    answer = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    listed = answer["predictions"]["genre+style"]
    assert {p["label"] for p in listed} == expected
    thresholds = dict(zip(head.classes, head.thresholds, strict=True))
    assert all(p["threshold"] == pytest.approx(thresholds[p["label"]], abs=1e-4)
               and p["p"] >= p["threshold"] for p in listed)
    assert len(answer["predictions"]["artist"]) == 5  # a single-label head: its top 5
    assert "threshold" not in answer["predictions"]["artist"][0]
    assert main(["similar", "--run", str(run.root), str(image)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"^genre\+style \(above its thresholds\): ", printed, re.M)


def test_the_split_is_one_for_every_target(tagged: Run) -> None:
    split = pd.read_parquet(split_path(tagged))
    assert split["image_id"].is_unique
    assert len(split) == len(tagged.catalog())
    for target in ("genre+style", "artist"):
        held_out = set(pd.read_parquet(head_paths(tagged, target, "mobilenet_v2")["test"])
                       ["image_id"])
        assert held_out <= _ids(split, "test")
        assert not held_out & _ids(split, "train", "validation")
    assert tagged.done("train").count(("train", "split")) == 1


def test_review_and_finetune_keep_to_single_label_targets(tagged: Run) -> None:
    assert review_targets(tagged) == ["artist"]
    with pytest.raises(InfluenceError, match="multi-label"):
        finetune(tagged, "genre+style")


def test_a_threshold_maximises_f1_or_reaches_the_precision_asked() -> None:
    truth = np.array([0, 0, 1, 0, 1, 1, 1, 0, 1, 1])
    proba = np.array([.1, .2, .3, .35, .4, .5, .6, .7, .8, .9])
    # F1 at 0.3: 6 of 8 predicted right, all 6 found -> 0.857; no other threshold does better.
    assert choose_threshold(truth, proba) == pytest.approx(0.3)
    # Precision >= 0.8 is first reached at 0.4 (5 of 6 predicted right).
    assert choose_threshold(truth, proba, 0.8) == pytest.approx(0.4)
    assert choose_threshold(np.zeros(4, dtype=int), proba[:4]) == 0.5


def test_the_split_column_fixes_each_paintings_part(
        small_run: Run, slice_collection: Path, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path / "run")
    rows = pd.read_csv(slice_collection / "paintings.csv", dtype=str, keep_default_na=False)
    rows["split"] = ""
    rows.loc[rows.index[::5], "split"] = "TEST"
    rows.loc[rows.index[1::5], "split"] = "validation"
    rows.loc[rows.index[2], "split"] = "tset"
    rows.to_csv(tmp_path / "with-split.csv", index=False)
    _extract(run, tmp_path / "with-split.csv", slice_collection)
    rejected = pd.read_csv(run.rejected_path)
    assert rejected.loc[rejected["reason"] == "unknown split", "detail"].str.contains(
        "tset").tolist() == [True]
    assert cmd_train(run=str(run.root), target="artist", features="pca", progress=False) == 0
    catalog = run.catalog()
    split = pd.read_parquet(split_path(run))
    given = catalog["split"].notna().to_numpy()
    assert split["part"].to_numpy()[given].tolist() == catalog["split"][given].tolist()
    assert set(split["part"][~given]) == {"train", "test"}
    info = read_json(head_paths(run, "artist", "pca")["json"])
    held_out = set(pd.read_parquet(head_paths(run, "artist", "pca")["test"])["image_id"])
    assert held_out == _ids(split, "test")
    assert _ids(split, "test") >= set(catalog.loc[catalog["split"] == "test", "image_id"])
    assert info["head_choice"]["validation"] == "the split's validation part"
    assert info["split"]["parts"]["validation"] == (catalog["split"] == "validation").sum()


def _folders(root: Path, per_artist: int = 12) -> dict[str, str]:
    """Paintings of three artists filed as images/<movement>/<artist>/; file -> folder path."""
    rows = pd.read_csv(COLLECTION / "paintings.csv", dtype=str, keep_default_na=False)
    where = {"Claude Monet": "impressionism", "Alfred Sisley": "impressionism",
             "Rembrandt": "baroque"}
    placed = {}
    for artist, movement in where.items():
        folder = root / "images" / movement / artist_slug(artist)
        folder.mkdir(parents=True)
        for file in rows.loc[rows["artist"] == artist, "file"].head(per_artist):
            shutil.copy(COLLECTION / file, folder / Path(file).name)
            placed[f"images/{movement}/{artist_slug(artist)}/{Path(file).name}"] = (
                f"{movement}/{artist_slug(artist)}")
    return placed


def test_a_folder_per_label_collection_is_extracted_and_trained(tmp_path: Path) -> None:
    collection = tmp_path / "folders"
    placed = _folders(collection)
    run = Run(tmp_path / "run")
    assert main(["--no-progress", "extract", "--run", str(run.root), "--collection",
                 str(collection), "--labels-from-folders", "painter", "--extractors",
                 "pca"]) == 0
    catalog = run.catalog()
    assert dict(zip(catalog["file"], catalog["painter"], strict=True)) == placed
    assert main(["--no-progress", "train", "--run", str(run.root), "--target", "painter",
                 "--head", "logistic"]) == 0
    info = read_json(head_paths(run, "painter", "pca")["json"])
    assert info["classes"] == sorted(set(placed.values()))
    assert info["n_test"] > 0

    # Each folder a label of its own: a multi-label target of movements and artists.
    several = Run(tmp_path / "several")
    assert main(["--no-progress", "extract", "--run", str(several.root), "--collection",
                 str(collection), "--labels-from-folders", "painter", "--multi-label-folders",
                 "--extractors", "pca"]) == 0
    assert main(["--no-progress", "train", "--run", str(several.root),
                 "--multi-label", "painter"]) == 0
    info = read_json(head_paths(several, "painter", "pca")["json"])
    assert info["classes"] == ["alfred-sisley", "baroque", "claude-monet", "impressionism",
                               "rembrandt"]
    stored = pd.read_parquet(head_paths(several, "painter", "pca")["test"])
    files = several.catalog().set_index("image_id")["file"]
    truth = np.array([[label in placed[files[i]].split("/") for label in info["classes"]]
                      for i in stored["image_id"]], dtype=int)
    thresholds = np.array([info["thresholds"][c] for c in info["classes"]])
    _, recall, _, _ = precision_recall_fscore_support(
        truth, stored[info["classes"]].to_numpy() >= thresholds, average=None, zero_division=0)
    np.testing.assert_allclose([r["recall"] for r in info["per_label"]], recall)


def test_with_a_csv_too_the_csv_wins_and_each_conflict_is_listed(tmp_path: Path) -> None:
    collection = tmp_path / "folders"
    placed = _folders(collection, per_artist=3)
    files = sorted(placed)
    pd.DataFrame({"file": files[:3], "painter": ["someone else", placed[files[1]], ""],
                  "title": ["a", "b", "c"]}).to_csv(collection / "paintings.csv", index=False)
    result = build_catalog(Collection.from_dir(collection, labels_from_folders="painter"),
                           Run(tmp_path / "run"), progress=False)
    painter = dict(zip(result.catalog["file"], result.catalog["painter"], strict=True))
    assert len(painter) == len(placed)  # images the CSV does not list are kept, from folders
    assert painter[files[0]] == "someone else"
    assert painter[files[1]] == placed[files[1]]
    assert painter[files[2]] == placed[files[2]]
    conflicts = result.rejected[result.rejected["reason"] == "label conflict"]
    assert conflicts["file"].tolist() == [files[0]]
    assert f"the folder says '{placed[files[0]]}'" in conflicts["detail"].iloc[0]
    assert "someone else" in conflicts["detail"].iloc[0]
