"""The shipped pipeline configurations, and `run --config` driving every stage from one."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from influence.combine import is_combined, parse
from influence.commands import STAGE_ORDER
from influence.extractors import is_known
from influence.pipeline import main
from influence.runs import Run

PIPELINES = Path(__file__).resolve().parents[1] / "pipelines"
DEFAULT, FULL = PIPELINES / "wikiart-pd.toml", PIPELINES / "wikiart-pd-full.toml"


def _config(path: Path) -> dict:
    return tomllib.loads(path.read_text())


def _made(cfg: dict) -> set[str]:
    """Feature sets a config's extract and combine sections make."""
    return set(cfg["extract"]["extractors"]) | set(cfg.get("combine", {}).get("sets", []))


@pytest.mark.parametrize("path", [DEFAULT, FULL], ids=lambda p: p.name)
def test_a_shipped_config_names_known_stages_extractors_and_files(path: Path) -> None:
    cfg = _config(path)
    assert set(cfg) - {"run"} <= set(STAGE_ORDER)
    assert all(is_known(name) for name in cfg["extract"]["extractors"])
    for spec in cfg.get("combine", {}).get("sets", []):
        assert is_combined(spec)
        assert {p.name for p in parse(spec)} <= set(cfg["extract"]["extractors"])
    for key in ("collection",):
        assert (path.parent / cfg["extract"][key]).resolve().exists()
    for name, weights in cfg["extract"].get("weights", {}).items():
        assert name in cfg["extract"]["extractors"]
        assert (path.parent / weights).resolve().exists()
    # Every set a later stage names is one the config makes.
    for stage in ("cluster", "index", "train"):
        assert set(cfg.get(stage, {}).get("features", [])) <= _made(cfg)


def test_the_default_config_builds_what_the_explorer_uses_and_the_full_one_more() -> None:
    default, full = _config(DEFAULT), _config(FULL)
    search = set(default["index"]["features"])
    # The explorer's heads and map are on the search set, so the default clusters and trains it.
    assert set(default["cluster"]["features"]) == search == set(default["train"]["features"])
    assert _made(default) <= _made(full)
    assert default["run"] != full["run"]


@pytest.mark.slow
def test_run_drives_every_stage_into_the_given_run_and_then_has_nothing_to_do(
        slice_collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.toml"
    config.write_text(f'run = "elsewhere"\n[extract]\ncollection = "{slice_collection}"\n'
                      'extractors = ["pca"]\n[cluster]\nk_max = 4\n[train]\ntarget = "style"\n')
    root = tmp_path / "given"
    assert main(["--no-progress", "run", "--config", str(config), "--run", str(root)]) == 0
    assert not (tmp_path / "elsewhere").exists()
    run = Run(root)
    stages = {stage for stage, _ in run.done()}
    assert {"extract", "cluster", "index", "train", "influence"} <= stages
    first = run.manifest()["steps"]
    capsys.readouterr()
    assert main(["--no-progress", "run", "--config", str(config), "--run", str(root)]) == 0
    assert "up to date" in capsys.readouterr().out
    assert run.manifest()["steps"] == first


@pytest.mark.slow
def test_run_fits_the_heads_and_review_beside_cluster_and_influence_and_reports_them_in_turn(
        slice_collection: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "tiny.toml"
    section = (f'[extract]\ncollection = "{slice_collection}"\nextractors = ["pca"]\n'
               '[cluster]\nk_max = 4\n[train]\ntarget = "{target}"\n')
    config.write_text(section.replace("{target}", "style"))
    assert main(["--no-progress", "run", "--config", str(config), "--run",
                 str(tmp_path / "run")]) == 0
    lines = capsys.readouterr().out.splitlines()
    marks = [line.split()[1] for line in lines if line.startswith("== ")]
    assert marks == ["extract", "combine", "index", "cluster", "influence", "train", "review"]
    train = next(i for i, line in enumerate(lines) if line.startswith("== train"))
    review = lines.index("== review")
    # Each one's own report (train's table, review's summary) is printed under its own line.
    assert any(line.startswith("style ") and "fitted in" in line
               for line in lines[train:review])
    assert not any("fitted in" in line and line.startswith("style ") for line in lines[:train])
    assert any(line.startswith("review (") for line in lines[review:])
    assert not any(line.startswith("review (") for line in lines[:review])
    # A head's error reaches the command in train's turn, after the stages beside it, and
    # review (after train in its thread) does not run.
    config.write_text(section.replace("{target}", "no_such_column"))
    other = tmp_path / "other"
    assert main(["--no-progress", "run", "--config", str(config), "--run", str(other)]) == 2
    assert "no_such_column" in capsys.readouterr().err
    stages = {stage for stage, _ in Run(other).done()}
    assert {"cluster", "index", "influence"} <= stages
    assert not stages & {"train", "review"}
