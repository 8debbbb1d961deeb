"""Fine-tuning on a tiny slice: budget stop, resume from the checkpoint, the new feature set."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from influence.commands import cmd_extract
from influence.finetune import finetune, paths_of
from influence.images import open_rgb
from influence.readers import head_paths, split_path
from influence.runs import KILL_AFTER_WRITE, Run
from influence.similar import load_extractor
from influence.train import train_head

from .conftest import MOBILENET, make_slice

NAME = "mobilenet_v2-ft-artist"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """Six artists, ten paintings each: 8 to train on per artist, 2 held out; mobilenet_v2
    extracted with the shared ImageNet weights."""
    collection = make_slice(tmp_path_factory.mktemp("tiny"), per_artist=10)
    root = tmp_path_factory.mktemp("tiny-run")
    assert cmd_extract(run=str(root), collection=str(collection), extractors="mobilenet_v2",
                       weights={"mobilenet_v2": str(MOBILENET)}, progress=False) == 0
    return Run(root)


def test_stopped_by_its_budget_it_resumes_from_the_checkpoint_and_stores_its_features(
        tiny_run: Run) -> None:
    options = {"epochs": 1, "batch_size": 16,
               "workers": 0, "progress": False}
    first = finetune(tiny_run, "artist", budget_s=1e-3, **options)
    assert first["stopped"] == "time budget spent"
    assert len(first["history"]) == 1
    assert first["history"][0]["phase"] == "probe"
    # No weights given: it starts from those the run's own mobilenet_v2 features were made with.
    assert first["weights"] == f"file {MOBILENET.resolve()}"
    assert first["probe_features"] == "the run's stored mobilenet_v2 features"
    # The probe alone, folded into the network's head, already tells six artists apart.
    assert first["accuracy"] >= 0.5
    assert first["best_epoch"] == 1
    checkpoint = torch.load(paths_of(tiny_run, "mobilenet_v2", "artist")["checkpoint"],
                            weights_only=False)
    assert checkpoint["epoch"] == 1

    # As after a kill: the next call starts at epoch 2, with the whole net learning.
    second = finetune(tiny_run, "artist", **options)
    assert second["history"][0] == first["history"][0]
    assert [h["phase"] for h in second["history"]] == ["probe", "full"]
    assert second["stopped"] == "epochs done"
    assert not second["up_to_date"]
    assert finetune(tiny_run, "artist", **options)["up_to_date"]

    split = pd.read_parquet(split_path(tiny_run))
    assert second["n_test"] == (split["part"] == "test").sum() == 12
    assert second["device"] == "cpu"
    assert 0 <= second["ece"] <= 1
    # The backbone learnt in the whole-net epoch: its last block moved from the ImageNet weights;
    # the weights kept are the best epoch's backbone, without the head.
    files = paths_of(tiny_run, "mobilenet_v2", "artist")
    checkpoint = torch.load(files["checkpoint"], weights_only=False)
    pretrained = torch.load(MOBILENET)
    assert not torch.equal(checkpoint["model"]["features.18.0.weight"],
                           pretrained["features.18.0.weight"])
    # ... while its batch norms kept the pretrained statistics the probe was fitted under.
    assert torch.equal(checkpoint["model"]["features.18.1.running_mean"],
                       pretrained["features.18.1.running_mean"])
    tuned = torch.load(files["weights"])
    assert checkpoint["best"]["epoch"] == second["best_epoch"]
    assert torch.equal(tuned["features.18.0.weight"],
                       checkpoint["best"]["model"]["features.18.0.weight"])
    assert not any(k.startswith("classifier.") for k in tuned)

    # A feature set like any other, and a query is embedded with the fine-tuned weights.
    x = tiny_run.features(NAME)
    catalog = tiny_run.catalog()
    assert NAME in tiny_run.feature_names()
    assert x.shape == (len(catalog), 1280)
    row = 5
    image = open_rgb(Path(tiny_run.image_path(catalog["file"].iloc[row])))
    np.testing.assert_allclose(load_extractor(tiny_run, NAME).embed([image])[0], x[row],
                               rtol=1e-3, atol=1e-4)
    assert tiny_run.features_info(NAME)["weights"].endswith(f"{NAME}.pth")

    # A head of another target on these features is judged on the same split the fine-tuning
    # trained on: none of its held-out paintings was a fine-tuning picture.
    style = train_head(tiny_run, "style", NAME, head="logistic")
    style_test = set(pd.read_parquet(head_paths(tiny_run, "style", NAME)["test"])["image_id"])
    assert style_test
    assert not style_test & set(split.query("part != 'test'")["image_id"])
    assert style["seen_in_fine_tuning"] == {"artist": 0}
    assert train_head(tiny_run, "artist", NAME, head="logistic")["seen_in_fine_tuning"] == {}


def without_fine_tuned(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: the fine-tuned set's own files and the lock, but not the rows the
    protocol keeps of steps that read it (RUN/rows/)."""
    if "rows" in Path(folder).parts:
        return []
    return [n for n in names if n.startswith(NAME) or n == ".lock"]


def test_killed_between_epochs_it_resumes_to_what_an_uninterrupted_run_learns(
        tiny_run: Run, tmp_path: Path) -> None:
    options = {"epochs": 1, "batch_size": 16, "workers": 0, "progress": False}
    copies = []
    for label in ("uninterrupted", "killed"):
        copies.append(Run(tmp_path / label))
        shutil.copytree(tiny_run.root, copies[-1].root,
                        ignore=without_fine_tuned)
    whole, killed = copies
    finetune(whole, "artist", **options)
    # SIGKILLed right after the first epoch's checkpoint (the probe), before the whole net
    # learns.
    code = (f"from influence.finetune import finetune; from influence.runs import Run; "
            f"finetune(Run({str(killed.root)!r}), 'artist', **{options!r})")
    died = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parents[1],
                          env={**os.environ, KILL_AFTER_WRITE: f"{NAME}.checkpoint.pt"})
    assert died.returncode == -signal.SIGKILL
    assert torch.load(paths_of(killed, "mobilenet_v2", "artist")["checkpoint"],
                      weights_only=False)["epoch"] == 1
    resumed = finetune(killed, "artist", **options)
    assert [h["phase"] for h in resumed["history"]] == ["probe", "full"]
    for run in copies:
        assert run.damaged() == []
    assert (np.asarray(killed.features(NAME)) == np.asarray(whole.features(NAME))).all()
