"""`similar` and the Explorer: self-retrieval, the --json schema, bad queries, one model load."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from influence import similar
from influence.catalog import artist_slug
from influence.commands import cmd_cluster, cmd_index, cmd_train
from influence.pipeline import main
from influence.readers import load_clustering
from influence.runs import InfluenceError, Run, read_json
from influence.similar import Explorer

from .test_index import copy_run

ANSWER_KEYS = {"query", "features", "paintings", "artists", "predictions", "clusters", "seconds",
               "position"}
PAINTING_KEYS = {"image_id", "file", "artist", "title", "score"}


@pytest.fixture(scope="module")
def built(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Both feature sets indexed; artist and style heads and a clustering on mobilenet_v2."""
    run = copy_run(small_run, tmp_path_factory.mktemp("built"))
    root = str(run.root)
    assert cmd_index(run=root, progress=False) == 0
    assert cmd_train(run=root, target="artist,style", features="mobilenet_v2",
                     progress=False) == 0
    assert cmd_cluster(run=root, features="mobilenet_v2", k_min=2, k_max=5,
                       progress=False) == 0
    return run


@pytest.fixture(scope="module")
def explorer(built: Run) -> Explorer:
    """The explorer on mobilenet_v2, the feature set with heads and a clustering."""
    return Explorer(built, "mobilenet_v2")


def _paintings(run: Run, n: int) -> list[tuple[str, Path]]:
    """(image_id, path) of n paintings of the run, one per artist where possible."""
    catalog = run.catalog().groupby("artist").head(1).head(n)
    return [(i, run.image_path(f)) for i, f in zip(catalog["image_id"], catalog["file"],
                                                    strict=True)]


