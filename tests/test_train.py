"""Classifier heads: the recorded split, left-out labels, class balance, metrics by scikit-learn."""

from __future__ import annotations

from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)
from sklearn.pipeline import Pipeline

from influence import train as classify
from influence.commands import cmd_train
from influence.estimators.heads import held_out_folds, validation_slice
from influence.pipeline import main
from influence.readers import head_paths, split_path
from influence.runs import Run, read_json
from influence.train import (
    HEADS,
    MIN_PER_CLASS,
    MLP_EPOCHS,
    MLP_SEEDS,
    MLP_VALIDATION,
    TEST_SIZE,
    expected_calibration_error,
    make_estimator,
    run_split,
)

from .conftest import save_catalog
from .test_index import copy_run

TARGETS = "artist,genre"
FEATURES = "mobilenet_v2,pca"


@pytest.fixture(scope="module")
def trained(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Logistic artist and genre heads on both feature sets (genre: 33 paintings unlabelled,
    imbalanced)."""
    run = copy_run(small_run, tmp_path_factory.mktemp("trained"))
    assert cmd_train(run=str(run.root), target=TARGETS, features=FEATURES, head="logistic",
                     drop_small_classes=True, progress=False) == 0
    return run


def _saved(run: Run, target: str, features: str) -> tuple[dict, pd.DataFrame, np.ndarray,
                                                          np.ndarray]:
    """The head's JSON, its labelled split (catalog order), the features of those rows, labels."""
    info = read_json(head_paths(run, target, features)["json"])
    catalog = run.catalog()
    split, _ = run_split(run, target, catalog)
    split = split[["image_id", "part"]]
    rows = catalog.reset_index().set_index("image_id").loc[split["image_id"], "index"].to_numpy()
    labels = catalog[target].to_numpy(dtype=object)[rows]
    return info, split, np.asarray(run.features(features))[rows], labels


def test_split_is_stratified_recorded_and_the_same_on_a_fresh_run(
        trained: Run, small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> None:
    split = pd.read_parquet(split_path(trained))
    assert list(split.columns) == ["image_id", "part"]
    assert set(split["part"]) == {"train", "test"}
    # One split of every painting, stratified by the first target asked for (artist).
    assert split["image_id"].tolist() == trained.catalog()["image_id"].tolist()
    assert trained.step_record("train", "split")["stratified_by"] == "artist"
    artists = trained.catalog().set_index("image_id").loc[split["image_id"], "artist"].to_numpy()
    per_artist = pd.crosstab(artists, split["part"].to_numpy())
    assert len(per_artist) == 6
    # Stratified: every artist has its share of the test part (30 each, 20 % -> 6).
    assert (per_artist["test"] == round(30 * TEST_SIZE)).all()
    # Both feature sets were judged on the same held-out paintings.
    infos = [read_json(head_paths(trained, "artist", f)["json"]) for f in FEATURES.split(",")]
    assert {i["n_test"] for i in infos} == {int((split["part"] == "test").sum())}
    assert all(i["split"]["file"] == split_path(trained).name for i in infos)
    # Seeded: a fresh copy of the run splits the same way.
    fresh = copy_run(small_run, tmp_path_factory.mktemp("fresh"))
    run_split(fresh, "artist", fresh.catalog())
    pd.testing.assert_frame_equal(pd.read_parquet(split_path(fresh)), split)


def test_unlabelled_paintings_and_rare_labels_are_left_out_and_reported(trained: Run) -> None:
    catalog = trained.catalog()
    info, split, _, labels = _saved(trained, "genre", "mobilenet_v2")
    unlabelled = set(catalog.loc[catalog["genre"].isna(), "image_id"])
    assert len(unlabelled) == info["unlabelled"] > 0
    assert not unlabelled & set(split["image_id"])
    counts = catalog["genre"].value_counts()
    rare = {str(k): int(v) for k, v in counts[counts < MIN_PER_CLASS].items()}
    assert rare
    assert info["dropped_classes"] == rare
    assert not set(rare) & set(info["classes"])
    assert not set(rare) & set(labels)
    assert info["n_train"] + info["n_test"] == len(split) == counts[counts >= MIN_PER_CLASS].sum()


def test_imbalanced_classes_weigh_the_same_in_the_head(trained: Run) -> None:
    _info, split, x, labels = _saved(trained, "genre", "pca")
    train = (split["part"] == "train").to_numpy()
    y = labels[train]
    counts = pd.Series(y).value_counts()
    assert counts.max() >= 4 * counts.min()  # landscape vs religious painting: really imbalanced
    head = joblib.load(head_paths(trained, "genre", "pca")["model"])["pipeline"]
    assert head[-1].class_weight == "balanced"
    # With balanced weights (n / (k * n_class)) and a free intercept, the weighted mean predicted
    # probability of every class is 1/k at the optimum, however rare the class.
    weight = (len(y) / (len(counts) * counts)).loc[y].to_numpy()

    def mass(model: Pipeline) -> np.ndarray:
        return weight @ model.predict_proba(x[train]) / weight.sum()

    np.testing.assert_allclose(mass(head), 1 / len(counts), atol=0.005)
    # The same head fitted without class weights leans to the common classes and fails that.
    unweighted = make_estimator().set_params(logisticregression__class_weight=None).fit(x[train], y)
    assert np.abs(mass(unweighted) - 1 / len(counts)).max() > 0.02


@pytest.mark.parametrize("features", FEATURES.split(","))
def test_stored_metrics_equal_scikit_learn_on_the_recorded_test_part(trained: Run,
                                                                     features: str) -> None:
    info, split, x, labels = _saved(trained, "artist", features)
    paths = head_paths(trained, "artist", features)
    saved = joblib.load(paths["model"])
    classes = list(saved["classes"])
    test = (split["part"] == "test").to_numpy()
    proba = saved["pipeline"].predict_proba(x[test])
    truth = labels[test]
    pred = np.asarray(saved["pipeline"].classes_, dtype=object)[proba.argmax(axis=1)]
    p, r, f, _ = precision_recall_fscore_support(truth, pred, average="macro", zero_division=0)
    assert info["n_test"] == test.sum()
    assert info["n_train"] == (~test).sum()
    assert info["classes"] == classes == sorted(set(truth))
    assert info["accuracy"] == pytest.approx(accuracy_score(truth, pred))
    assert info["macro_precision"] == pytest.approx(p)
    assert info["macro_recall"] == pytest.approx(r)
    assert info["macro_f1"] == pytest.approx(f)
    assert info["top5_accuracy"] == pytest.approx(top_k_accuracy_score(truth, proba, k=5,
                                                                       labels=classes))
    per_class = pd.read_csv(paths["per_class"])
    pc, rc, fc, sc = precision_recall_fscore_support(truth, pred, labels=classes, zero_division=0)
    assert per_class["label"].tolist() == classes
    np.testing.assert_allclose(per_class[["precision", "recall", "f1"]].to_numpy(),
                               np.column_stack([pc, rc, fc]))
    assert per_class["support"].tolist() == sc.tolist()
    matrix = pd.read_csv(paths["confusion"], index_col=0)
    assert matrix.index.tolist() == matrix.columns.tolist() == classes
    np.testing.assert_array_equal(matrix.to_numpy(),
                                  confusion_matrix(truth, pred, labels=classes))


def test_confusion_picture_and_most_confidently_wrong_table(trained: Run) -> None:
    info, split, _, _ = _saved(trained, "artist", "pca")
    paths = head_paths(trained, "artist", "pca")
    with Image.open(paths["picture"]) as picture:
        assert picture.format == "PNG"
        assert min(picture.size) >= 300
    wrong = pd.read_csv(paths["wrong"])
    errors = round(info["n_test"] * (1 - info["accuracy"]))
    assert len(wrong) == min(errors, 50) > 0  # pca features make mistakes to list
    assert (wrong["predicted"] != wrong["true_artist"]).all()
    assert (wrong["artist"] == wrong["true_artist"]).all()
    assert wrong["p_predicted"].is_monotonic_decreasing
    assert (wrong["p_predicted"] >= wrong["p_true"]).all()
    test_ids = set(split.loc[split["part"] == "test", "image_id"])
    assert set(wrong["image_id"]) <= test_ids


def test_imagenet_head_names_the_artist_far_better_than_chance(trained: Run) -> None:
    mobilenet = read_json(head_paths(trained, "artist", "mobilenet_v2")["json"])
    pca = read_json(head_paths(trained, "artist", "pca")["json"])
    assert mobilenet["chance_accuracy"] == pytest.approx(1 / 6)
    assert mobilenet["accuracy"] >= 0.6
    assert mobilenet["macro_f1"] >= 0.5
    assert mobilenet["accuracy"] > pca["accuracy"]


def test_second_train_is_up_to_date(trained: Run, capsys: pytest.CaptureFixture) -> None:
    model = head_paths(trained, "artist", "mobilenet_v2")["model"]
    before = model.stat().st_mtime_ns
    capsys.readouterr()
    assert cmd_train(run=str(trained.root), target=TARGETS, features=FEATURES, head="logistic",
                     drop_small_classes=True, progress=False) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["artist"], ["genre"])]
    assert len(rows) == 4
    assert all(line.endswith("up to date") for line in rows)
    assert model.stat().st_mtime_ns == before


