"""The Ray engine on a local Ray (2 CPUs): the local engine's features, rejected images and
records, resume after a kill."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from influence.catalog import Collection, build_catalog
from influence.commands import cmd_extract
from influence.extract import FeatureStore, extract_many
from influence.runs import InfluenceError, Run

from .conftest import ARTISTS, MOBILENET, make_slice

ray = pytest.importorskip("ray", reason="the Ray engine is the optional extra influence[ray]")

#: Bounds for a loaded 2-core machine: Ray's start, and a whole extraction.
START_S, RUN_S = 120, 600


@pytest.fixture(scope="module")
def ray_address() -> str:
    """One local Ray (2 CPUs) for the module; drivers join it by address."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def hundred(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 paintings: five artists, 20 each."""
    return make_slice(tmp_path_factory.mktemp("hundred"), ARTISTS[:5], 20)


@pytest.fixture(scope="module")
def local_run(hundred: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("local")
    assert cmd_extract(run=str(root), collection=str(hundred), extractors="pca,mobilenet_v2",
                       weights={"mobilenet_v2": str(MOBILENET)}, progress=False) == 0
    return Run(root)


def test_ray_fits_pca_once_and_writes_the_local_engines_features(local_run, hundred, tmp_path,
                                                              ray_address):
    run = Run(tmp_path / "run")
    status = cmd_extract(run=str(run.root), collection=str(hundred), engine="ray",
                         extractors="pca", ray_address=ray_address, ray_actors=2, progress=False)
    assert status == 0
    assert len(run.catalog()) == 100
    assert np.abs(run.features("pca") - local_run.features("pca")).max() <= 1e-5
    record = run.step_record("extract", "pca")
    assert record["engine"] == "ray"
    assert record["new_rows"] == 100
    assert record["key"] == local_run.step_key("extract", "pca")  # same step, same key
    # PCA was fitted once, on the driver, and the fitted state reached both actors (an actor
    # without it raises instead of writing rows); the partitions were spread as parts.
    assert record["timings"]["fit_s"] > 0
    assert len(FeatureStore(run, "pca").writer.part_files()) >= 2


def test_a_killed_ray_extraction_resumes_to_the_local_features(local_run, hundred, tmp_path,
                                                               ray_address):
    run = Run(tmp_path / "run")
    cmd = [sys.executable, "-m", "influence.pipeline", "--no-progress", "extract",
           "--collection", str(hundred), "--run", str(run.root), "--engine", "ray",
           "--ray-address", ray_address, "--ray-actors", "1",
           "--extractors", "mobilenet_v2", "--weights", f"mobilenet_v2={MOBILENET}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    store = FeatureStore(run, "mobilenet_v2")
    deadline = time.monotonic() + START_S + RUN_S
    try:
        while not store.writer.part_files() and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not store.matrix_path.exists(), "extraction finished before it could be interrupted"
    parts = store.writer.part_files()
    if len(store.writer.done_ids()) == 100:
        # Ray may run every write task at once, so all parts can land before the kill does
        # (CI saw it on a loaded machine). Parts are atomic files: a kill a moment earlier
        # leaves a subset of them, the state made here by keeping the first only.
        for path in parts[1:]:
            store.writer.fs.rm(path)
    first = len(store.writer.done_ids())
    assert 0 < first < 100
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=START_S + RUN_S)
    assert done.returncode == 0, done.stderr[-2000:]
    assert run.step_record("extract", "mobilenet_v2")["new_rows"] == 100 - first
    assert np.abs(run.features("mobilenet_v2") - local_run.features("mobilenet_v2")).max() \
        <= TOLERANCE
    assert run.features_info("mobilenet_v2")["weights"] == f"file {MOBILENET.resolve()}"


#: What a step record holds that may differ between engines: when and how fast it ran, and which.
ENGINE_FIELDS = ("timings", "seconds", "finished_at", "engine")
#: Rows equal within float noise: a partition's batches differ between the engines, and a conv
#: net's fused path takes only full batches, so the last digits of some rows do too.
TOLERANCE = 1e-4


def _comparable(record: dict) -> dict:
    """A step record less what may differ between engines; its outputs by name and matrix
    shape, not bytes (equal features within `TOLERANCE` need not be equal bytes, and each
    features JSON names its engine)."""
    kept = {k: v for k, v in record.items() if k not in ENGINE_FIELDS}
    if "fit" in kept:  # when the fit was made, to the second: a second apart on a loaded machine
        kept["fit"] = {k: v for k, v in kept["fit"].items() if k != "at"}
    kept["outputs"] = {path: {k: v for k, v in made.items() if k in ("shape", "dtype")}
                       for path, made in record.get("outputs", {}).items()}
    return kept


def test_both_engines_write_the_same_features_rejected_images_and_records(tmp_path,
                                                                          ray_address):
    collection = make_slice(tmp_path / "coll", ARTISTS[:3], 8)
    base = Run(tmp_path / "base")
    build_catalog(Collection.from_dir(collection), base, progress=False)
    files = base.catalog()["file"]
    # Broken after cataloguing: one file overwritten with text, one JPEG cut in half.
    (collection / files[3]).write_bytes(b"not an image any more")
    cut = collection / files[10]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    names, weights = ["pca", "mobilenet_v2"], {"mobilenet_v2": str(MOBILENET)}
    runs = {engine: Run(tmp_path / engine) for engine in ("local", "ray")}
    first = {}
    for engine, run in runs.items():
        shutil.copytree(base.root, run.root)
        first[engine] = extract_many(run, names, weights, engine=engine, progress=False,
                                     ray={"address": ray_address, "concurrency": 2})
    for name in names:
        errors = [str(first[e][name]).replace(str(runs[e].root), "RUN") for e in runs]
        assert all(isinstance(first[e][name], InfluenceError) for e in runs)
        assert errors[0] == errors[1]
        assert "2 images changed since cataloguing" in errors[0]
        rejected = [pd.read_csv(FeatureStore(run, name).rejected_path) for run in runs.values()]
        pd.testing.assert_frame_equal(*rejected)
        assert rejected[0]["file"].tolist() == [files[3], files[10]]
        assert rejected[0]["reason"].str.contains("not an image").iloc[0]
        assert rejected[0]["reason"].str.contains("truncated").iloc[1]
        # Every readable image's rows were written, on both engines.
        assert [FeatureStore(run, name).writer.done_ids() for run in runs.values()] == \
            [set(base.catalog()["image_id"]) - {base.catalog()["image_id"][3],
                                                base.catalog()["image_id"][10]}] * 2
    # Re-cataloguing rejects the two; the extraction then finishes from the written parts.
    for engine, run in runs.items():
        build_catalog(Collection.from_dir(collection), run, progress=False)
        reports = extract_many(run, names, weights, engine=engine, progress=False,
                               ray={"address": ray_address, "concurrency": 2})
        assert all(not isinstance(r, InfluenceError) for r in reports.values()), reports
    local, on_ray = runs["local"], runs["ray"]
    pd.testing.assert_frame_equal(pd.read_csv(local.rejected_path),
                                  pd.read_csv(on_ray.rejected_path))
    for name in names:
        assert local.features(name).shape == (22, local.features_info(name)["dim"])
        np.testing.assert_allclose(local.features(name), on_ray.features(name), atol=TOLERANCE)
        assert not FeatureStore(local, name).rejected_path.exists()
        records = [run.step_record("extract", name) for run in runs.values()]
        assert records[0]["engine"] == "local"
        assert records[1]["engine"] == "ray"
        assert _comparable(records[0]) == _comparable(records[1])