def _bomb_png(path: Path, side: int = 30_000) -> Path:
    """A tiny PNG whose header claims side x side pixels (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                         zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))
    return path


def test_default_features_are_the_best_at_finding_the_artist(built: Run,
                                                              explorer: Explorer) -> None:
    recorded = {name: read_json(built.index_dir / f"{name}.json")["leave_one_out"]["artist_top5"]
                for name in ("pca", "mobilenet_v2")}
    assert recorded["mobilenet_v2"] != recorded["pca"]
    # The best, or the cheapest per query (the extractors' declared cost) of those within CLOSE
    # of it: on six artists both find the artist in their top five almost always.
    near = [n for n, v in recorded.items() if v >= max(recorded.values()) - similar.CLOSE]
    assert similar.default_features(built) == min(near, key=similar.query_cost)
    assert similar.query_cost("pca") < similar.query_cost("mobilenet_v2")
    assert sorted(explorer.targets) == ["artist", "style"]


def test_a_painting_of_the_run_finds_itself_first(built: Run, explorer: Explorer) -> None:
    for image_id, path in _paintings(built, 3):
        answer = explorer.query(path, k=5)
        first = answer["paintings"][0]
        assert first["image_id"] == image_id
        assert first["score"] == pytest.approx(1.0, abs=1e-3)
        assert answer["paintings"][1]["score"] < first["score"]
        # Bytes and a PIL image of the same file give the same answer.
        same = [explorer.query(path.read_bytes(), k=5), explorer.query(Image.open(path), k=5)]
        for other in same:
            assert [p["image_id"] for p in other["paintings"]] == \
                [p["image_id"] for p in answer["paintings"]]
        # Asked by id, the painting is left out and the rest of the list is the same.
        by_id = explorer.neighbours_of(image_id, k=4)
        assert image_id not in [p["image_id"] for p in by_id["paintings"]]
        assert [p["image_id"] for p in by_id["paintings"]] == \
            [p["image_id"] for p in answer["paintings"][1:]]


def test_json_output_is_one_object_per_line_in_the_design_schema(
        built: Run, capsys: pytest.CaptureFixture) -> None:
    picked = _paintings(built, 3)
    paths = [str(p) for _, p in picked]
    row = {image_id: n for n, image_id in enumerate(built.catalog()["image_id"])}
    assert main(["similar", "--run", str(built.root), "--json", "--k", "7",
                 "--features", "mobilenet_v2", *paths]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(paths)
    clustering = load_clustering(built, "mobilenet_v2")
    for line, path, (image_id, _) in zip(lines, paths, picked, strict=True):
        answer = json.loads(line)
        assert set(answer) == ANSWER_KEYS
        assert answer["query"] == path
        assert answer["features"] == "mobilenet_v2"
        assert isinstance(answer["seconds"], float)

        paintings = answer["paintings"]
        assert len(paintings) == 7
        assert all(set(p) == PAINTING_KEYS for p in paintings)
        assert all(isinstance(p["image_id"], str) and isinstance(p["file"], str)
                   and isinstance(p["artist"], str) and isinstance(p["title"], str)
                   and isinstance(p["score"], float) for p in paintings)
        scores = [p["score"] for p in paintings]
        assert scores == sorted(scores, reverse=True)
        assert -1 <= scores[-1] <= scores[0] <= 1.001

        artists = answer["artists"]
        assert artists
        assert all(set(a) == {"artist", "artist_id", "score", "paintings"}
                               for a in artists)
        # The id is the one the explorer's artist pages use.
        assert all(a["artist_id"] == artist_slug(a["artist"]) for a in artists)
        assert all(isinstance(a["artist"], str) and isinstance(a["score"], float)
                   and isinstance(a["paintings"], int) and a["paintings"] >= 1 for a in artists)
        assert [a["score"] for a in artists] == sorted((a["score"] for a in artists),
                                                       reverse=True)
        assert artists[0]["artist"] == paintings[0]["artist"]  # its own artist

        assert set(answer["predictions"]) == {"artist", "style"}
        for target, top in answer["predictions"].items():
            assert all(set(t) == {"label", "p"} and isinstance(t["label"], str)
                       and isinstance(t["p"], float) for t in top)
            p = [t["p"] for t in top]
            assert len(top) == min(5, len(read_json(
                built.models_dir / f"{target}-mobilenet_v2.json")["classes"]))
            assert p == sorted(p, reverse=True)
            assert sum(p) <= 1 + 1e-3
            assert p[-1] >= 0
        assert answer["predictions"]["artist"][0]["label"] == paintings[0]["artist"]

        clusters = answer["clusters"]
        k = clustering.summary["gmm"]["k"]
        assert clusters
        assert all(set(c) == {"cluster", "p"} and isinstance(c["cluster"], int)
                                and isinstance(c["p"], float) for c in clusters)
        assert all(0 <= c["cluster"] < k for c in clusters)
        p = [c["p"] for c in clusters]
        assert p == sorted(p, reverse=True)
        assert sum(p) == pytest.approx(1.0, abs=0.05)
        # The clusters are the GMM's responsibilities (the query is the stored painting's twin).
        stored = built.features("mobilenet_v2")[[row[image_id]]]
        expected = clustering.responsibilities(stored)[0]
        assert clusters[0]["cluster"] == int(np.argmax(expected))
        assert clusters[0]["p"] == pytest.approx(float(expected.max()), abs=0.01)
        # It lands on the map near the stored painting (UMAP's transform of its twin is an
        # approximation: about 7% of the map apart on this slice).
        a = clustering.assignments
        own = a.iloc[row[image_id]]
        span = max(np.ptp(a["umap_x"]), np.ptp(a["umap_y"]))
        assert np.hypot(answer["position"][0] - own["umap_x"],
                        answer["position"][1] - own["umap_y"]) < 0.15 * span


def test_bad_queries_each_get_one_line_and_the_good_ones_still_answer(
        built: Run, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (good_id, good), (other_id, other) = _paintings(built, 2)
    text = tmp_path / "notes.jpg"
    text.write_text("not a picture\n")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 3])
    bomb = _bomb_png(tmp_path / "bomb.png")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images here")
    bad = {str(tmp_path / "missing.jpg"): "not found", str(text): "not an image",
           str(truncated): "truncated", str(bomb): "bomb", str(empty): "no image files"}
    # A folder is queried image by image (recursively, by suffix, in name order).
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    (folder / "a.jpg").write_bytes(good.read_bytes())
    (folder / "nested" / "b.JPG").write_bytes(other.read_bytes())
    (folder / "list.txt").write_text("not an image suffix: skipped")
    queries = [str(good), *bad, str(folder)]
    root = str(built.root)

    assert main(["similar", "--run", root, "--json", "--k", "3", *queries]) == 1
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["query"] for a in answers] == [*queries[:-1], str(folder / "a.jpg"),
                                             str(folder / "nested" / "b.JPG")]
    for answer in answers[1:-2]:
        assert set(answer) == {"query", "error"}
        assert bad[answer["query"]] in answer["error"]
        assert "\n" not in answer["error"]
    assert answers[0]["paintings"][0]["score"] == pytest.approx(1.0, abs=1e-3)
    assert [a["paintings"][0]["image_id"] for a in (answers[0], *answers[-2:])] == \
        [good_id, good_id, other_id]

    assert main(["similar", "--run", root, "--k", "3", *queries[:-1]]) == 1
    out, err = capsys.readouterr()
    errors = err.strip().splitlines()
    assert len(errors) == len(bad)
    for line, (path, reason) in zip(errors, bad.items(), strict=True):
        assert line.startswith(f"error: {path}: ")
        assert reason in line
    assert out.count(f"== {good} ") == 1
    assert "similar artist" in out


def test_the_model_and_index_load_once_for_many_queries(
        built: Run, explorer: Explorer, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    loads = {"extractor": 0, "index": 0}

    def counted(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            loads[name] += 1
            return real(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(similar, "load_extractor", counted("extractor", similar.load_extractor))
    monkeypatch.setattr(similar, "load_index", counted("index", similar.load_index))
    paths = [str(p) for _, p in _paintings(built, 4)]
    assert main(["similar", "--run", str(built.root), "--json", *paths, *paths]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 8
    assert loads == {"extractor": 1, "index": 1}
    # A long-lived Explorer (the app's) keeps the same model and index across queries.
    extractor, index = explorer._extractor, explorer._index
    for path in paths * 3:
        explorer.query(path, k=2)
    assert explorer._extractor is extractor
    assert explorer._index is index


def test_unusable_requests_are_clear_errors(built: Run, explorer: Explorer,
                                            capsys: pytest.CaptureFixture) -> None:
    (_, good), = _paintings(built, 1)
    assert main(["similar", "--run", str(built.root), "--features", "nope", str(good)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "'nope' is not indexed" in err
    with pytest.raises(InfluenceError, match="k must be at least 1"):
        explorer.query(good, k=0)
    with pytest.raises(InfluenceError, match="no painting with image_id"):
        explorer.neighbours_of("0" * 16)
    tiny = explorer.query(Image.new("RGB", (8, 8)))
    assert set(tiny) == {"query", "error"}
    assert "too small" in tiny["error"]


def test_with_flip_a_picture_and_its_mirror_image_get_the_same_answer(
        built: Run, tmp_path: Path) -> None:
    flipping, plain = Explorer(built, "mobilenet_v2", flip=True), Explorer(built, "mobilenet_v2")
    (image_id, path), = _paintings(built, 1)
    with Image.open(path) as im:
        im.convert("RGB").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(tmp_path / "m.png")
    answers = [flipping.query(p, k=5) for p in (path, tmp_path / "m.png")]
    first, second = answers
    assert [p["image_id"] for p in first["paintings"]] == [p["image_id"]
                                                           for p in second["paintings"]]
    assert [p["score"] for p in first["paintings"]] == pytest.approx(
        [p["score"] for p in second["paintings"]], abs=2e-3)
    for target, top in first["predictions"].items():
        assert [t["label"] for t in top] == [t["label"] for t in second["predictions"][target]]
        assert [t["p"] for t in top] == pytest.approx(
            [t["p"] for t in second["predictions"][target]], abs=2e-3)
    # Averaging over the mirror image really changes the answer (it is not a no-op).
    alone = plain.query(path, k=5)
    assert answers[0]["paintings"][0]["image_id"] == image_id
    assert answers[0]["paintings"][0]["score"] < alone["paintings"][0]["score"]