def test_a_changed_label_makes_the_head_train_again(
        small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> None:
    run = copy_run(small_run, tmp_path_factory.mktemp("relabelled"))
    assert cmd_train(run=str(run.root), target="artist", features="pca", progress=False) == 0
    catalog = run.catalog()
    gone = catalog["image_id"].iloc[7]
    catalog.loc[7, "artist"] = pd.NA
    save_catalog(run, catalog)
    assert cmd_train(run=str(run.root), target="artist", features="pca", progress=False) == 0
    info = read_json(head_paths(run, "artist", "pca")["json"])
    assert info["unlabelled"] == 1
    assert info["n_train"] + info["n_test"] == len(catalog) - 1
    assert gone not in set(run_split(run, "artist", run.catalog())[0]["image_id"])


def test_unknown_target_is_a_clear_error(trained: Run, capsys: pytest.CaptureFixture) -> None:
    assert main(["train", "--run", str(trained.root), "--target", "colour"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "unknown target(s) colour (catalog columns: file, title, artist," in err


def test_a_target_with_nothing_to_learn_is_skipped_unless_it_is_all_there_is(
        small_run: Run, tmp_path_factory: pytest.TempPathFactory,
        capsys: pytest.CaptureFixture) -> None:
    run = copy_run(small_run, tmp_path_factory.mktemp("no-nationality"))
    catalog = run.catalog()
    catalog["nationality"] = pd.NA
    save_catalog(run, catalog)
    assert cmd_train(run=str(run.root), target="nationality,artist", features="pca",
                     progress=False) == 0
    assert head_paths(run, "artist", "pca")["model"].exists()
    assert not head_paths(run, "nationality", "pca")["model"].exists()
    assert "skipped head nationality/pca" in capsys.readouterr().err
    assert main(["train", "--run", str(run.root), "--target", "nationality",
                 "--features", "pca"]) == 2
    assert "nothing to learn" in capsys.readouterr().err


def test_a_large_training_part_is_sampled_stratified_and_judged_on_the_whole_test_part(
        small_run: Run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = copy_run(small_run, tmp_path)
    monkeypatch.setattr(classify, "TRAIN_MAX", 60)
    assert cmd_train(run=str(run.root), target="artist", features="pca", head="logistic",
                     progress=False) == 0
    info, split, _, labels = _saved(run, "artist", "pca")
    assert info["train_part"] == (split["part"] == "train").sum() > 60
    assert info["n_train"] == 60
    assert info["n_test"] == (split["part"] == "test").sum()
    per_class = pd.read_csv(head_paths(run, "artist", "pca")["per_class"])
    assert (per_class["n_train"] >= 1).all()
    assert per_class["n_train"].sum() == 60
    assert set(per_class["label"]) == set(labels)


def test_calibration_error_of_known_cases() -> None:
    classes = ["a", "b"]
    # Always 90 % sure and right 9 times in 10: calibrated. Always sure, right half the time: 0.5.
    proba = np.tile([0.9, 0.1], (10, 1))
    assert expected_calibration_error(["a"] * 9 + ["b"], proba, classes) == pytest.approx(0.0)
    sure = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(["a", "b"] * 5, sure, classes) == pytest.approx(0.5)
    # Two bins: 0.6 sure and always right (gap 0.4) on 3 rows, 0.95 sure and right (0.05) on 1.
    mixed = np.array([[0.6, 0.4]] * 3 + [[0.05, 0.95]])
    assert expected_calibration_error(["a", "a", "a", "b"], mixed, classes) == pytest.approx(
        0.75 * 0.4 + 0.25 * 0.05)


def test_stored_calibration_error_is_that_of_the_saved_head_on_the_test_part(
        trained: Run) -> None:
    info, split, x, labels = _saved(trained, "artist", "mobilenet_v2")
    saved = joblib.load(head_paths(trained, "artist", "mobilenet_v2")["model"])
    test = (split["part"] == "test").to_numpy()
    proba = saved["pipeline"].predict_proba(x[test])
    assert info["ece"] == pytest.approx(expected_calibration_error(labels[test], proba,
                                                                   saved["classes"]))
    assert 0 < info["ece"] < 0.5


@pytest.fixture(scope="module")
def chosen(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Artist heads of each kind, and one chosen automatically, on mobilenet_v2."""
    run = copy_run(small_run, tmp_path_factory.mktemp("chosen"))
    for head in HEADS:
        assert cmd_train(run=str(run.root), target="artist", features="mobilenet_v2", head=head,
                         progress=False) == 0
        models = run.models_dir
        for path in models.glob("artist-mobilenet_v2.*"):
            path.rename(models / f"{head}-{path.name}")
    assert cmd_train(run=str(run.root), target="artist", features="mobilenet_v2",
                     progress=False) == 0
    return run


def test_mlp_head_is_a_soft_vote_of_seeded_mlps_and_learns_the_artist(chosen: Run) -> None:
    info = read_json(chosen.models_dir / "mlp-artist-mobilenet_v2.json")
    mlp = joblib.load(chosen.models_dir / "mlp-artist-mobilenet_v2.joblib")["pipeline"]
    vote = mlp[-1]
    assert info["head"] == "mlp"
    assert vote.members == MLP_SEEDS
    assert vote.hidden == 512
    w1, b1, w2, b2 = vote.weights_
    assert w1.shape[0] == MLP_SEEDS
    assert w1.shape[2] == 512
    # Members differ (their own seeds) and each kept its own best epoch.
    assert not np.allclose(w1[0], w1[1])
    assert len(vote.best_epoch_) == MLP_SEEDS
    assert all(1 <= e <= MLP_EPOCHS for e in vote.best_epoch_)
    # The head's probabilities are the mean of its members' softmax.
    raw = np.asarray(chosen.features("mobilenet_v2"))[:20]
    x = mlp[:-1].transform(raw).astype(np.float32)
    logits = np.maximum(x @ w1 + b1, 0) @ w2 + b2
    member = np.exp(logits - logits.max(-1, keepdims=True))
    member /= member.sum(-1, keepdims=True)
    np.testing.assert_allclose(mlp.predict_proba(raw), member.mean(0), rtol=1e-4, atol=1e-6)
    # Member k kept the epoch best on slice k, a tenth of the training part that no other
    # member's slice holds and that it never trained on: its recorded accuracy is its own there.
    _info, split, features, labels = _saved(chosen, "artist", "mobilenet_v2")
    train = (split["part"] == "train").to_numpy()
    z = mlp[:-1].transform(features[train]).astype(np.float32)
    y = labels[train]
    slices = held_out_folds(np.unique(y, return_inverse=True)[1], MLP_VALIDATION,
                            vote.random_state, MLP_SEEDS)
    assert (slices.sum(axis=0) <= 1).all()
    assert all(abs(h.sum() - MLP_VALIDATION * len(y)) <= len(vote.classes_) for h in slices)
    for k, held in enumerate(slices):
        hidden = np.maximum(z[held] @ w1[k] + b1[k], 0)
        own = vote.classes_[(hidden @ w2[k] + b2[k]).argmax(-1)]
        assert vote.validation_accuracy_[k] == pytest.approx((own == y[held]).mean())
    assert info["accuracy"] >= 0.6  # chance: 0.17
    assert info["timings"]["fit_s"] > 0


def test_auto_head_fits_each_kind_once_on_a_slice_and_keeps_the_better(chosen: Run) -> None:
    info = read_json(chosen.models_dir / "artist-mobilenet_v2.json")
    auto = joblib.load(chosen.models_dir / "artist-mobilenet_v2.joblib")["pipeline"][-1]
    scores = info["head_choice"]["validation_accuracy"]
    assert info["head_choice"]["asked"] == "auto"
    assert scores == auto.validation_accuracy_
    assert set(scores) == set(HEADS)
    assert info["head"] == auto.kind_ == max(scores, key=scores.get)
    # The chosen head is that kind's own head: an MLP kept as fitted stops on the same slice a
    # fixed MLP head holds out for itself; another kind is refitted on the whole training part.
    same = read_json(chosen.models_dir / f"{auto.kind_}-artist-mobilenet_v2.json")
    assert info["accuracy"] == same["accuracy"]
    assert info["ece"] == same["ece"]


def test_an_auto_chosen_mlp_is_the_mlp_head_itself_without_a_refit() -> None:
    from sklearn.datasets import make_classification

    from influence.estimators.heads import AutoHead, MLPHead

    x, y = make_classification(n_samples=300, n_features=12, n_informative=8, n_classes=3,
                               random_state=0)
    x = x.astype(np.float32)
    auto = AutoHead({"mlp": MLPHead(hidden=32, epochs=8)}, 0.1, 0).fit(x, y)
    assert auto.kind_ == "mlp"
    alone = MLPHead(hidden=32, epochs=8).fit(x, y)
    np.testing.assert_array_equal(auto.predict_proba(x), alone.predict_proba(x))
    # With nothing to beat, its score is its first member's on the slice that member held out:
    # auto's own validation slice.
    held = validation_slice(y, 0.1, 0)
    first = [w[:1] for w in alone.weights_]
    own = (np.maximum(x[held] @ first[0] + first[1], 0) @ first[2] + first[3])[0].argmax(-1)
    assert auto.validation_accuracy_["mlp"] == pytest.approx((own == y[held]).mean(), abs=1e-4)
