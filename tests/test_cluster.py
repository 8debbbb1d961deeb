"""The clustering stage: elbow rule, stored scores, GMM memberships, reproducibility, run files."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.datasets import make_blobs
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    normalized_mutual_info_score,
    pairwise_distances,
    silhouette_score,
)
from sklearn.neighbors import NearestNeighbors

from influence import cluster as clustering
from influence.cluster import FIELDS, cluster_features, fit_clustering
from influence.commands import cmd_cluster, cmd_extract
from influence.estimators.clustering import fit_rows, kneedle, silhouette, smooth_knn_dist
from influence.estimators.layout import ab_params, fuzzy_graph
from influence.readers import clustered_features, load_clustering
from influence.runs import InfluenceError, Run, read_json

from .conftest import COLLECTION, save_catalog

K_MIN, K_MAX = 2, 8
NAMES = ("mobilenet_v2", "pca")
ASSIGNMENT_COLUMNS = ["image_id", "kmeans", "kmeans_distance", "gmm", "gmm_p", "umap_x", "umap_y"]


def copy_run(run: Run, dest: Path) -> Run:
    """A private copy of a fixture run (catalog, features, manifest), so tests may write to it."""
    shutil.copytree(run.root, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.parts", "thumbs", "index", "models",
                                                  "clusters"))
    return Run(dest)


def cluster_copy(run: Run, dest: Path) -> Run:
    out = copy_run(run, dest)
    assert cmd_cluster(run=str(out.root), k_min=K_MIN, k_max=K_MAX, progress=False) == 0
    return out


@pytest.fixture(scope="module")
def clustered(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return cluster_copy(small_run, tmp_path_factory.mktemp("clustered"))


@pytest.fixture(scope="module")
def reclustered(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The same run clustered a second time from scratch, in another directory."""
    return cluster_copy(small_run, tmp_path_factory.mktemp("reclustered"))


def reduced(run: Run, name: str) -> np.ndarray:
    """The features as the stage reduced them, through the stored scaler + PCA."""
    reducer = load_clustering(run, name)._model["reducer"]
    return reducer.transform(np.asarray(run.features(name), dtype=np.float64)).astype(np.float32)


# ------------------------------------------------------------------------------------ elbow rule
def test_kneedle_finds_the_bend_of_a_hand_made_inertia_curve() -> None:
    k = [1, 2, 3, 4, 5, 6, 7]
    inertia = [100, 50, 20, 15, 12, 10, 9]
    # Scaled to [0, 1], the chord minus the curve is 0, .38, .55, .43, .30, .15, 0: k = 3.
    assert kneedle(k, inertia) == 2
    # The bend moves with the curve, and unevenly spaced k values are scaled by value.
    assert kneedle(k, [100, 90, 80, 20, 15, 12, 10]) == 3
    assert kneedle([2, 3, 4, 10], [100, 40, 35, 30]) == 1


def test_kneedle_reports_no_elbow_on_straight_flat_or_concave_curves() -> None:
    k = [2, 3, 4, 5, 6]
    assert kneedle(k, [50, 40, 30, 20, 10]) == -1
    assert kneedle(k, [7, 7, 7, 7, 7]) == -1
    assert kneedle(k, [100, 98, 94, 80, 10]) == -1
    with pytest.raises(InfluenceError, match="three points"):
        kneedle([2, 3], [10, 5])


