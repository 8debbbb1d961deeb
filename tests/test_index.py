"""The faiss index per feature set and the similar-artist rule."""

from __future__ import annotations

import shutil
from pathlib import Path

import faiss
import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from influence import index as index_stage
from influence.commands import cmd_index
from influence.index import (
    build_index,
    build_run_index,
    leave_one_out,
    load_index,
    load_neighbours,
    rank_artists,
    search,
)
from influence.runs import Run, read_json, write_json


def copy_run(run: Run, dest: Path) -> Run:
    """A private copy of a fixture run (catalog, features, manifest), so tests may write to it."""
    shutil.copytree(run.root, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.parts", "thumbs", "index", "models",
                                                  "clusters"))
    return Run(dest)


@pytest.fixture(scope="module")
def indexed(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    run = copy_run(small_run, tmp_path_factory.mktemp("indexed"))
    assert cmd_index(run=str(run.root), progress=False) == 0
    return run


def test_prolific_artist_with_mediocre_matches_loses_to_fewer_closer_ones() -> None:
    # Twelve middling matches by a prolific painter, three close ones by another.
    scores = [0.95, 0.93, 0.92] + [0.80] * 12 + [0.60]
    artists = ["Few"] * 3 + ["Many"] * 12 + ["Other"]
    ranked = rank_artists(scores, artists)
    assert [r["artist"] for r in ranked[:2]] == ["Few", "Many"]
    assert ranked[0] == {"artist": "Few", "artist_id": "few",
                         "score": pytest.approx(0.9333, abs=1e-4), "paintings": 3}
    assert ranked[1]["paintings"] == 12
    # The naive vote would have chosen the prolific painter.
    assert index_stage.vote_artists(artists)[0] == "Many"


def test_one_lucky_match_does_not_beat_a_consistent_artist() -> None:
    scores = [0.97, 0.90, 0.89, 0.88, 0.70, 0.50]
    artists = ["Lucky", "Steady", "Steady", "Steady", "Other", "Other"]
    ranked = rank_artists(scores, artists)
    assert ranked[0]["artist"] == "Steady"
    # Lucky's two empty places are filled with the pool's lowest score (0.50).
    lucky = next(r for r in ranked if r["artist"] == "Lucky")
    assert lucky["score"] == pytest.approx((0.97 + 0.5 + 0.5) / 3, abs=1e-4)


def test_rank_artists_skips_missing_artists_and_handles_an_empty_pool() -> None:
    ranked = rank_artists([0.9, 0.8, 0.7], [None, "A", float("nan")])
    assert [r["artist"] for r in ranked] == ["A"]
    assert rank_artists([], []) == []


def test_index_is_written_with_its_description(indexed: Run) -> None:
    for name in ("pca", "mobilenet_v2"):
        info = read_json(indexed.index_dir / f"{name}.json")
        assert info["rows"] == 180
        assert info["kind"].startswith("IndexFlatIP")
        assert info["dim"] == indexed.features(name).shape[1]
        assert info["leave_one_out"]["queries"] == 180
        assert load_index(indexed, name).ntotal == 180


def test_every_indexed_painting_finds_itself_first_with_score_one(indexed: Run) -> None:
    x = np.asarray(indexed.features("mobilenet_v2"))
    scores, rows = search(load_index(indexed, "mobilenet_v2"), x, 3)
    assert (rows[:, 0] == np.arange(len(x))).all()
    np.testing.assert_allclose(scores[:, 0], 1.0, atol=1e-4)
    assert (scores[:, 1] < scores[:, 0] + 1e-6).all()


def test_the_neighbour_table_is_every_paintings_nearest_others_as_scikit_learn_finds_them(
        indexed: Run) -> None:
    x = np.asarray(indexed.features("mobilenet_v2"))
    sims, rows = load_neighbours(indexed, "mobilenet_v2")
    # 180 paintings: every other painting is in the table, best first, and none twice.
    assert rows.shape == (180, index_stage.NEIGHBOURS)
    assert ((rows >= 0).sum(axis=1) == 179).all()
    assert (rows[:, 179:] == -1).all()
    distance, found = NearestNeighbors(n_neighbors=11, metric="cosine").fit(x).kneighbors(x)
    np.testing.assert_allclose(sims[:, :10], 1 - distance[:, 1:], atol=1e-5)
    assert (rows[:, :10] == found[:, 1:]).mean() > 0.99


def test_leave_one_out_nearest_artist_matches_scikit_learn(indexed: Run) -> None:
    x = np.asarray(indexed.features("mobilenet_v2"))
    artists = indexed.catalog()["artist"].to_numpy(dtype=object)
    result = leave_one_out(*load_neighbours(indexed, "mobilenet_v2"), artists, np.arange(len(x)))
    nn = NearestNeighbors(n_neighbors=2, metric="cosine").fit(x)
    _, found = nn.kneighbors(x)
    expected = np.mean(artists[found[:, 1]] == artists)
    assert result["nearest_same_artist"] == pytest.approx(expected, abs=1e-3)
    # Real features of six artists: the own artist is nearly always among the top five.
    assert result["artist_top5"] >= 0.9
    assert read_json(indexed.index_dir / "mobilenet_v2.json")["leave_one_out"] == result


def test_index_is_kept_when_up_to_date_and_rebuilt_when_features_change(indexed: Run) -> None:
    path = indexed.index_dir / "pca.faiss"
    before = path.stat().st_mtime_ns
    assert build_run_index(indexed, "pca")["up_to_date"] is True
    assert path.stat().st_mtime_ns == before
    # Features extracted again (a new key in run.json) make the index stale.
    saved = indexed.manifest_path.read_text()
    try:
        manifest = indexed.manifest()
        manifest["steps"]["extract"]["pca"]["key"] = "re-extracted"
        manifest["steps"]["extract"]["pca"]["fit"]["key"] = "re-extracted"
        write_json(indexed.manifest_path, manifest)
        assert build_run_index(indexed, "pca")["up_to_date"] is False
    finally:
        indexed.manifest_path.write_text(saved)


def test_large_collections_get_an_approximate_index(monkeypatch: pytest.MonkeyPatch,
                                                    small_run: Run) -> None:
    monkeypatch.setattr(index_stage, "EXACT_MAX", 100)
    x = np.asarray(small_run.features("mobilenet_v2"))
    index = build_index(x)
    assert index_stage.describe(index)["kind"].startswith("IndexIVFFlat")
    # Its recall@10 against exact search is measured the way the index JSON records it.
    queries = np.arange(0, len(x), 3)
    exact = faiss.IndexFlatIP(x.shape[1])
    exact.add(index_stage.normalise(x))
    _, truth = search(exact, x[queries], 10)
    _, found = search(index, x[queries], 10)
    expected = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found, strict=True)])
    assert index_stage.recall_at(index, x, queries) == pytest.approx(expected, abs=1e-4)
    assert index_stage.recall_at(exact, x, queries) == 1.0
    # Probing every list is an exact search.
    index.nprobe = index.nlist
    assert index_stage.recall_at(index, x, queries) == 1.0


