"""The read-only run API (filters, search, cluster members, regions, label shares) and the
`export` stage, on a small clustered run of the shared collection."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from influence.export import cluster_export, inert, table_bytes
from influence.pipeline import main
from influence.readers import load_clustering
from influence.runs import InfluenceError, Run
from influence.selections import (
    Filter,
    cluster_members,
    cluster_sizes,
    in_region,
    label_shares,
    search_catalog,
)

FEATURES = "mobilenet_v2"


@pytest.fixture(scope="module")
def catalog(explored_run: Run) -> pd.DataFrame:
    return explored_run.catalog()


def test_filter_keeps_only_matching_paintings_and_round_trips_through_the_url(
        catalog: pd.DataFrame) -> None:
    where = Filter.from_query({"style": "Baroque|Rococo", "year_from": "1640",
                               "nationality": ""})
    keep = where.mask(catalog)
    years = catalog["era_year"].astype("Float64")
    expected = (catalog["style"].isin(["Baroque", "Rococo"]) & (years >= 1640)).fillna(False)
    assert keep.sum() > 0
    assert (keep == expected.to_numpy(dtype=bool)).all()
    assert Filter.from_query(where.to_query()) == where
    assert not Filter()
    assert Filter().mask(catalog).all()
    with pytest.raises(InfluenceError, match="year-to must be a year"):
        Filter.from_query({"year_to": "soon"})


def test_search_finds_artists_then_titles(catalog: pd.DataFrame) -> None:
    hits = search_catalog(catalog, "monet")
    assert hits[0] == {"kind": "artist", "value": "Claude Monet",
                       "label": "Claude Monet (artist, 30 paintings)"}
    row = catalog.iloc[37]
    words = str(row["title"]).split()[:3]
    found = search_catalog(catalog, " ".join(words).upper(), limit=50)
    assert row["image_id"] in [h["value"] for h in found if h["kind"] == "painting"]
    assert search_catalog(catalog, "   ") == []
    assert search_catalog(catalog, "zzqqxx") == []


def test_cluster_members_hard_and_soft_match_the_stored_clustering(explored_run: Run) -> None:
    clustering = load_clustering(explored_run, FEATURES)
    a = clustering.assignments
    p = np.load(explored_run.clusters_dir / FEATURES / "responsibilities.npy")
    for cluster, size in cluster_sizes(clustering, "gmm").items():
        members = cluster_members(clustering, "gmm", cluster, min_p=0.05)
        hard = members[members["member"] == "hard"]
        assert len(hard) == size == int((a["gmm"] == cluster).sum())
        soft = members[members["member"] == "soft"]
        expected_soft = np.flatnonzero((p[:, cluster] >= 0.05) & (a["gmm"] != cluster))
        assert sorted(soft["row"]) == list(expected_soft)
        assert np.allclose(members["p"], p[members["row"], cluster])
    kmeans = cluster_members(clustering, "kmeans", 0)
    assert len(kmeans) == int((a["kmeans"] == 0).sum())
    assert kmeans["kmeans_distance"].is_monotonic_increasing


def test_regions_and_label_shares() -> None:
    x, y = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 2.0, 3.0])
    assert list(in_region(x, y, {"x": [2.5, 0.5], "y": [0.5, 2.5]})) == [False, True, True, False]
    triangle = {"lasso_x": [-1, 4, -1], "lasso_y": [-1, -1, 4]}
    assert list(in_region(x, y, triangle)) == [True, True, False, False]
    catalog = pd.DataFrame({"artist": ["a", "a", "b", "b"], "nationality": ["x", "y", "x", "x"]})
    shares = label_shares(catalog, np.array([0, 2]))
    artists = shares[shares["field"] == "artist"].set_index("value")
    assert artists.loc["a", "share"] == 0.5
    assert artists.loc["a", "collection_share"] == 0.5
    nationality = shares[shares["field"] == "nationality"].set_index("value")
    assert nationality.loc["x", "share"] == 1.0
    assert nationality.loc["x", "lift"] == pytest.approx(1 / 0.75)


def test_export_stage_writes_a_cluster_as_the_app_does(explored_run: Run, catalog: pd.DataFrame,
                                                       tmp_path: Path) -> None:
    before = sorted(p.relative_to(explored_run.root) for p in explored_run.root.rglob("*"))
    assert main(["--no-progress", "export", "--run", str(explored_run.root), "--cluster", "1",
                 "--features", FEATURES, "--method", "gmm", "--min-p", "0.1",
                 "--out", str(tmp_path)]) == 0
    assert sorted(p.relative_to(explored_run.root) for p in explored_run.root.rglob("*")) \
        == before
    name = f"{explored_run.root.name}_{FEATURES}_gmm-cluster-1_p0.1"
    csv, parquet = tmp_path / f"{name}.csv", tmp_path / f"{name}.parquet"
    table = pd.read_parquet(parquet)
    members = cluster_members(load_clustering(explored_run, FEATURES), "gmm", 1, 0.1)
    assert list(table["image_id"]) == list(members["image_id"])
    assert {"title", "artist", "style", "year", "member", "p"} <= set(table.columns)
    assert (table["p"] >= 0.1).all()
    assert list(pd.read_csv(csv)["image_id"]) == list(table["image_id"])
    # The app's download button sends exactly the bytes the stage wrote.
    export = cluster_export(explored_run.root.name, catalog,
                            load_clustering(explored_run, FEATURES), "gmm", 1, 0.1)
    assert table_bytes(export.frame, "csv") == csv.read_bytes()
    # A filter narrows the members, and the name says so.
    monet = cluster_export(explored_run.root.name, catalog, load_clustering(
        explored_run, FEATURES), "gmm", 1, 0.1, Filter(artist=("Claude Monet",)))
    assert list(monet.frame["image_id"]) == [i for i, a in zip(
        table["image_id"], table["artist"], strict=True) if a == "Claude Monet"]
    assert monet.name == f"{name}_filter_artist-claude-monet"


def test_export_stage_filters_and_chosen_ids(explored_run: Run, catalog: pd.DataFrame,
                                             tmp_path: Path, capsys) -> None:
    run = str(explored_run.root)
    assert main(["export", "--run", run, "--style", "Baroque", "--format", "csv",
                 "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / f"{explored_run.root.name}_filter_style-baroque.csv")
    assert len(table) == int((catalog["style"] == "Baroque").sum()) > 0
    ids = list(catalog["image_id"].iloc[[5, 3, 50]])
    assert main(["export", "--run", run, "--ids", ",".join(ids), "--format", "parquet",
                 "--out", str(tmp_path)]) == 0
    assert list(pd.read_parquet(tmp_path / f"{explored_run.root.name}_selection-3.parquet")
                ["image_id"]) == ids
    capsys.readouterr()
    assert main(["export", "--run", run, "--ids", "ffffffffffffffff"]) == 2
    assert main(["export", "--run", run]) == 2
    assert main(["export", "--run", run, "--cluster", "0", "--ids", ids[0]]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 3
    assert all(e.startswith("error: ") for e in errors)
    assert "not in the run" in errors[0]
    assert "nothing to export" in errors[1]


def test_export_stage_writes_the_influence_tables(explored_run: Run, tmp_path: Path) -> None:
    from influence.influence import load_influence

    pairs = load_influence(explored_run).pairs
    assert main(["export", "--run", str(explored_run.root), "--table", "pairs",
                 "--out", str(tmp_path)]) == 0
    name = f"{explored_run.root.name}_influence-pairs_{FEATURES}"
    table = pd.read_parquet(tmp_path / f"{name}.parquet")
    assert list(table["artist"]) == list(pairs["artist"])
    assert len(table) == len(pairs)
    flat = pd.read_csv(tmp_path / f"{name}.csv")
    first = json.loads(flat["evidence"].iat[0])
    assert [e["image_id"] for e in first] == [e["image_id"] for e in pairs["evidence"].iat[0]]


def test_csv_cells_a_spreadsheet_would_run_are_inert_and_parquet_is_untouched(
        explored_run: Run, catalog: pd.DataFrame) -> None:
    """OWASP's CSV-injection rule: a cell starting with = + - @ tab or CR gets a leading
    quote in the CSV; numbers (a year -12, a title "-12") stay as they are; the Parquet file and
    the run keep the text exactly."""
    titles = ['=HYPERLINK("http://example.com/x","click")', "-12", "+SUM(A1:A3)", "@cmd",
              "\tTabbed", "\rReturn", "-1+1", "'=quoted already", "Water Lilies"]
    frame = catalog.head(len(titles)).copy()
    frame["title"] = titles
    frame["year"] = pd.array([-12, *frame["year"].iloc[1:]], dtype="Int64")
    parsed = pd.DataFrame(csv.DictReader(io.StringIO(table_bytes(frame, "csv").decode(),
                                                  newline="")))
    assert parsed["title"].tolist() == [
        '\'=HYPERLINK("http://example.com/x","click")', "-12", "'+SUM(A1:A3)", "'@cmd",
        "'\tTabbed", "'\rReturn", "'-1+1", "''=quoted already", "Water Lilies"]
    assert parsed["year"].iloc[0] == "-12"
    # Taking one leading quote off a cell that starts with a quote and a formula character
    # gives the text back.
    restored = [t[1:] if t.startswith("'") and inert(t[1:]) != t[1:] else t
                for t in parsed["title"]]
    assert restored == titles
    assert pd.read_parquet(io.BytesIO(table_bytes(frame, "parquet")))["title"].tolist() == titles
    assert explored_run.damaged() == []