def test_five_well_separated_blobs_give_five_clusters_by_every_rule() -> None:
    x, truth = make_blobs(n_samples=200, centers=5, n_features=8, cluster_std=0.6,
                          center_box=(-10, 10), random_state=0)
    result = fit_clustering(x, 2, 10, progress=False, gmm_sweep=True)
    assert result.clusters.k_ == 5
    assert result.clusters.choice_["method"].startswith("kneedle")
    assert result.clusters.choice_["silhouette_best_k"] == 5
    assert result.clusters.choice_["gmm_bic_best_k"] == 5
    assert adjusted_rand_score(truth, result.clusters.labels_) == 1.0
    assert adjusted_rand_score(truth, result.clusters.gmm_labels_) == 1.0
    assert result.clusters.sweep_["k"].tolist() == list(range(2, 11))
    embedding = result.projection.embedding_
    assert embedding.shape == (200, 2)
    assert np.isfinite(embedding).all()
    # New rows are placed among their nearest fitted rows: each blob's rows, placed again, land
    # nearest to their own blob's centre on the map.
    placed = result.projection.transform(result.reduced)
    centres = np.stack([embedding[truth == b].mean(axis=0) for b in range(5)])
    nearest = np.linalg.norm(placed[:, None] - centres[None], axis=2).argmin(axis=1)
    assert (nearest == truth).all()

    # By default the mixture is fitted at the chosen k only: the same memberships, no BIC curve.
    default = fit_clustering(x, 2, 10, progress=False)
    assert default.clusters.k_ == 5
    assert "gmm_bic_best_k" not in default.clusters.choice_
    bic = default.clusters.sweep_.set_index("k")["gmm_bic"]
    assert np.isfinite(bic[5])
    assert bic.drop(5).isna().all()
    assert adjusted_rand_score(default.clusters.gmm_labels_, result.clusters.gmm_labels_) == 1.0


def test_the_map_is_made_of_umaps_own_graph_and_curve() -> None:
    """The numpy smooth_knn_dist (which places new rows), the fuzzy graph and the (a, b) curve
    of the layout are umap-learn's own."""
    import umap.umap_

    x, _ = make_blobs(600, n_features=8, centers=5, random_state=0)
    x[1] = x[0]  # a duplicate: a zero distance that is not the row itself
    for data, query in ((x, x), (x[300:], x[:300])):
        found = NearestNeighbors(n_neighbors=15).fit(data)
        dists = found.kneighbors(query)[0].astype(np.float32)
        ours = smooth_knn_dist(dists, 15.0)
        theirs = umap.umap_.smooth_knn_dist(dists, 15.0, local_connectivity=1.0)
        for a, b in zip(ours, theirs, strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-5)
    dists, rows = NearestNeighbors(n_neighbors=15).fit(x).kneighbors(x)
    rows[:, 0] = np.arange(len(x))  # the duplicate pair: each row first in its own list
    dists = dists.astype(np.float32)
    graph = fuzzy_graph(rows, dists, *smooth_knn_dist(dists, 15.0))
    theirs = umap.umap_.fuzzy_simplicial_set(x, 15, 0, "euclidean", knn_indices=rows,
                                             knn_dists=dists)[0]
    np.testing.assert_allclose(graph.toarray(), theirs.toarray(), atol=1e-5)
    np.testing.assert_allclose(ab_params(0.1), umap.umap_.find_ab_params(1.0, 0.1), rtol=1e-4)


def test_fit_clustering_refuses_bad_input_in_one_clear_line() -> None:
    x = np.random.default_rng(0).normal(size=(20, 4))
    with pytest.raises(InfluenceError, match=r"k range 1\.\.5"):
        fit_clustering(x, 1, 5, progress=False)
    with pytest.raises(InfluenceError, match="at least three k values"):
        fit_clustering(x, 2, 3, progress=False)
    with pytest.raises(InfluenceError, match="more than 20 paintings"):
        fit_clustering(x, 2, 20, progress=False)
    x[3, 1] = np.nan
    with pytest.raises(InfluenceError, match="NaN"):
        fit_clustering(x, 2, 5, progress=False)


