"""Shared fixtures: small fixed slices of the shared painting collection, and a run built on one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Under pytest-xdist each worker is one of as many processes as there are cores: one thread
# each, so the workers do not oversubscribe the cores (set before torch or numpy load).
if os.environ.get("PYTEST_XDIST_WORKER"):
    for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(_name, "1")

import pandas as pd
import pytest

from influence.commands import cmd_cluster, cmd_extract, cmd_index, cmd_influence, cmd_train
from influence.runs import Run, Step

#: What the project is given beside its root (the collection, the weights); movable for CI.
SHARED = Path(os.environ.get("INFLUENCE_SHARED",
                             Path(__file__).resolve().parents[1].parent / "shared"))
COLLECTION = SHARED / "data" / "wikiart-pd"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet_features.pth"
#: Six artists of five styles and four nationalities, 30 paintings each.
ARTISTS = ["Claude Monet", "Alfred Sisley", "Rembrandt", "Kitagawa Utamaro", "Francois Boucher",
           "Niko Pirosmani"]
PER_ARTIST = 30

#: Fixtures that extract features with a real network or start a service: a test that uses one,
#: directly or through another fixture, is in the `slow` tier.
SLOW_FIXTURES = frozenset({"small_run", "explored_run", "tiny_run", "ray_address", "browser",
                           "base_url", "hundred"})
#: Fixtures that mark a test as needing a browser or a local Ray.
BROWSER_FIXTURES = frozenset({"browser", "base_url"})
RAY_FIXTURES = frozenset({"ray_address"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tier the tests by what they need (`pytest -m "not slow"` runs the quick tier)."""
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & BROWSER_FIXTURES:
            item.add_marker(pytest.mark.browser)
        if used & RAY_FIXTURES:
            item.add_marker(pytest.mark.ray)
        if used & SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)


def save_catalog(run: Run, catalog: pd.DataFrame) -> None:
    """Store a changed catalog (a corrected attribution) and record it, as `extract` would, so
    the run's checksums still hold and only the steps that read the changed labels rerun."""
    catalog.to_parquet(run.catalog_path, index=False)
    made = run.step_record("catalog", "catalog")
    run.record(Step("catalog", "catalog", made["params"], made["code"], made["inputs"],
                    (run.catalog_path, run.rejected_path)),
               images=len(catalog), rejected=made["rejected"])


def make_slice(dest: Path, artists: list[str] = ARTISTS, per_artist: int = PER_ARTIST) -> Path:
    """Copy a fixed slice of the shared collection (CSV rows in their original order)."""
    if not COLLECTION.exists():
        pytest.fail(f"shared collection not found at {COLLECTION}: set INFLUENCE_SHARED")
    rows = pd.read_csv(COLLECTION / "paintings.csv", dtype=str, keep_default_na=False)
    rows = rows[rows["artist"].isin(artists)].groupby("artist", sort=False).head(per_artist)
    (dest / "images").mkdir(parents=True, exist_ok=True)
    for file in rows["file"]:
        shutil.copy(COLLECTION / file, dest / file)
    rows.to_csv(dest / "paintings.csv", index=False)
    return dest


@pytest.fixture(scope="session")
def slice_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """180 real paintings (6 artists x 30) with their metadata; treat as read-only."""
    return make_slice(tmp_path_factory.mktemp("collection"))


@pytest.fixture(scope="session")
def small_run(slice_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A run with the catalog and `pca` and `mobilenet_v2` (real ImageNet weights) features."""
    root = tmp_path_factory.mktemp("run")
    status = cmd_extract(run=str(root), collection=str(slice_collection),
                         extractors="pca,mobilenet_v2", weights={"mobilenet_v2": str(MOBILENET)},
                         progress=False)
    assert status == 0
    return Run(root)


@pytest.fixture(scope="session")
def explored_run(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A copy of `small_run`, clustered, indexed, with style and artist heads and the influence
    stage (Sisley recorded as influenced by Monet) on mobilenet_v2: what the explorer and the
    export stage read; treat as read-only."""
    dest = tmp_path_factory.mktemp("explored-run")
    shutil.copytree(small_run.root, dest, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns("*.parts", "index", "models", "clusters"))
    assert cmd_cluster(run=str(dest), features="mobilenet_v2", k_min=2, k_max=6,
                       progress=False) == 0
    assert cmd_index(run=str(dest), features="mobilenet_v2", progress=False) == 0
    assert cmd_train(run=str(dest), target="style,artist", features="mobilenet_v2",
                     progress=False) == 0
    recorded = dest / "recorded.csv"
    pd.DataFrame({"artist": ["Alfred Sisley"], "influenced_by": ["Claude Monet"]}).to_csv(
        recorded, index=False)
    assert cmd_influence(run=str(dest), features="mobilenet_v2", recorded=str(recorded),
                         progress=False) == 0
    return Run(dest)