def test_nprobe_is_the_smallest_that_reaches_the_recall_target(monkeypatch: pytest.MonkeyPatch,
                                                               small_run: Run) -> None:
    monkeypatch.setattr(index_stage, "EXACT_MAX", 100)
    x = np.asarray(small_run.features("mobilenet_v2"))
    index = build_index(x)
    queries = np.arange(0, len(x), 2)
    tried = index_stage.tune_nprobe(index, x, queries, target=0.99)
    assert [t["nprobe"] for t in tried] == sorted({t["nprobe"] for t in tried})
    assert all(t["recall"] < 0.99 for t in tried[:-1])
    assert tried[-1]["recall"] >= 0.99
    assert index.nprobe == tried[-1]["nprobe"]
    assert len(tried) > 1  # the smallest nprobe alone misses on these features


def test_the_index_json_records_recall_at_10(monkeypatch: pytest.MonkeyPatch, small_run: Run,
                                             tmp_path: Path) -> None:
    monkeypatch.setattr(index_stage, "EXACT_MAX", 100)
    run = copy_run(small_run, tmp_path / "run")
    info = build_run_index(run, "mobilenet_v2")
    assert info["kind"].startswith("IndexIVFFlat")
    assert info["recall_at_10"]["queries"] == len(run.catalog())
    assert info["recall_at_10"]["value"] >= index_stage.RECALL_TARGET
    # The tuned nprobe is what the saved index searches with.
    assert index_stage.load_index(run, "mobilenet_v2").nprobe == info["nprobe"]
    assert info["recall_at_10"]["nprobe_tried"][-1]["nprobe"] == info["nprobe"]


def test_index_of_unknown_features_is_a_clear_error(indexed: Run,
                                                    capsys: pytest.CaptureFixture) -> None:
    from influence.pipeline import main

    assert main(["index", "--run", str(indexed.root), "--features", "nope"]) == 2
    assert "no features 'nope'" in capsys.readouterr().err