# -------------------------------------------------------------------------------- stored scores
def test_silhouette_by_matrix_product_is_scikit_learns() -> None:
    # A singleton cluster (scores 0) and an unused label number (no cluster to be nearest to).
    x, labels = make_blobs(400, n_features=6, centers=5, random_state=1)
    labels[0] = 7
    d = pairwise_distances(x).astype(np.float32)
    assert silhouette(d, labels) == pytest.approx(
        silhouette_score(d, labels, metric="precomputed"), abs=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_stored_scores_are_scikit_learns_on_the_reduced_features(clustered: Run,
                                                                 name: str) -> None:
    c = load_clustering(clustered, name)
    y = reduced(clustered, name)
    assert y.shape[1] == c.summary["reduction"]["pca_dims"]
    # 180 paintings are fewer than SILHOUETTE_SAMPLE: silhouette is exact, on every row.
    assert c.summary["reduction"]["silhouette_rows"] == 180
    comparison = pd.read_csv(clustered.clusters_dir / "comparison.csv")
    chosen = c.sweep[c.sweep["k"] == c.summary["k"]].iloc[0]
    for method in ("kmeans", "gmm"):
        labels = c.assignments[method].to_numpy()
        expected = {"silhouette": silhouette_score(y, labels),
                    "davies_bouldin": davies_bouldin_score(y, labels),
                    "calinski_harabasz": calinski_harabasz_score(y, labels)}
        row = comparison[(comparison["features"] == name) & (comparison["method"] == method)]
        for score, value in expected.items():
            assert row[score].iloc[0] == pytest.approx(value, rel=1e-5), (method, score)
            assert c.summary["scores"][method][score] == pytest.approx(value, rel=1e-5)
            if method == "kmeans":
                assert chosen[score] == pytest.approx(value, rel=1e-5), score
        for field in ("artist", "style"):
            known = clustered.catalog()[field].notna().to_numpy()
            truth = clustered.catalog()[field][known].astype(str)
            assert row[f"nmi_{field}"].iloc[0] == pytest.approx(
                normalized_mutual_info_score(truth, labels[known]), rel=1e-6)
            assert row[f"ari_{field}"].iloc[0] == pytest.approx(
                adjusted_rand_score(truth, labels[known]), rel=1e-6)
    # The stored inertia at the chosen k is the sum of squared distances to the centres.
    distance = c.assignments["kmeans_distance"].to_numpy(dtype=np.float64)
    assert chosen["inertia"] == pytest.approx((distance ** 2).sum(), rel=1e-4)


def test_silhouette_on_large_sets_is_scored_on_a_fixed_seeded_sample(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clustering, "SILHOUETTE_SAMPLE", 120)
    x = np.asarray(small_run.features("pca"))
    result = fit_clustering(x, 2, 4, progress=False)
    again = fit_clustering(x, 2, 4, progress=False)
    assert result.reducer.info_["silhouette_rows"] == 120
    rows = np.sort(np.random.default_rng(clustering.SEED).choice(180, 120, replace=False))
    y = result.reduced
    c = result.clusters
    for method, labels in (("kmeans", c.labels_), ("gmm", c.gmm_labels_)):
        scores = result.clusters.scores_[method]
        sampled = silhouette_score(y[rows], labels[rows])
        assert scores["silhouette"] == pytest.approx(sampled, rel=1e-5)
        assert scores["silhouette"] != pytest.approx(silhouette_score(y, labels), rel=1e-5)
        assert again.clusters.scores_[method]["silhouette"] == scores["silhouette"]
        # Davies-Bouldin and Calinski-Harabasz are cheap: always on every row.
        assert scores["davies_bouldin"] == pytest.approx(davies_bouldin_score(y, labels),
                                                         rel=1e-5)
        assert scores["calinski_harabasz"] == pytest.approx(calinski_harabasz_score(y, labels),
                                                            rel=1e-5)


def test_large_sets_fit_on_a_seeded_sample_and_assign_every_painting(
        small_run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clustering, "FIT_SAMPLE", 100)
    x = np.asarray(small_run.features("mobilenet_v2"))
    result = fit_clustering(x, 2, 5, progress=False)
    rows = fit_rows(len(x), clustering.SEED, clustering.FIT_SAMPLE)
    assert rows is not None
    assert len(rows) == 100
    assert result.reducer.info_["fit_rows"] == 100
    # The models were fitted on the sample: the reducer's mean is the sample's.
    scaler = result.reducer.pipeline_.steps[0][1]
    assert np.allclose(scaler.mean_, x[rows].mean(axis=0), atol=1e-5)
    # ... and every painting, in the sample or not, is assigned by the fitted models.
    y = result.reduced
    assert len(result.clusters.labels_) == len(result.clusters.gmm_labels_) == len(x)
    assert np.array_equal(result.clusters.labels_, result.clusters.kmeans_.predict(y))
    c = result.clusters
    assert np.allclose(c.responsibilities_, c.gmm_.predict_proba(y), atol=1e-5)
    embedding = result.projection.embedding_
    assert np.isfinite(embedding).all()
    assert embedding.shape == (len(x), 2)
    # Scores cover every painting's label, not only the sample's.
    assert result.clusters.scores_["kmeans"]["davies_bouldin"] == pytest.approx(
        davies_bouldin_score(y, result.clusters.labels_), rel=1e-5)
    again = fit_clustering(x, 2, 5, progress=False)
    assert np.array_equal(again.clusters.labels_, result.clusters.labels_)
    assert np.array_equal(again.projection.embedding_, result.projection.embedding_)


def test_a_mixture_component_that_collapses_is_refitted_not_fatal(tmp_path: Path) -> None:
    # The collection's first 300 paintings with k near 30: before the fallback, the GMM at
    # k = 28 stopped the stage with scikit-learn's "ill-defined empirical covariance".
    source = pd.read_csv(COLLECTION / "paintings.csv", dtype=str, keep_default_na=False)
    rows = source.head(300)
    (tmp_path / "images").mkdir()
    for file in rows["file"]:
        shutil.copy(COLLECTION / file, tmp_path / file)
    rows.to_csv(tmp_path / "paintings.csv", index=False)
    run = tmp_path / "run"
    assert cmd_extract(run=str(run), collection=str(tmp_path), extractors="pca",
                       progress=False) == 0
    assert cmd_cluster(run=str(run), features="pca", k_min=27, k_max=29, gmm_sweep=True,
                       progress=False) == 0
    sweep = load_clustering(Run(run), "pca").sweep
    assert list(sweep["k"]) == [27, 28, 29]
    assert np.isfinite(sweep["gmm_bic"]).all()


# ---------------------------------------------------------------------------- GMM memberships
@pytest.mark.parametrize("name", NAMES)
def test_gmm_responsibilities_sum_to_one_and_give_the_hard_labels(clustered: Run,
                                                                  name: str) -> None:
    c = load_clustering(clustered, name)
    resp = np.load(c.path / "responsibilities.npy")
    assert resp.dtype == np.float32
    assert resp.shape == (180, c.summary["gmm"]["k"])
    assert (resp >= 0).all()
    np.testing.assert_allclose(resp.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(resp.argmax(axis=1), c.assignments["gmm"])
    np.testing.assert_array_equal(resp.max(axis=1), c.assignments["gmm_p"])
    rows = np.array([5, 0, 179, 5])
    np.testing.assert_array_equal(c.responsibilities_of(rows), resp[rows])
    # New rows go through the stored reducer and models: the catalog's own features give back
    # the stored memberships and clusters.
    x = np.asarray(clustered.features(name))
    np.testing.assert_allclose(c.responsibilities(x), resp, atol=1e-5)
    np.testing.assert_array_equal(c.predict(x), c.assignments["kmeans"])
    np.testing.assert_array_equal(c.predict(x[7]), c.assignments["kmeans"][7:8])


# ---------------------------------------------------------------------------- reproducibility
@pytest.mark.parametrize("name", NAMES)
def test_clustering_twice_from_scratch_gives_identical_results(clustered: Run, reclustered: Run,
                                                               name: str) -> None:
    a, b = load_clustering(clustered, name), load_clustering(reclustered, name)
    pd.testing.assert_frame_equal(a.assignments, b.assignments, check_exact=True)
    pd.testing.assert_frame_equal(a.sweep, b.sweep, check_exact=True)
    pd.testing.assert_frame_equal(a.profiles, b.profiles, check_exact=True)
    pd.testing.assert_frame_equal(a.typical, b.typical, check_exact=True)
    np.testing.assert_array_equal(np.load(a.path / "responsibilities.npy"),
                                  np.load(b.path / "responsibilities.npy"))
    for key in ("k", "choice", "scores", "agreement", "sizes", "reduction", "input"):
        assert a.summary[key] == b.summary[key], key


def test_a_second_run_is_up_to_date_and_rewrites_nothing(clustered: Run,
                                                         capsys: pytest.CaptureFixture) -> None:
    files = sorted(p for p in clustered.clusters_dir.glob("*/*"))
    before = {p: p.stat().st_mtime_ns for p in files}
    capsys.readouterr()
    assert cmd_cluster(run=str(clustered.root), k_min=K_MIN, k_max=K_MAX, progress=False) == 0
    out = capsys.readouterr().out
    for name in NAMES:
        assert f"{name}: k = " in out
        assert "(up to date;" in out.split(f"{name}: k = ")[1]
    assert {p: p.stat().st_mtime_ns for p in files} == before
    for name in NAMES:
        step = clustered.step_record("cluster", name)
        assert step["params"]["cluster"]["k_min"] == K_MIN
        assert step["params"]["cluster"]["k_max"] == K_MAX


def test_a_changed_k_range_or_changed_labels_recluster(small_run: Run, tmp_path: Path) -> None:
    run = copy_run(small_run, tmp_path / "run")
    first = cluster_features(run, "pca", 2, 4, progress=False)
    assert not first["up_to_date"]
    assert cluster_features(run, "pca", 2, 4, progress=False)["up_to_date"]
    wider = cluster_features(run, "pca", 2, 5, progress=False)
    assert not wider["up_to_date"]
    assert load_clustering(run, "pca").sweep["k"].tolist() == [2, 3, 4, 5]
    # A corrected attribution changes no image and no feature, but the profiles are stale.
    catalog = run.catalog()
    catalog["genre"] = "portrait"
    save_catalog(run, catalog)
    relabelled = cluster_features(run, "pca", 2, 5, progress=False)
    assert not relabelled["up_to_date"]
    genres = load_clustering(run, "pca").profiles.query("field == 'genre'")
    assert set(genres["value"]) == {"portrait"}


# -------------------------------------------------------------------------- the files on disk
@pytest.mark.parametrize("name", NAMES)
def test_assignments_follow_the_catalog_row_for_row(clustered: Run, name: str) -> None:
    c = load_clustering(clustered, name)
    a = c.assignments
    assert a.columns.tolist() == ASSIGNMENT_COLUMNS
    assert a["image_id"].tolist() == clustered.catalog()["image_id"].tolist()
    k = c.summary["k"]
    assert K_MIN <= k <= K_MAX
    for method in ("kmeans", "gmm"):
        assert pd.api.types.is_integer_dtype(a[method])
        assert a[method].between(0, k - 1).all()
        assert np.bincount(a[method], minlength=k).tolist() == c.summary["sizes"][method]
    assert set(a["kmeans"]) == set(range(k))
    assert ((a["gmm_p"] >= 1 / k - 1e-6) & (a["gmm_p"] <= 1 + 1e-6)).all()
    assert np.isfinite(a[["umap_x", "umap_y"]].to_numpy()).all()
    # kmeans_distance is the distance to the painting's own centre, the nearest one.
    y = reduced(clustered, name)
    centres = c._model["kmeans"].cluster_centers_
    d = np.linalg.norm(y[:, None, :] - centres[None], axis=2)
    np.testing.assert_allclose(a["kmeans_distance"], d[np.arange(180), a["kmeans"]], rtol=1e-4)
    np.testing.assert_array_equal(d.argmin(axis=1), a["kmeans"])


def test_the_reduction_standardises_only_correlated_features(clustered: Run) -> None:
    pca = load_clustering(clustered, "pca").summary["reduction"]
    mobilenet = load_clustering(clustered, "mobilenet_v2").summary["reduction"]
    # The pca extractor's columns are already principal components: centred, not rescaled.
    assert pca["standardised"] is False
    assert pca["mean_abs_correlation"] < 0.05
    assert mobilenet["standardised"] is True
    assert mobilenet["mean_abs_correlation"] >= 0.05
    for r, name in ((pca, "pca"), (mobilenet, "mobilenet_v2")):
        assert r["input_dims"] == clustered.features(name).shape[1]
        assert 1 <= r["pca_dims"] <= clustering.MAX_DIMS
        # Dims are chosen on exact eigenvalues; the randomized PCA fit may fall a hair short.
        assert r["explained_variance"] >= clustering.VARIANCE - 0.01 or r["pca_dims"] == 50


@pytest.mark.parametrize("name", NAMES)
def test_profiles_count_shares_and_lifts_per_cluster(clustered: Run, name: str) -> None:
    c = load_clustering(clustered, name)
    catalog = clustered.catalog()
    p = c.profiles
    assert p.columns.tolist() == ["method", "cluster", "field", "value", "count", "share",
                                  "collection_share", "lift"]
    assert set(p["method"]) == {"kmeans", "gmm"}
    assert set(p["field"]) == set(FIELDS) & set(catalog.columns)
    sums = p.groupby(["method", "cluster", "field"])["share"].sum()
    np.testing.assert_allclose(sums, 1.0, atol=1e-9)
    np.testing.assert_allclose(p["lift"], p["share"] / p["collection_share"])
    for method in ("kmeans", "gmm"):
        for field in ("artist", "nationality"):
            known = catalog[field].notna()
            table = pd.crosstab(c.assignments[method][known],
                                catalog[field][known].astype(str)).stack()
            table = table[table > 0]
            got = p[(p["method"] == method) & (p["field"] == field)]
            got = got.set_index(["cluster", "value"])["count"]
            assert got.sort_index().tolist() == table.sort_index().tolist()
            overall = catalog[field][known].astype(str).value_counts(normalize=True)
            shares = p[(p["method"] == method) & (p["field"] == field)]
            np.testing.assert_allclose(shares["collection_share"],
                                       shares["value"].map(overall))


@pytest.mark.parametrize("name", NAMES)
def test_typical_paintings_are_their_clusters_closest_members(clustered: Run, name: str) -> None:
    c = load_clustering(clustered, name)
    a = c.assignments.set_index("image_id")
    t = c.typical
    assert t.columns.tolist() == ["method", "cluster", "rank", "image_id", "distance"]
    for (method, cluster), group in t.groupby(["method", "cluster"]):
        members = a[a[method] == cluster]
        assert group["rank"].tolist() == list(range(min(clustering.TYPICAL, len(members))))
        assert (a.loc[group["image_id"], method] == cluster).all()
        assert group["distance"].is_monotonic_increasing
        if method == "kmeans":
            np.testing.assert_array_equal(group["distance"],
                                          a.loc[group["image_id"], "kmeans_distance"])
            # Rank 0 is the closest of all its cluster's paintings.
            assert group["distance"].iloc[0] == members["kmeans_distance"].min()


def test_every_feature_set_has_its_plots_and_a_comparison_row_per_method(clustered: Run) -> None:
    for name in NAMES:
        out = clustered.clusters_dir / name
        for png in ("elbow.png", "silhouette.png"):
            with Image.open(out / png) as im:
                assert im.format == "PNG"
                assert im.width > 300
                assert im.height > 200
        summary = read_json(out / "summary.json")
        assert summary["features"] == name
        assert summary["rows"] == 180
        assert summary["weights"] == clustered.features_info(name)["weights"]
        assert set(summary["agreement"]) == {"kmeans", "gmm"}
        assert summary["config"]["cluster"]["k_min"] == K_MIN
        assert summary["config"]["cluster"]["k_max"] == K_MAX
    sweep = load_clustering(clustered, "pca").sweep
    assert sweep.columns.tolist() == ["k", "inertia", "silhouette", "davies_bouldin",
                                      "calinski_harabasz", "gmm_bic"]
    assert sweep["k"].tolist() == list(range(K_MIN, K_MAX + 1))
    table = pd.read_csv(clustered.clusters_dir / "comparison.csv")
    assert table.columns.tolist()[:7] == ["features", "weights", "method", "k", "silhouette",
                                          "davies_bouldin", "calinski_harabasz"]
    assert table.columns.tolist()[7:] == [f"{m}_{f}" for f in FIELDS for m in ("nmi", "ari")]
    assert sorted(zip(table["features"], table["method"], strict=True)) == sorted(
        (n, m) for n in NAMES for m in ("kmeans", "gmm"))
    for row in table.itertuples():
        assert row.k == load_clustering(clustered, row.features).summary["k"]
    assert clustered_features(clustered) == sorted(NAMES)


# ------------------------------------------------------------------------------------- errors
def test_clustering_a_run_without_features_says_to_extract_first(small_run: Run,
                                                                  tmp_path: Path) -> None:
    (tmp_path / "bare").mkdir()
    shutil.copy(small_run.catalog_path, tmp_path / "bare" / "catalog.parquet")
    shutil.copy(small_run.manifest_path, tmp_path / "bare" / "run.json")
    with pytest.raises(InfluenceError, match=r"no extracted features .* run `extract` first"):
        cmd_cluster(run=str(tmp_path / "bare"), progress=False)
    with pytest.raises(InfluenceError, match="no features 'pca'"):
        cmd_cluster(run=str(tmp_path / "bare"), features="pca", progress=False)


def test_loading_an_unclustered_feature_set_names_the_stage_to_run(small_run: Run,
                                                                   clustered: Run,
                                                                   tmp_path: Path) -> None:
    fresh = copy_run(small_run, tmp_path / "fresh")
    with pytest.raises(InfluenceError, match=r"'pca' are not clustered .*\(clustered: none\)"):
        load_clustering(fresh, "pca")
    with pytest.raises(InfluenceError, match=r"run `cluster` first"):
        load_clustering(clustered, "kpca")
    with pytest.raises(InfluenceError, match=r"clustered: mobilenet_v2, pca"):
        load_clustering(clustered, "kpca")
    assert clustered_features(fresh) == []


def test_the_map_keeps_neighbours_and_is_the_same_every_time() -> None:
    """The numpy UMAP keeps each row's neighbours near it on the map (trustworthiness), and the
    same rows and seed give the same map to the last bit."""
    from sklearn.manifold import trustworthiness

    from influence.estimators.clustering import Projection

    x, truth = make_blobs(800, n_features=10, centers=6, cluster_std=3.0, random_state=1)
    x = x.astype(np.float32)
    first = Projection(random_state=0).fit(x).embedding_
    again = Projection(random_state=0).fit(x).embedding_
    np.testing.assert_array_equal(first, again)
    assert trustworthiness(x, first, n_neighbors=15) > 0.9
    same_blob = truth[NearestNeighbors(n_neighbors=6).fit(first).kneighbors(first)[1][:, 1:]]
    assert (same_blob == truth[:, None]).mean() > 0.95
