"""import-features: three file layouts, rows aligned to the catalog, problems listed, one error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from influence.commands import cmd_index
from influence.import_features import import_features, problems_path
from influence.pipeline import main
from influence.runs import InfluenceError, Run
from influence.similar import Explorer

from .test_index import copy_run


@pytest.fixture(scope="module")
def run(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return copy_run(small_run, tmp_path_factory.mktemp("imported"))


@pytest.fixture(scope="module")
def vectors(run: Run) -> pd.DataFrame:
    """The run's pca features as an outside tool might give them: shuffled, keyed by file."""
    catalog = run.catalog()
    table = pd.DataFrame({"image_id": catalog["image_id"], "file": catalog["file"],
                          "vector": list(np.asarray(run.features("pca")))})
    return table.sample(frac=1.0, random_state=1).reset_index(drop=True)


def _write(vectors: pd.DataFrame, layout: str, folder: Path) -> list[str]:
    """The vectors in one layout; returns the command's file arguments."""
    if layout == "parquet-list":
        vectors[["image_id", "vector"]].to_parquet(folder / "v.parquet")
        return [str(folder / "v.parquet")]
    if layout == "csv-columns":
        columns = pd.DataFrame(np.stack(vectors["vector"]), columns=[
            f"d{i}" for i in range(len(vectors["vector"][0]))])
        pd.concat([vectors[["file"]], columns], axis=1).to_csv(folder / "v.csv", index=False)
        return [str(folder / "v.csv")]
    np.save(folder / "v.npy", np.stack(vectors["vector"]))
    vectors[["file"]].to_csv(folder / "ids.csv", index=False)
    return [str(folder / "v.npy"), "--ids", str(folder / "ids.csv")]


@pytest.mark.parametrize("layout", ["parquet-list", "csv-columns", "npy-ids"])
def test_each_layout_gives_the_vectors_in_catalog_order(run: Run, vectors: pd.DataFrame,
                                                        layout: str, tmp_path: Path) -> None:
    name = f"outside-{layout}"
    assert main(["--no-progress", "import-features", "--run", str(run.root), "--name", name,
                 *_write(vectors, layout, tmp_path)]) == 0
    np.testing.assert_allclose(run.features(name), run.features("pca"), rtol=1e-6)
    info = run.features_info(name)
    assert info["extractor"] == "imported"
    assert info["weights"].startswith("imported from")
    assert name in run.feature_names()
    assert not problems_path(run, name).exists()
    assert import_features(run, name, *[Path(a) for a in _write(vectors, layout, tmp_path)
                                        if a != "--ids"])["up_to_date"]


def test_problems_are_listed_with_reasons_and_stop_the_import(
        run: Run, vectors: pd.DataFrame, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = vectors.copy()
    bad.at[0, "vector"] = np.full(len(bad["vector"][0]), np.nan, dtype=np.float32)
    bad.at[1, "vector"] = bad["vector"][1][:5]
    missing = bad["image_id"][2]
    bad = pd.concat([bad.drop(index=2), bad.iloc[[3]],
                     pd.DataFrame({"image_id": ["0000000000000000"],
                                   "vector": [bad["vector"][4]]})], ignore_index=True)
    bad[["image_id", "vector"]].to_parquet(tmp_path / "bad.parquet")
    assert main(["import-features", "--run", str(run.root), "--name", "broken",
                 str(tmp_path / "bad.parquet")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "4 problem rows" in err
    listed = pd.read_csv(problems_path(run, "broken")).set_index("key")
    assert listed.loc[vectors["image_id"][0], "reason"] == "NaN or infinite values"
    assert listed.loc[vectors["image_id"][1], "reason"].startswith("dimension 5")
    assert listed.loc[missing, "reason"] == "no vector for this catalog painting"
    assert listed.loc[vectors["image_id"][3], "reason"] == "2 rows for one painting"
    assert listed.loc["0000000000000000", "kind"] == "unknown"
    assert "broken" not in run.feature_names()


def test_unknown_rows_alone_are_left_out_with_a_note(run: Run, vectors: pd.DataFrame,
                                                     tmp_path: Path) -> None:
    extra = pd.concat([vectors, pd.DataFrame({"image_id": ["ffffffffffffffff"],
                                              "vector": [vectors["vector"][0]]})])
    extra[["image_id", "vector"]].to_parquet(tmp_path / "extra.parquet")
    info = import_features(run, "extra", tmp_path / "extra.parquet")
    assert info["left_out_unknown"] == 1
    assert info["rows"] == len(run.catalog())
    assert pd.read_csv(problems_path(run, "extra"))["key"].tolist() == ["ffffffffffffffff"]


def test_an_imported_set_is_searched_but_cannot_embed_a_new_image(run: Run,
                                                                  vectors: pd.DataFrame,
                                                                  tmp_path: Path) -> None:
    import_features(run, "mine", Path(_write(vectors, "parquet-list", tmp_path)[0]))
    assert cmd_index(run=str(run.root), features="mine", progress=False) == 0
    explorer = Explorer(run, "mine")
    first = run.catalog()["image_id"][0]
    assert explorer.neighbours_of(first, k=3)["paintings"][0]["image_id"] != first
    answer = explorer.query(run.image_path(run.catalog()["file"][0]))
    assert "no extractor" in answer["error"]


@pytest.mark.parametrize(("name", "args", "message"), [
    ("mobilenet_v2", [], "not an extractor's name"),
    ("a/b", [], "use letters"),
    ("x", ["--ids"], "bare matrix"),
])
def test_bad_requests_are_one_line_errors(run: Run, vectors: pd.DataFrame, tmp_path: Path,
                                          name: str, args: list[str], message: str) -> None:
    files = _write(vectors, "npy-ids" if args else "parquet-list", tmp_path)[:1]
    with pytest.raises(InfluenceError, match=message):
        import_features(run, name, Path(files[0]))
