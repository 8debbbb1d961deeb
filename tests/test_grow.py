"""Paintings added to and removed from a finished run: the fits are kept and extended, every
aligned file follows the catalog, and past REFIT_SHARE (or when asked) the fits are redone."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pandas as pd
import pytest

from dash_app.data import load_run_data
from influence.commands import (
    cmd_cluster,
    cmd_combine,
    cmd_extract,
    cmd_index,
    cmd_influence,
    cmd_review,
    cmd_train,
)
from influence.extract.store import FeatureStore
from influence.index import load_index, load_neighbours, neighbour_table
from influence.readers import head_paths, load_clustering, split_path
from influence.review import load_review
from influence.runs import REFIT_SHARE, Run, read_json, write_json

from .conftest import MOBILENET, make_slice

#: The run is fitted on BASE paintings; the collection holds EXTRA more to add.
BASE = 200
EXTRA = 52
ADD = 20
REMOVE = 5
COMBINED = "pca+kpca~w16"
TARGETS = ("artist", "style")
#: Steps fitted on the catalog's rows, which a growing collection extends.
FITTED = [("extract", "pca"), ("extract", "kpca"), ("extract", COMBINED), ("cluster", COMBINED),
          ("index", COMBINED), ("train", "split"),
          *(("train", f"{t}/{COMBINED}") for t in TARGETS),
          ("review", "duplicates"), ("review", "labels")]


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    """BASE + EXTRA real paintings (42 of each conftest artist), their rows in CSV order; each
    test writes the CSV of the rows it wants beside the shared images."""
    folder = make_slice(tmp_path_factory.mktemp("grow-collection"), per_artist=42)
    rows = pd.read_csv(folder / "paintings.csv", dtype=str, keep_default_na=False)
    assert len(rows) == BASE + EXTRA
    return rows.assign(folder=str(folder))


def pipeline(run: Run, rows: pd.DataFrame, name: str, refit: bool = False) -> None:
    """Write `rows` as the collection's CSV and bring every stage of the run up to date."""
    folder = Path(rows["folder"].iat[0])
    csv = folder / f"{name}.csv"
    rows.drop(columns="folder").to_csv(csv, index=False)
    root = str(run.root)
    assert cmd_extract(run=root, metadata=str(csv), images=str(folder), extractors="pca,kpca",
                       refit=refit, progress=False) == 0
    assert cmd_combine(run=root, sets=COMBINED, refit=refit, progress=False) == 0
    assert cmd_cluster(run=root, features=COMBINED, k_min=2, k_max=4, refit=refit,
                       progress=False) == 0
    assert cmd_index(run=root, features=COMBINED, refit=refit, progress=False) == 0
    assert cmd_train(run=root, target=",".join(TARGETS), features=COMBINED, head="logistic",
                     refit=refit, progress=False) == 0
    assert cmd_influence(run=root, features=COMBINED, progress=False) == 0
    assert cmd_review(run=root, features=COMBINED, progress=False) == 0


