"""Combined feature sets: the stored rows, up-to-date records, every stage and queries on them."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA
from sklearn.preprocessing import normalize

from influence.combine import build_combined, canonical, parse
from influence.commands import cmd_index, cmd_train
from influence.pipeline import main
from influence.runs import InfluenceError, Run, read_json, write_json
from influence.similar import Explorer

from .test_index import copy_run

SPEC = "mobilenet_v2+pca@0.5"
WHITENED = "mobilenet_v2+pca~w20"


@pytest.fixture(scope="module")
def combined(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The small run with `mobilenet_v2+pca@0.5` indexed and an artist head on it."""
    run = copy_run(small_run, tmp_path_factory.mktemp("combined"))
    assert main(["--no-progress", "combine", "--run", str(run.root), SPEC]) == 0
    assert cmd_index(run=str(run.root), features=f"{SPEC},{WHITENED}", progress=False) == 0
    assert cmd_train(run=str(run.root), target="artist", features=SPEC, progress=False) == 0
    return run


def test_rows_are_the_normalised_weighted_parts_side_by_side(combined: Run) -> None:
    x = np.asarray(combined.features(SPEC))
    mobilenet, pca = (np.asarray(combined.features(n)) for n in ("mobilenet_v2", "pca"))
    assert x.dtype == np.float32
    assert x.shape == (len(combined.catalog()), 1280 + pca.shape[1])
    np.testing.assert_allclose(x[:, :1280], normalize(mobilenet), atol=1e-6)
    np.testing.assert_allclose(x[:, 1280:], 0.5 * normalize(pca), atol=1e-6)
    info = combined.features_info(SPEC)
    assert [(p["name"], p["weight"], p["dim"]) for p in info["parts"]] == [
        ("mobilenet_v2", 1.0, 1280), ("pca", 0.5, pca.shape[1])]
    assert "mobilenet_v2: file" in info["weights"]
    assert SPEC in combined.feature_names()


def test_whitened_parts_are_pca_whitened_normalised_rows(combined: Run) -> None:
    x = np.asarray(combined.features(WHITENED))
    assert x.shape == (len(combined.catalog()), 40)
    for block, name in ((x[:, :20], "mobilenet_v2"), (x[:, 20:], "pca")):
        part = normalize(np.asarray(combined.features(name)))
        pca = PCA(20, whiten=True, random_state=0).fit(part)
        np.testing.assert_allclose(block, normalize(pca.transform(part)), atol=1e-4)
        # Whitened: every kept direction has the same spread over the collection.
        spread = (block * np.sqrt(20)).std(axis=0)
        assert spread.max() / spread.min() < 2.5
    assert combined.features_info(WHITENED)["whiten"] == 20


def test_kept_while_parts_are_unchanged_and_rebuilt_when_one_changes(
        combined: Run, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = copy_run(combined, tmp_path_factory.mktemp("changed"))
    assert build_combined(run, SPEC)["up_to_date"]
    manifest = run.manifest()
    manifest["steps"]["extract"]["pca"]["key"] = "pca extracted again"
    manifest["steps"]["extract"]["pca"]["fit"]["key"] = "pca extracted again"
    write_json(run.manifest_path, manifest)
    assert not build_combined(run, SPEC)["up_to_date"]
    assert build_combined(run, "mobilenet_v2+pca@0.50")["up_to_date"]


def test_stages_read_it_like_any_other_set_and_name_it_in_their_records(combined: Run) -> None:
    index = read_json(combined.index_dir / f"{SPEC}.json")
    assert index["rows"] == len(combined.catalog())
    assert index["dim"] == combined.features(SPEC).shape[1]
    head = read_json(combined.models_dir / f"artist-{SPEC}.json")
    assert head["features"] == SPEC
    assert head["accuracy"] > 0.5
    # Recorded as a step, so the index and heads see when it changes.
    key = combined.step_key("extract", SPEC)
    assert key
    assert combined.step_record("index", SPEC)["inputs"]["features"] == key


@pytest.mark.parametrize("spec", [SPEC, WHITENED])
def test_a_query_is_embedded_by_each_part_and_finds_its_painting(combined: Run,
                                                                 spec: str) -> None:
    explorer = Explorer(combined, spec)
    for row in combined.catalog().groupby("artist").head(1).head(2).itertuples():
        answer = explorer.query(combined.image_path(row.file), k=3)
        assert answer["paintings"][0]["image_id"] == row.image_id
        assert answer["paintings"][0]["score"] == pytest.approx(1.0, abs=1e-3)
        assert bool(answer["predictions"]) == (spec == SPEC)


@pytest.mark.parametrize(("spec", "message"), [
    ("mobilenet_v2", "two or more different parts"),
    ("pca+pca", "two or more different parts"),
    ("pca+mobilenet_v2@0", "weight > 0"),
    ("pca+mobilenet_v2@x", "weight > 0"),
    ("pca+nope", "no features 'nope'"),
    ("pca+mobilenet_v2~w0", "at least 1 dimension"),
])
def test_bad_specs_are_one_line_errors(small_run: Run, spec: str, message: str) -> None:
    with pytest.raises(InfluenceError, match=message):
        build_combined(small_run, spec)


def test_names_are_canonical() -> None:
    assert canonical("a@1+b@0.50") == "a+b@0.5"
    assert [p.weight for p in parse("a+b@2")] == [1.0, 2.0]
    assert canonical("a@1.0+b~w64") == "a+b~w64"
    assert parse("a+b~w64")[1].name == "b"
