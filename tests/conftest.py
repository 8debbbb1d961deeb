"""Shared fixtures: small fixed slices of the shared painting collection, and a run built on one."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
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


#: Test files from the longest to run to the shortest (2026-12, two workers). scripts/test.sh
#: runs `--dist loadfile --no-loadscope-reorder`: xdist then hands the files out in this order,
#: so the long ones start first and the two workers finish together (by default it orders them
#: by their number of tests, and the three-test Ray file, the longest, started last). Files
#: not named here follow in their usual order.
LONGEST_FIRST = ("test_ray_engine.py", "test_app.py", "test_extract.py", "test_cluster.py",
                 "test_finetune.py", "test_protocol.py", "test_server.py", "test_trust.py",
                 "test_api.py", "test_review.py", "test_similar.py", "test_labels.py",
                 "test_grow.py", "test_catalog.py", "test_configs.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest files first; tier the tests by what they need (`pytest -m "not slow"` runs the
    quick tier)."""
    rank = {name: n for n, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within
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


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], None]) -> Path:
    """The folder `name`, made by `build(folder)` once for every pytest-xdist worker of the
    session: the first worker to ask builds it under a lock, the others wait and reuse it (each
    worker building its own paid for the same extraction twice). Treat it as read-only."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_TESTRUNUID"):  # an xdist worker: its folder is the
        root = root.parent                          # session's folder/gwN
    dest, done = root / f"shared-{name}", root / f"shared-{name}.done"
    with (root / f"shared-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(dest, ignore_errors=True)  # what a failed build left
            dest.mkdir()
            build(dest)
            done.touch()
    return dest


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Derived model files (the style encoder's batched graph) in a cache of the session's own,
    not the user's: every run of the suite makes them once and reads them back, the commands
    it starts included."""
    cache = tmp_path_factory.mktemp("model-cache")
    before = os.environ.get("INFLUENCE_CACHE_DIR")
    os.environ["INFLUENCE_CACHE_DIR"] = str(cache)
    yield cache
    if before is None:
        os.environ.pop("INFLUENCE_CACHE_DIR", None)
    else:
        os.environ["INFLUENCE_CACHE_DIR"] = before


@pytest.fixture(scope="session")
def slice_collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """180 real paintings (6 artists x 30) with their metadata; treat as read-only."""
    return built_once(tmp_path_factory, "collection", make_slice)


@pytest.fixture(scope="session")
def small_run(slice_collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A run with the catalog and `pca` and `mobilenet_v2` (real ImageNet weights) features."""

    def build(root: Path) -> None:
        status = cmd_extract(run=str(root), collection=str(slice_collection),
                             extractors="pca,mobilenet_v2",
                             weights={"mobilenet_v2": str(MOBILENET)}, progress=False)
        assert status == 0

    return Run(built_once(tmp_path_factory, "run", build))


@pytest.fixture(scope="session")
def explored_run(small_run: Run, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """A copy of `small_run`, clustered, indexed, with style and artist heads and the influence
    stage (Sisley recorded as influenced by Monet) on mobilenet_v2: what the explorer and the
    export stage read; treat as read-only."""
    return Run(built_once(tmp_path_factory, "explored-run",
                          lambda dest: _explore(small_run, dest)))


def _explore(small_run: Run, dest: Path) -> None:
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