@pytest.fixture(scope="module")
def base_run(collection: pd.DataFrame, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A finished run of the first BASE paintings; treat as read-only."""
    run = Run(tmp_path_factory.mktemp("grow") / "base")
    pipeline(run, collection.iloc[:BASE], "base")
    return run


@pytest.fixture
def run(base_run: Run, tmp_path: Path) -> Run:
    copy = Run(tmp_path / "run")
    shutil.copytree(base_run.root, copy.root)
    return copy


def steps(run: Run) -> dict[tuple[str, str], dict[str, Any]]:
    return {(s, n): r for s, named in run.manifest()["steps"].items() for n, r in named.items()}


def fitted_files(run: Run) -> dict[str, bytes]:
    """The files that hold fitted models: unchanged bytes mean nothing was fitted again."""
    paths = [run.features_dir / f"{n}.fit.joblib" for n in ("pca", "kpca", COMBINED)]
    paths += [run.clusters_dir / COMBINED / f for f in ("model.joblib", "sweep.csv")]
    paths += [head_paths(run, t, COMBINED)["model"] for t in TARGETS]
    return {str(p.relative_to(run.root)): p.read_bytes() for p in paths}


def assert_aligned(run: Run) -> None:
    """Every file aligned with the catalog holds exactly its paintings, in its order."""
    ids = run.catalog()["image_id"].astype(str).tolist()
    for name in ("pca", "kpca", COMBINED):
        assert len(run.features(name)) == len(ids), name
        assert run.features_info(name)["rows"] == len(ids)
    clustering = load_clustering(run, COMBINED)
    assert clustering.assignments["image_id"].tolist() == ids
    assert clustering.assignments[["kmeans", "gmm", "umap_x", "umap_y"]].notna().all().all()
    assert clustering.responsibilities_of(np.arange(len(ids))).shape[0] == len(ids)
    assert set(clustering.typical["image_id"]) <= set(ids)
    assert sum(clustering.summary["sizes"]["kmeans"]) == len(ids)
    index = faiss.read_index(str(run.index_dir / f"{COMBINED}.faiss"))
    assert index.ntotal == len(ids)
    # The index's row i is catalog row i: each painting finds itself first.
    x = np.asarray(run.features(COMBINED), dtype=np.float32)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert (index.search(x, 1)[1][:, 0] == np.arange(len(ids))).mean() > 0.99
    split = pd.read_parquet(split_path(run))
    assert set(split["image_id"]) <= set(ids)
    for target in TARGETS:
        for file in ("wrong", "test"):
            path = head_paths(run, target, COMBINED)[file]
            table = pd.read_csv(path) if file == "wrong" else pd.read_parquet(path)
            assert set(table["image_id"]) <= set(split["image_id"]), (target, file)
    # The neighbour table: a row per painting, naming only catalog rows, other than its own,
    # best first, gaps (-1) only at the end.
    sims, nbrs = load_neighbours(run, COMBINED)
    assert nbrs.shape[0] == len(ids)
    assert nbrs.max() < len(ids)
    assert not (nbrs == np.arange(len(ids))[:, None]).any()
    assert (np.diff(np.where(nbrs >= 0, sims, -2.0), axis=1) <= 1e-6).all()
    assert (np.diff((nbrs < 0).astype(int), axis=1) >= 0).all()
    review = load_review(run)
    assert sorted(review.outliers["image_id"]) == sorted(ids)
    assert set(review.labels["image_id"]) <= set(ids)
    assert set(review.duplicates["image_id_a"]) | set(review.duplicates["image_id_b"]) <= set(ids)
    for (stage, name), record in steps(run).items():
        if "fit" in record and stage != "train":  # a head's rows are its split's
            assert record["rows"] == len(ids), (stage, name)


def test_added_paintings_extend_every_fit_and_nothing_else_is_fitted(
        run: Run, base_run: Run, collection: pd.DataFrame) -> None:
    before, models = steps(run), fitted_files(run)
    pipeline(run, collection.iloc[:BASE + ADD], "added")
    after = steps(run)
    for step in FITTED:
        assert after[step]["fit"] == before[step]["fit"], step
    for step in [s for s in FITTED if s[0] != "train" or "split" in s[1]]:
        assert after[step]["action"] == "extended", step
        assert after[step]["growth"][-1]["added"] == ADD
    # Heads are kept as they were: the new paintings are in no part of the run's one split, so
    # not trained on.
    added_ids = set(run.catalog()["image_id"].iloc[BASE:])
    assert len(added_ids) == ADD
    assert not added_ids & set(pd.read_parquet(split_path(run))["image_id"])
    for target in TARGETS:
        assert after["train", f"{target}/{COMBINED}"] == before["train", f"{target}/{COMBINED}"]
    assert fitted_files(run) == models
    # pca extracted only the new paintings, with its kept fit.
    assert after["extract", "pca"]["new_rows"] == ADD
    # The review scored the added paintings with its stored heads, one per view: the combined
    # set and each of its parts (those whose label its heads know: half are a sixth artist's),
    # and the others kept their out-of-fold probabilities.
    assert after["review", "labels"]["views"] == [COMBINED, "pca", "kpca"]
    for target in after["review", "labels"]["targets"]:
        assert target["scored_by_stored_head"] > 0
        assert target["scored_by_stored_head"] + target["left_out_new_label"] == ADD
    assert after["review", "duplicates"]["hashed"] >= before["review", "duplicates"]["hashed"]
    review = load_review(run)
    kept = review.labels[~review.labels["image_id"].isin(added_ids)]
    old = load_review(base_run).labels
    merged = kept.merge(old, on=["target", "image_id"], suffixes=("", "_before"))
    assert len(merged) == len(old)
    np.testing.assert_array_equal(merged["log_p_recorded"], merged["log_p_recorded_before"])
    assert_aligned(run)
    # The grown neighbour table is the one a full search of the grown index finds: the added
    # paintings searched everything, the others only the added vectors.
    grown = load_neighbours(run, COMBINED)
    searched = neighbour_table(load_index(run, COMBINED), run.features(COMBINED))
    np.testing.assert_allclose(grown[0], searched[0], atol=1e-5)
    assert (grown[1] == searched[1]).mean() > 0.999
    assert (grown[1][:BASE, :10] != load_neighbours(base_run, COMBINED)[1][:, :10]).any()
    change = run.manifest()["changes"][-1]
    assert (change["added"], change["removed"], change["refitted"]) == (ADD, 0, {})
    assert {f"cluster/{COMBINED}", f"index/{COMBINED}", "extract/pca"} <= set(change["extended"])
    # The explorer reads the extended run: an added painting has neighbours and a cluster.
    added = run.catalog()["image_id"].iat[-1]
    data = load_run_data(run.root)
    assert data.neighbours(added, k=5)["paintings"]
    assert added in set(data.clusterings[COMBINED].assignments["image_id"])
    assert len(data.catalog) == BASE + ADD


def test_removed_paintings_leave_every_aligned_file_and_keep_the_fits(
        run: Run, collection: pd.DataFrame) -> None:
    before, models = steps(run), fitted_files(run)
    gone = collection.iloc[[3, 50, 90, 130, 170]]["file"]
    pipeline(run, collection.iloc[:BASE][~collection.iloc[:BASE]["file"].isin(gone)], "removed")
    after = steps(run)
    for step in FITTED:
        assert after[step]["fit"] == before[step]["fit"], step
        assert after[step]["action"] == "extended", step
        assert after[step]["growth"][-1]["removed"] > 0
    assert fitted_files(run) == models
    assert len(run.catalog()) == BASE - REMOVE
    assert_aligned(run)
    change = run.manifest()["changes"][-1]
    assert (change["added"], change["removed"], change["refitted"]) == (0, REMOVE, {})
    # Added back, then removed again: the second removal's catalog is the first's, and still a
    # change of its own.
    met = len(run.manifest()["changes"])
    pipeline(run, collection.iloc[:BASE], "back")
    pipeline(run, collection.iloc[:BASE][~collection.iloc[:BASE]["file"].isin(gone)], "again")
    changes = run.manifest()["changes"]
    assert len(changes) == met + 2
    assert [(c["added"], c["removed"]) for c in changes[-2:]] == [(REMOVE, 0), (0, REMOVE)]
    assert f"cluster/{COMBINED}" in changes[-1]["extended"]
    assert_aligned(run)


def test_growth_past_the_share_or_asked_refits(run: Run, collection: pd.DataFrame) -> None:
    assert EXTRA / BASE > REFIT_SHARE > ADD / BASE
    before = steps(run)
    pipeline(run, collection, "grown")
    after = steps(run)
    for step in FITTED:
        assert after[step]["action"] == "fitted", step
        assert after[step]["fit"]["key"] != before[step]["fit"]["key"], step
    assert after["cluster", COMBINED]["fit"]["rows"] == BASE + EXTRA
    # pca's share is past REFIT_SHARE; what reads its fit is fitted again with it.
    assert "past REFIT_SHARE" in after["extract", "pca"]["fit"]["why"]
    assert "changed" in after["cluster", COMBINED]["fit"]["why"]
    assert_aligned(run)
    change = run.manifest()["changes"][-1]
    assert change["added"] == EXTRA
    assert f"cluster/{COMBINED}" in change["refitted"]
    # Asked: a fit that has been extended is fitted again on the paintings it now has.
    pipeline(run, collection.iloc[:-3], "shrunk")
    assert steps(run)["cluster", COMBINED]["action"] == "extended"
    assert cmd_cluster(run=str(run.root), features=COMBINED, k_min=2, k_max=4, refit=True,
                       progress=False) == 0
    record = steps(run)["cluster", COMBINED]
    assert (record["action"], record["fit"]["why"], record["fit"]["rows"]) == (
        "fitted", "asked (--refit)", BASE + EXTRA - 3)


def _relabel(run: Run, name: str, label: str, parts: slice = slice(None)) -> None:
    """What a run made in another environment holds: its parts (and the features' record)
    labelled with the weights file as that environment had it."""
    store = FeatureStore(run, name)
    for path in store.writer.part_files()[parts]:
        with np.load(path) as z:
            rows = {k: z[k] for k in z.files}
        np.savez(path, **{**rows, "weights": np.asarray([label])})
    info = read_json(store.info_path)
    write_json(store.info_path, {**info, "weights": label})


def test_a_run_made_in_another_environment_grows_with_the_same_weights_file(
        collection: pd.DataFrame, tmp_path: Path) -> None:
    """The weights file at another path (another clone, a re-made .venv) is the same network:
    only the new paintings are embedded. Different weights in one matrix are still refused."""
    folder = Path(collection["folder"].iat[0])
    run = Run(tmp_path / "run")

    def extract(rows: pd.DataFrame) -> int:
        csv = folder / f"env-{len(rows)}.csv"
        rows.drop(columns="folder").to_csv(csv, index=False)
        return cmd_extract(run=str(run.root), metadata=str(csv), images=str(folder),
                           extractors="mobilenet_v2", weights={"mobilenet_v2": str(MOBILENET)},
                           progress=False)

    assert extract(collection.iloc[:40]) == 0
    before = np.array(run.features("mobilenet_v2"))
    _relabel(run, "mobilenet_v2", "file /gone/old-env/mobilenet_v2_imagenet_features.pth")
    assert extract(collection.iloc[:50]) == 0
    info = run.features_info("mobilenet_v2")
    assert (info["rows"], info["new_rows"]) == (50, 10)
    assert info["weights"] == f"file {MOBILENET.resolve()}"
    np.testing.assert_array_equal(run.features("mobilenet_v2")[:40], before)
    # A part made with other weights (a node that fell back to random ones) is refused.
    _relabel(run, "mobilenet_v2", "random (pretrained weights unavailable: offline)",
             slice(0, 1))
    assert extract(collection.iloc[:60]) == 1
