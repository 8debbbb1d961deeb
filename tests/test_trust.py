"""A run that verifies itself, one writer per run, kill anywhere and lose nothing.

The pipeline runs on a small slice (32 paintings, the cheap pca and kpca features combined) in
processes forked from a fork server that has imported the library once: a SIGKILL can then land
anywhere, cheaply, without the test process itself dying or sharing its threads.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import sys
import time
from pathlib import Path

import faiss
import joblib
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from influence.commands import cmd_run
from influence.pipeline import main
from influence.runs import KILL_AFTER_WRITE, InfluenceError, Run, read_json

from .conftest import ARTISTS, make_slice

#: A finished_at no step recorded during the tests can have.
BEFORE = "2000-01-01T00:00:00+0000"

FEATURES = "pca+kpca"
#: Keys of the stage reports that say how a build went (time, rows new this time), not what
#: it made: they differ between an interrupted and an uninterrupted run.
VOLATILE = {"timings", "seconds", "finished_at", "new_rows", "versions"}

_server = multiprocessing.get_context("forkserver")
_server.set_forkserver_preload(["influence.commands", "influence.catalog", "influence.extract",
                                "influence.combine", "influence.cluster", "influence.index",
                                "influence.train", "influence.influence"])


def _pipeline(config: str, log: str, kill: str | None) -> None:
    """A forked `run --config` (output to `log`), killed after writing `kill` if given."""
    with open(log, "a") as out:
        os.dup2(out.fileno(), 1)
        os.dup2(out.fileno(), 2)
    if kill:
        os.environ[KILL_AFTER_WRITE] = kill
    sys.exit(cmd_run(config, progress=False))


def start(config: Path, log: Path, kill: str | None = None) -> multiprocessing.Process:
    process = _server.Process(target=_pipeline, args=(str(config), str(log), kill))
    process.start()
    return process


def finish(process: multiprocessing.Process) -> int:
    process.join(600)
    assert process.exitcode is not None, "the pipeline did not finish in 10 minutes"
    return process.exitcode


def write_config(folder: Path, collection: Path) -> Path:
    """A pipeline over the slice: extract pca and kpca, combine them, and the rest on that."""
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "pipeline.toml"
    config.write_text(f"""run = "{folder / 'run'}"
[extract]
collection = "{collection}"
extractors = ["pca", "kpca"]
[combine]
sets = ["{FEATURES}"]
[cluster]
features = "{FEATURES}"
k_min = 2
k_max = 4
[index]
features = "{FEATURES}"
[train]
target = ["artist"]
features = "{FEATURES}"
[influence]
features = "{FEATURES}"
""")
    return config


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four artists, eight paintings each."""
    return make_slice(tmp_path_factory.mktemp("trust-collection"), ARTISTS[:4], 8)


