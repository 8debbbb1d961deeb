"""The `influence` stage on a slice of the shared collection: files and schemas, the time rule,
evidence that is really in the index, and an evaluation scikit-learn agrees with."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from influence import influence as influence_stage
from influence.catalog import artist_slug
from influence.commands import cmd_cluster, cmd_index
from influence.index import load_index, search
from influence.influence import active_years, load_influence, time_rule
from influence.pipeline import main
from influence.readers import load_clustering
from influence.runs import Run, read_json

from .conftest import ARTISTS
from .test_index import copy_run

FEATURES = "mobilenet_v2"
#: Recorded influences for the slice: two plausible ones, one against the time rule (Monet did
#: not influence Rembrandt) and one naming an artist outside the collection.
RECORDED = pd.DataFrame({
    "artist": ["Alfred Sisley", "Francois Boucher", "Rembrandt", "Alfred Sisley"],
    "influenced_by": ["Claude Monet", "Rembrandt", "Claude Monet", "Nobody Known"],
})


@pytest.fixture(scope="module")
def recorded_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("recorded") / "influences.csv"
    RECORDED.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def built(small_run: Run, tmp_path_factory: pytest.TempPathFactory, recorded_csv: Path) -> Run:
    """A private copy of the fixture run, clustered, indexed and with the influence stage."""
    run = copy_run(small_run, tmp_path_factory.mktemp("influence-run"))
    assert cmd_cluster(run=str(run.root), features=FEATURES, k_min=2, k_max=6,
                       progress=False) == 0
    assert cmd_index(run=str(run.root), features=FEATURES, progress=False) == 0
    assert main(["--no-progress", "influence", "--run", str(run.root), "--features", FEATURES,
                 "--recorded", str(recorded_csv)]) == 0
    return run


def test_artist_slug_is_url_safe_and_stable() -> None:
    assert artist_slug("Claude Monet") == "claude-monet"
    assert artist_slug("Jean-Baptiste-Simeon Chardin") == "jean-baptiste-simeon-chardin"
    assert artist_slug("Gustave Doré") == "gustave-dore"
    assert artist_slug("  El  Greco ") == "el-greco"


def test_active_years_from_dated_works_else_from_life() -> None:
    catalog = pd.DataFrame({
        "artist": ["Dated"] * 3 + ["Lived"] * 2 + ["Born"] + ["Died"] + ["Unknown"],
        "year": [1850, 1870, 1860, 1700, np.nan, np.nan, np.nan, np.nan],
        "birth_year": [1830] * 3 + [1650] * 2 + [1600, np.nan, np.nan],
        "death_year": [1900] * 3 + [1710] * 2 + [np.nan, 1800, np.nan],
    })
    years = active_years(catalog).set_index("artist")
    assert tuple(years.loc["Dated", ["active_start", "active_end"]]) == (1850, 1870)
    assert years.loc["Dated", "active_source"] == "dated works"
    # One dated work is too few: the working life is age 20 to death.
    assert tuple(years.loc["Lived", ["active_start", "active_end"]]) == (1670, 1710)
    assert years.loc["Lived", "active_source"] == "life"
    assert tuple(years.loc["Born", ["active_start", "active_end"]]) == (1620, 1660)
    assert tuple(years.loc["Died", ["active_start", "active_end"]]) == (1760, 1800)
    assert np.isnan(years.loc["Unknown", "active_mid"])
    assert pd.isna(years.loc["Unknown", "active_source"])


def test_each_artists_mixes_and_nationality_are_pandas_own_counts(built: Run) -> None:
    """The artists table counts all artists at once; per artist it must say what pandas's
    `value_counts` (shares, largest first, ties as they come) and `mode` say of that artist."""
    inf = load_influence(built)
    catalog = built.catalog()
    families = pd.Series(load_clustering(built, FEATURES).assignments["kmeans"].to_numpy(),
                         index=catalog.index)
    table = inf.artists.set_index("artist")
    assert list(table.index) == sorted(catalog["artist"].dropna().unique())
    for artist, group in catalog.groupby("artist"):
        row = table.loc[artist]
        for column, field in (("style", "styles"), ("genre", "genres")):
            shares = group[column].dropna().astype(str).value_counts(normalize=True)
            assert [(m["label"], m["share"]) for m in row[field]] == \
                [(k, round(float(v), 4)) for k, v in shares.items()]
        assert row["paintings"] == len(group)
        assert row["nationality"] == group["nationality"].dropna().astype(str).mode().iat[0]
        shares = families[group.index].value_counts(normalize=True)
        assert [(m["cluster"], m["share"]) for m in row["families"]] == \
            [(int(k), round(float(v), 4)) for k, v in shares.items()]
        assert row["family"] == int(shares.index[0])


def test_time_rule_orders_pairs_and_keeps_undated_both_ways() -> None:
    artists = pd.DataFrame({"active_start": [1600, 1640, 1700, np.nan],
                            "active_end": [1640, 1680, 1750, np.nan]})
    artists["active_mid"] = (artists["active_start"] + artists["active_end"]) / 2
    allowed, relation = time_rule(artists)
    # 0 (1600-1640) may have influenced 1 (1640-1680, middle 1660): alongside, overlapping.
    assert allowed[1, 0]
    assert relation[1, 0] == "alongside"
    assert not allowed[0, 1]  # 1 began in 1640, after 0's middle (1620)
    assert allowed[2, 0]
    assert relation[2, 0] == "earlier"
    assert not allowed[0, 2]
    assert allowed[3].sum() == 3
    assert allowed[:, 3].sum() == 3
    assert relation[3, 0] == relation[0, 3] == "undated"
    assert not allowed.diagonal().any()


def test_dates_a_painter_could_not_have_made_are_ignored_and_counted() -> None:
    catalog = pd.DataFrame({
        "artist": ["Slipped"] * 5,
        # 1650: before birth (a catalogue error); 1800: 20 years after death.
        "year": [1650, 1740, 1750, 1760, 1800],
        "birth_year": [1700] * 5, "death_year": [1780] * 5,
    })
    years = active_years(catalog).set_index("artist").loc["Slipped"]
    assert (years["active_start"], years["active_end"]) == (1740, 1760)
    assert years["dates_ignored"] == 2
    kept = influence_stage.plausible_years(catalog)
    assert kept.isna().tolist() == [True, False, False, False, True]


def test_no_influencer_born_after_the_artist_died() -> None:
    # 1 is dated early by (wrong) works but was born after 0 died: never 0's influence.
    artists = pd.DataFrame({"active_start": [1700, 1690], "active_end": [1720, 1760],
                            "birth_year": [1684, 1763], "death_year": [1721, 1804]})
    artists["active_mid"] = (artists["active_start"] + artists["active_end"]) / 2
    allowed, _ = time_rule(artists)
    assert not allowed[0, 1]


def test_the_pages_evidence_respects_time_and_undated_candidates_come_last(built: Run) -> None:
    inf = load_influence(built)
    catalog = built.catalog()
    year = dict(zip(catalog["image_id"], influence_stage.plausible_years(catalog), strict=True))
    checked = 0
    for pair in inf.pairs.itertuples():
        for e in pair.evidence:
            mine, theirs = year[e["image_id"]], year[e["influenced_by_image_id"]]
            if not np.isnan(mine + theirs):
                checked += 1
                assert theirs <= mine, (pair.artist, pair.influenced_by, e)
    assert checked > 0
    dated = inf.artists.set_index("artist")["active_mid"].notna()
    for artist, group in inf.pairs.groupby("artist"):
        order = group.sort_values("rank")
        apart = (order["relation"] == "undated") & dated[artist]
        assert list(apart) == sorted(apart)  # every undated candidate after every dated one
        assert list(order["rank"]) == list(range(1, len(order) + 1))
    assert (inf.pairs["offered"] == (inf.pairs["score"] > influence_stage.FLOOR)).all()
    assert inf.pairs["percentile"].between(0, 100).all()
    for name in inf.artists["artist"]:
        shown = inf.earlier(name)
        assert ((shown["score"] > influence_stage.FLOOR) | shown["recorded"]).all()
        assert (shown["relation"] != "undated").all()
    audit = inf.summary["audit"]
    assert audit["evidence_backwards_in_time"] == 0
    assert audit["influencer_born_after_death"] == audit["undated_ranked_above_dated"] == 0


def test_time_part_pushes_down_candidates_who_started_later() -> None:
    artists = pd.DataFrame({"active_start": [1600, 1605, 1630, 1590, np.nan]})
    timing = influence_stage.seniority(artists)
    assert timing[0, 3] == 0  # began earlier: no penalty
    assert timing[0, 1] == pytest.approx(-influence_stage.LATE_PENALTY / 2)  # 5 of 10 years later
    assert timing[0, 2] == -influence_stage.LATE_PENALTY  # 30 years later: the full penalty
    assert timing[0, 4] == timing[4, 0] == 0  # undated: no time part


def test_files_and_schemas(built: Run) -> None:
    inf = load_influence(built)
    assert inf.features == FEATURES
    catalog = built.catalog()
    artists = inf.artists
    assert sorted(artists["artist"]) == sorted(ARTISTS)
    assert {"artist", "artist_id", "paintings", "nationality", "birth_year", "death_year",
            "active_start", "active_end", "active_mid", "active_source", "styles", "genres",
            "families", "family"} <= set(artists.columns)
    assert artists["paintings"].sum() == catalog["artist"].notna().sum()
    for row in artists.itertuples():
        assert sum(f["share"] for f in row.families) == pytest.approx(1, abs=1e-3)
        assert row.family == row.families[0]["cluster"]
        assert sum(s["share"] for s in row.styles) == pytest.approx(1, abs=1e-3)
        assert row.active_start <= row.active_mid <= row.active_end
    monet = inf.artist("claude-monet")
    assert monet is not None
    assert monet["artist"] == "Claude Monet"
    assert inf.artist("no-such-artist") is None

    pairs = inf.pairs
    assert {"artist", "influenced_by", "score", "visual", "reverse", "time", "relation", "gap",
            "rank", "recorded", "evidence"} <= set(pairs.columns)
    assert not (pairs["artist"] == pairs["influenced_by"]).any()
    assert not pairs.duplicated(["artist", "influenced_by"]).any()
    # Every unordered pair of artists is scored in at least one direction.
    unordered = {frozenset(p) for p in zip(pairs["artist"], pairs["influenced_by"], strict=True)}
    assert len(unordered) == len(ARTISTS) * (len(ARTISTS) - 1) // 2
    # The score is made of its parts, and ranks follow it within each artist.
    assert np.allclose(pairs["score"], (pairs["visual"] + pairs["reverse"]) / 2 + pairs["time"],
                       atol=2e-4)
    assert (pairs["time"] <= 0).all()
    assert (pairs["time"] >= -influence_stage.LATE_PENALTY).all()
    for _, group in pairs.groupby("artist"):
        dated = group[group["relation"] != "undated"].sort_values("rank")
        assert list(dated["score"]) == sorted(dated["score"], reverse=True)

    flows = inf.flows
    assert set(flows["dimension"]) == {"era", "nationality"}
    shares = flows.groupby(["dimension", "family"])["share"].sum()
    assert np.allclose(shares, 1.0)
    era_counts = flows[flows["dimension"] == "era"]["count"].sum()
    assert era_counts == catalog["era"].notna().sum()
    assert np.allclose(flows["lift"], flows["share"] / flows["collection_share"])


def test_every_pair_obeys_the_time_rule(built: Run) -> None:
    inf = load_influence(built)
    years = inf.artists.set_index("artist")
    for pair in inf.pairs.itertuples():
        a, b = years.loc[pair.artist], years.loc[pair.influenced_by]
        assert b.active_start <= a.active_mid, (pair.artist, pair.influenced_by)
        expected = "earlier" if b.active_end < a.active_start else "alongside"
        assert pair.relation == expected
        assert pair.gap == pytest.approx(a.active_mid - b.active_mid, abs=1e-3)


def test_evidence_pairs_are_neighbours_in_the_index(built: Run) -> None:
    inf = load_influence(built)
    catalog = built.catalog()
    artist_of = dict(zip(catalog["image_id"], catalog["artist"], strict=True))
    row_of = {i: n for n, i in enumerate(catalog["image_id"])}
    index = load_index(built, FEATURES)
    x = np.asarray(built.features(FEATURES))
    _, found = search(index, x, influence_stage.POOL + 1)
    with_evidence = 0
    for pair in inf.pairs.itertuples():
        sims = [e["similarity"] for e in pair.evidence]
        assert sims == sorted(sims, reverse=True)
        assert len(pair.evidence) <= influence_stage.EVIDENCE
        with_evidence += len(pair.evidence) > 0
        for e in pair.evidence:
            a, b = row_of[e["image_id"]], row_of[e["influenced_by_image_id"]]
            assert artist_of[e["image_id"]] == pair.artist
            assert artist_of[e["influenced_by_image_id"]] == pair.influenced_by
            assert b in found[a] or a in found[b]
            cosine = float(x[a] @ x[b] / np.linalg.norm(x[a]) / np.linalg.norm(x[b]))
            assert e["similarity"] == pytest.approx(cosine, abs=1e-3)
    assert with_evidence == len(inf.pairs)  # 180 paintings: every artist pair is linked


def test_evaluation_matches_scikit_learn_recomputed_from_pairs(built: Run) -> None:
    inf = load_influence(built)
    evaluation = inf.evaluation
    assert evaluation is not None
    assert evaluation["edges"] == len(RECORDED)
    assert evaluation["unknown_artists"] == ["Alfred Sisley <- Nobody Known"]
    assert evaluation["against_time_rule"] == ["Rembrandt <- Claude Monet"]
    pairs = inf.pairs
    best = (pairs.assign(key=[frozenset(p) for p in zip(pairs["artist"], pairs["influenced_by"],
                                                          strict=True)])
            .groupby("key")["score"].max())
    positive = {frozenset(p) for p in zip(RECORDED["artist"], RECORDED["influenced_by"],
                                          strict=True)}
    expected = roc_auc_score([k in positive for k in best.index], best.to_numpy())
    assert evaluation["results"]["method"]["auc"] == pytest.approx(expected, abs=1e-4)
    # hit@5 and reciprocal rank from the pairs' own ranks.
    ranks = []
    for artist, group in RECORDED.groupby("artist"):
        found = pairs[(pairs["artist"] == artist) & pairs["influenced_by"].isin(
            group["influenced_by"])]["rank"]
        ranks.append(found.min() if len(found) else None)
    method = evaluation["results"]["method"]
    assert method["hit@5"] == pytest.approx(np.mean([r is not None and r <= 5 for r in ranks]),
                                            abs=1e-4)
    assert method["mrr"] == pytest.approx(np.mean([1 / r if r else 0 for r in ranks]), abs=1e-4)
    assert {r["scores"] for r in evaluation["table"]} == {"method", "mean_vector_cosine",
                                                         "metadata"}
    marked = pairs[pairs["recorded"]]
    assert set(zip(marked["artist"], marked["influenced_by"], strict=True)) == {
        ("Alfred Sisley", "Claude Monet"), ("Francois Boucher", "Rembrandt")}


def test_rerun_is_up_to_date_and_a_new_table_reevaluates(built: Run, recorded_csv: Path,
                                                        tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    args = ["--no-progress", "influence", "--run", str(built.root), "--features", FEATURES]
    summary = read_json(built.root / "influence" / "influence.json")
    assert main([*args, "--recorded", str(recorded_csv)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert read_json(built.root / "influence" / "influence.json") == summary
    other = tmp_path / "other.csv"
    RECORDED.head(1).to_csv(other, index=False)
    assert main([*args, "--recorded", str(other)]) == 0
    assert load_influence(built).evaluation["edges"] == 1
    assert built.step_record("influence", "tables")["params"]["recorded"] == str(other)


def test_bad_input_is_one_line(built: Run, small_run: Run, tmp_path: Path,
                               capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("painter,teacher\nA,B\n")
    assert main(["influence", "--run", str(built.root), "--recorded", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "influenced_by" in err
    bare = copy_run(small_run, tmp_path / "bare")
    assert cmd_index(run=str(bare.root), features=FEATURES, progress=False) == 0
    assert main(["influence", "--run", str(bare.root), "--features", FEATURES]) == 2
    err = capsys.readouterr().err
    assert "run `cluster` first" in err


def test_another_feature_set_and_back_rebuilds_the_tables(built: Run, recorded_csv: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    # RUN/influence/ holds one feature set's tables: going back to one computed before must not
    # pass for up to date while the files are the other set's.
    assert cmd_cluster(run=str(built.root), features="pca", k_min=2, k_max=4,
                       progress=False) == 0
    assert cmd_index(run=str(built.root), features="pca", progress=False) == 0
    for features in ("pca", FEATURES):
        capsys.readouterr()
        assert main(["--no-progress", "influence", "--run", str(built.root), "--features",
                     features, "--recorded", str(recorded_csv)]) == 0
        assert "up to date" not in capsys.readouterr().out
        assert load_influence(built).features == features
