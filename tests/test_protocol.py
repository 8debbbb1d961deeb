"""The run protocol: a change reruns exactly the steps that read it, and nothing else."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from influence import cluster as clustering
from influence import index as index_stage
from influence import train as classify
from influence.cluster import cluster_features, cluster_step
from influence.extract import extract_features
from influence.extractors import pixels
from influence.index import build_run_index
from influence.influence import build_influence
from influence.runs import Run, Step, module_constants, write_json
from influence.thumbnails import make_thumbnails
from influence.train import head_step, run_split, train_head

from .conftest import MOBILENET, save_catalog

FEATURES = ("pca", "mobilenet_v2")
TARGETS = ("artist", "genre")
K = (2, 4)
#: The feature set the influence stage runs on.
INFLUENCE = "mobilenet_v2"


def bring_up_to_date(run: Run, k: tuple[int, int] = K) -> set[tuple[str, str]]:
    """Run every step of the pipeline on the run; returns the steps that were not up to date."""
    reports = {("thumbnails", "thumbs"): make_thumbnails(run, progress=False)}
    for name in FEATURES:
        weights = str(MOBILENET) if name == "mobilenet_v2" else None
        reports["extract", name] = extract_features(run, name, weights, progress=False)
        reports["cluster", name] = cluster_features(run, name, *k, progress=False)
        reports["index", name] = build_run_index(run, name)
        for target in TARGETS:
            reports["train", f"{target}/{name}"] = train_head(run, target, name)
    # RUN/influence/ holds one feature set's tables: one step.
    reports["influence", "tables"] = build_influence(run, INFLUENCE, progress=False)
    return {step for step, report in reports.items() if not report["up_to_date"]}


@pytest.fixture(scope="module")
def full_run(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A copy of the small run with every stage done."""
    run = Run(tmp_path_factory.mktemp("full") / "run")
    shutil.copytree(small_run.root, run.root)
    bring_up_to_date(run)
    return run


@pytest.fixture
def run(full_run: Run, tmp_path: Path) -> Run:
    copy = Run(tmp_path / "run")
    shutil.copytree(full_run.root, copy.root)
    return copy


def relabel(column: str) -> Callable[[Run], None]:
    def change(run: Run) -> None:
        catalog = run.catalog()
        catalog.loc[3, column] = "Corrected"
        save_catalog(run, catalog)
    return change


def test_a_finished_run_is_up_to_date_and_run_json_lists_every_step(run: Run) -> None:
    assert bring_up_to_date(run) == set()
    done = set(run.done())
    assert {("catalog", "catalog"), ("thumbnails", "thumbs"), ("extract", "pca"),
            ("cluster", "pca"), ("index", "mobilenet_v2"), ("train", "genre/pca")} <= done
    record = run.step_record("cluster", "pca")
    assert record["params"]["cluster"]["k_max"] == K[1]
    assert record["code"] == clustering.VERSION
    assert record["inputs"]["features"] == run.step_key("extract", "pca")


ALL_OF = {name: {("extract", name), ("cluster", name), ("index", name),
                 *(("train", f"{t}/{name}") for t in TARGETS),
                 *({("influence", "tables")} if name == INFLUENCE else set())}
          for name in FEATURES}
BOTH = {stage: {(stage, name) for name in FEATURES} for stage in ("cluster", "index")}
BOTH["influence"] = {("influence", "tables")}


@pytest.mark.parametrize(("change", "patch", "expected"), [
    # A parameter of one stage: that stage's steps only.
    # Influence reads the clusters and the index: it follows them.
    ("k range", None, BOTH["cluster"] | BOTH["influence"]),
    ("index constant", (index_stage, "EVAL_QUERIES", 100), BOTH["index"] | BOTH["influence"]),
    ("head constant", (classify, "C", 0.5), {("train", f"{t}/{n}") for t in TARGETS
                                             for n in FEATURES}),
    # Constants that shape only what is written beside the model, once missing from the key.
    ("top-k constant", (classify, "TOP_K", 3), {("train", f"{t}/{n}") for t in TARGETS
                                               for n in FEATURES}),
    ("typical constant", (clustering, "TYPICAL", 5), BOTH["cluster"] | BOTH["influence"]),
    ("clustering recipe", (clustering, "VERSION", "test"), BOTH["cluster"] | BOTH["influence"]),
    # An extractor's preprocessing: its features and everything made from them, nothing else.
    ("pca preprocessing", (pixels, "SIDE", 16), ALL_OF["pca"]),
    # A label: the steps that read it (clusters read every label, the index only artists).
    ("genre label", relabel("genre"), BOTH["cluster"] | BOTH["influence"]
     | {("train", "genre/pca"), ("train", "genre/mobilenet_v2")}),
    ("artist label", relabel("artist"), BOTH["cluster"] | BOTH["index"] | BOTH["influence"]
     | {("train", "artist/pca"), ("train", "artist/mobilenet_v2")}),
], ids=lambda v: v if isinstance(v, str) else "")
def test_a_change_reruns_exactly_what_depends_on_it(run: Run, monkeypatch: pytest.MonkeyPatch,
                                                    change, patch, expected) -> None:
    k = K
    if change == "k range":
        k = (K[0], K[1] + 1)
    elif isinstance(patch, tuple):
        monkeypatch.setattr(*patch)
    else:
        patch(run)
    assert bring_up_to_date(run, k) == expected
    assert bring_up_to_date(run, k) == set()


def test_an_interrupted_step_is_not_done_and_old_runs_are_rebuilt_once(run: Run) -> None:
    step = Step("cluster", "pca", {"k": 1}, "1", {})
    assert not run.is_done(step)
    run.record(step)
    assert run.is_done(step)
    run.forget(step)  # what Run.step does before building: a kill now leaves it not done
    assert not run.is_done(step)
    # A run from before the protocol (no steps in run.json) is rebuilt once, then kept.
    manifest = run.manifest()
    del manifest["steps"]
    write_json(run.manifest_path, manifest)
    assert ("index", "pca") in bring_up_to_date(run)
    assert bring_up_to_date(run) == set()


def changed(value: object) -> object:
    """Another value of the same kind (only the step's key is built from it, nothing is fitted)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-changed"
    return (*value, "changed")


def test_every_constant_of_the_cluster_and_train_stages_is_in_their_keys(
        run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = run.catalog()
    split, _ = run_split(run, "genre", catalog)
    steps = {clustering: lambda: cluster_step(run, "pca", catalog, *K),
             classify: lambda: head_step(run, "genre", "pca", catalog, split, "auto")}
    for module, step in steps.items():
        assert run.is_done(step())
        constants = module_constants(module)
        assert {"VERSION", "SEED"} <= constants.keys()
        assert {"TOP_K", "WRONG_ROWS", "ECE_BINS"} <= constants.keys() or module is clustering
        for name, value in constants.items():
            with monkeypatch.context() as patch:
                patch.setattr(module, name, changed(value))
                assert not run.is_done(step()), f"{module.__name__}.{name} is not in the key"
        assert run.is_done(step())