@pytest.fixture(scope="module")
def reference(collection: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The pipeline run once, uninterrupted, in a fresh process as the interrupted runs are (a
    test worker's threads and libraries' settings, left by earlier tests, change the heads' and
    the map's last bits); treat as read-only."""
    folder = tmp_path_factory.mktemp("reference")
    config = write_config(folder, collection)
    log = folder / "log.txt"
    assert finish(start(config, log)) == 0, log.read_text()
    return Run(config.parent / "run")


def contents(run: Run) -> dict[str, object]:
    """Every file a stage made, as bytes (JSON: parsed, without the build reports' timings),
    and run.json's steps as (key, checksums of their non-JSON outputs)."""

    def strip(value: object) -> object:
        if isinstance(value, dict):
            # Timings: the named ones, and every "<part>_s" seconds field.
            return {k: strip(v) for k, v in value.items()
                    if k not in VOLATILE and not k.endswith("_s")}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    out: dict[str, object] = {}
    for path in sorted(run.root.rglob("*")):
        rel = path.relative_to(run.root)
        if (not path.is_file() or any(p.startswith(".") or p.endswith(".parts")
                                      for p in rel.parts) or rel.name == "run.json"):
            continue
        if path.suffix == ".json":
            out[str(rel)] = strip(json.loads(path.read_text().replace(str(run.root), "RUN")))
        else:
            out[str(rel)] = path.read_bytes()
    for stage, steps in run.manifest()["steps"].items():
        for name, record in steps.items():
            out[f"step {stage}/{name}"] = (record["key"], {
                f: d["blake2b"] for f, d in record["outputs"].items() if not f.endswith(".json")})
    return out


def assert_readable(run: Run) -> None:
    """Every file under its final name loads whole (what a reader could open at this moment),
    and every recorded output matches its record."""
    for path in run.root.rglob("*"):
        rel = path.relative_to(run.root)
        if not path.is_file() or any(p.startswith(".") for p in rel.parts):
            continue
        suffix = path.suffix
        if suffix == ".parquet":
            pd.read_parquet(path)
        elif suffix == ".json":
            json.loads(path.read_text())
        elif suffix == ".npy":
            np.load(path)
        elif suffix == ".faiss":
            faiss.read_index(str(path))
        elif suffix == ".joblib":
            joblib.load(path)
        elif suffix == ".csv":
            pd.read_csv(path)
        elif suffix == ".jpg":
            Image.open(path).load()
    assert run.damaged() == []


def test_check_names_a_truncated_matrix_parquet_and_faiss_index_and_run_repairs_only_them(
        reference: Run, collection: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, collection)
    shutil.copytree(reference.root, tmp_path / "run")
    run = Run(tmp_path / "run")
    # Every record stamped with a time no rebuild can have: run.json's times are to the second,
    # and a small step rebuilt within the second it was first made would look untouched.
    manifest = run.manifest()
    for steps in manifest["steps"].values():
        for record in steps.values():
            record["finished_at"] = BEFORE
    run.manifest_path.write_text(json.dumps(manifest))
    before = run.manifest()["steps"]
    matrix = run.features_dir / f"{FEATURES}.npy"
    matrix.write_bytes(matrix.read_bytes()[: matrix.stat().st_size // 2])
    pairs = run.root / "influence" / "pairs.parquet"
    pairs.write_bytes(pairs.read_bytes()[:-100])
    index = run.index_dir / f"{FEATURES}.faiss"
    flipped = bytearray(index.read_bytes())
    flipped[len(flipped) // 2] ^= 0xFF  # same size, one byte changed
    index.write_bytes(bytes(flipped))
    capsys.readouterr()

    assert main(["check", "--run", str(run.root)]) == 1
    report = capsys.readouterr().out.splitlines()
    damaged = [line for line in report if line.startswith("damaged: ")]
    assert len(damaged) == 3, report
    assert any(f"features/{FEATURES}.npy: truncated" in line
               and f"`combine {FEATURES}` rebuilds it" in line for line in damaged)
    assert any("influence/pairs.parquet: truncated" in line and "`influence`" in line
               for line in damaged)
    assert any(f"index/{FEATURES}.faiss: contents changed" in line
               and f"`index --features {FEATURES}`" in line for line in damaged)
    # A reader refuses a damaged matrix in one line instead of a traceback, changing nothing.
    with pytest.raises(InfluenceError, match=rf"features/{re.escape(FEATURES)}\.npy .* is "
                                             r"damaged \(truncated: .*rebuilds it"):
        run.features(FEATURES)
    assert run.step_record("extract", FEATURES) is not None
    # A stage that reads a damaged matrix (issue 19: a ValueError from np.load) says which file
    # is damaged and what rebuilds it, and marks the step that made it not done.
    pca = run.features_dir / "pca.npy"
    pca.write_bytes(pca.read_bytes()[:-1000])
    assert main(["--no-progress", "index", "--run", str(run.root), "--features", "pca"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "features/pca.npy" in err
    assert "truncated" in err
    assert "`extract --extractors pca` rebuilds it" in err
    assert run.step_record("extract", "pca") is None

    assert cmd_run(str(config), progress=False) == 0
    err = capsys.readouterr().err
    assert err.count("damaged: ") == 3, err
    assert main(["check", "--run", str(run.root)]) == 0
    assert contents(run) == contents(reference)
    after = run.manifest()["steps"]
    rebuilt = {(s, n) for s, steps in after.items() for n, r in steps.items()
               if r["finished_at"] != before[s][n]["finished_at"]}
    # Only the damaged files' steps: the matrices come back the same, so the steps that read
    # them (clusters, heads) stay as they were.
    assert rebuilt == {("extract", "pca"), ("extract", FEATURES), ("index", FEATURES),
                       ("influence", "tables")}


#: Where each interrupted attempt is killed, in pipeline order: each attempt resumes the last.
#: train and review run in turn beside cluster and influence (`influence.commands.BESIDE`), so
#: they may be killed anywhere in those, and may have finished before any of their points: their
#: own points have a run of their own (BESIDE_KILLS).
KILLS = ["catalog.parquet",                        # extract: the catalog, not its rejected.csv
         "features/pca.fit.joblib",                # extract: the fitted PCA, no matrix yet
         "features/kpca.json",                     # extract: a matrix, not its record
         "run.json#1",                             # extract: right after a record (kpca's)
         f"features/{FEATURES}.json",              # combine: its files, not its record
         f"index/{FEATURES}.faiss",                # index: the index, not its JSON
         f"clusters/{FEATURES}/assignments.parquet",  # cluster: half its files
         "influence/pairs.parquet",                # influence: two of its three tables
         "influence/influence.json"]               # influence: every file, no record yet
#: Runs killed in train (the head written, not its tables) and then in review (its duplicates
#: written, not their hashes nor the other tables), while cluster and influence work beside them.
BESIDE_KILLS = ["models/artist-pca+kpca.joblib", "review/duplicates.parquet"]


@pytest.mark.parametrize("kills", [KILLS, BESIDE_KILLS], ids=["in-order", "beside"])
def test_killed_anywhere_the_next_run_finishes_as_if_never_interrupted(
        reference: Run, collection: Path, tmp_path: Path, kills: list[str]) -> None:
    config = write_config(tmp_path, collection)
    run = Run(tmp_path / "run")
    log = tmp_path / "log.txt"
    for point in kills:
        code = finish(start(config, log, kill=point))
        assert code == -signal.SIGKILL, f"not killed after writing {point}:\n{log.read_text()}"
        assert_readable(run)
        with run.writing("test", wait=False):  # the dead process's lock is free at once
            pass
    assert finish(start(config, log)) == 0, log.read_text()
    assert contents(run) == contents(reference)


def test_two_runs_on_one_run_build_each_step_once(collection: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    config = write_config(tmp_path, collection)
    run = Run(tmp_path / "run")
    first_log, second_log = tmp_path / "first.txt", tmp_path / "second.txt"
    first = start(config, first_log)
    deadline = time.monotonic() + 300
    while f'"pid": {first.pid}' not in (run.lock_path.read_text()
                                         if run.lock_path.exists() else ""):
        assert time.monotonic() < deadline, first_log.read_text()
        assert first.is_alive(), first_log.read_text()
        time.sleep(0.05)
    # Another writer with --no-wait is told who holds the run, and changes nothing.
    capsys.readouterr()
    assert main(["cluster", "--run", str(run.root), "--no-wait"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"is being written by pid {first.pid} " in err
    assert "(run, since " in err
    second = start(config, second_log)
    assert finish(first) == 0, first_log.read_text()
    assert finish(second) == 0, second_log.read_text()
    waited = second_log.read_text()
    assert f"waiting: run {run.root} is being written by pid {first.pid}" in waited
    # The second found every step done by the first: nothing built twice.
    for built in (" new", " s;", "built in", "fitted in", " s) ->", "combined\n"):
        assert built not in waited, waited
    # One "up to date" per stage's report line: extract's two sets, combine, cluster, index,
    # train, influence and review.
    assert waited.count("up to date") == 8, waited
    recorded = [(s, n) for s, steps in run.manifest()["steps"].items() for n in steps]
    # catalog, thumbnails, pca, kpca, pca+kpca, cluster, index (with the neighbour table), split,
    # head, influence and the review's 3 lists
    assert len(recorded) == 13, recorded
    assert read_json(run.manifest_path)["steps"]["catalog"]["catalog"]["images"] == 32
