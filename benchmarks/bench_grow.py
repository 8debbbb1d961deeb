"""A finished run grown by 1% and 10% of its paintings, against a fresh run of the grown collection.

    .venv/bin/python benchmarks/bench_grow.py [--config pipelines/wikiart-pd.toml]
        [--sample 400] [--shares 0.01,0.1] [--keep]

1. A seeded sample of `--sample` paintings of the config's collection (all of it without
   `--sample`; do not run that on a shared machine) is run fresh through every stage of the
   config (`python -m influence.pipeline run`, in a child process, each stage's wall time
   stamped from its `== stage` lines, as `bench_first_run.py` does).
2. For each share, a copy of that finished run is given the collection with that share more
   paintings (the next ones of the same seeded order) and run again: the run protocol extends
   what it can. Its seconds are set against a fresh run of the same grown collection, and what
   run.json's `changes` says was extended and refitted is kept beside them.
The issue's aim: a 1% addition under 5% of a fresh run. JSON goes to
`benchmarks/results/grow.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import tomllib
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from bench_first_run import first_run
from measure import save

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "wikiart-pd.toml"
#: Keys of a config section that name files, resolved against the config's folder.
PATHS = ("collection", "metadata", "images", "recorded", "iiif")


def toml_value(value: Any) -> str:
    """A TOML value for the plain values a pipeline config holds (JSON spells them alike)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(value)


def config_for(cfg: dict[str, Any], base: Path, metadata: Path, images: Path,
               out: Path) -> Path:
    """The config with its collection replaced by `metadata` (a CSV over `images`) and every
    path made absolute, written to `out`."""
    lines = []
    for stage, options in cfg.items():
        if stage == "run":
            continue
        options = {k: str((base / v).resolve()) if k in PATHS else v for k, v in options.items()}
        if stage == "extract":
            options.pop("collection", None)
            options.update(metadata=str(metadata), images=str(images))
            options["weights"] = {k: str((base / v).resolve())
                                  for k, v in options.get("weights", {}).items()}
        lines.append(f"[{stage}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in options.items()]
    out.write_text("\n".join(lines) + "\n")
    return out


def changes(run_dir: Path) -> list[dict[str, Any]]:
    """What run.json says was added, removed, extended and refitted (ids left out)."""
    manifest = json.loads((run_dir / "run.json").read_text())
    return [{k: v for k, v in c.items() if not k.endswith("_ids")}
            for c in manifest.get("changes", [])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--sample", type=int,
                        help="paintings of the collection the first run holds (default: all)")
    parser.add_argument("--shares", default="0.01,0.1",
                        help="growths to time, as shares of the first run (default 0.01,0.1)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch runs")
    args = parser.parse_args()
    config = Path(args.config).resolve()
    cfg = tomllib.loads(config.read_text())
    base = config.parent
    images = (base / cfg["extract"]["collection"]).resolve()
    rows = pd.read_csv(images / "paintings.csv", dtype=str, keep_default_na=False)
    shares = [float(s) for s in args.shares.split(",")]
    n = min(args.sample or len(rows), len(rows))
    grown = {s: max(1, round(n * s)) for s in shares}
    if args.sample is None:
        n = len(rows) - max(grown.values())
    order = np.random.default_rng(0).permutation(len(rows))
    scratch = Path(tempfile.mkdtemp(prefix="grow-"))
    results: dict[str, Any] = {"config": str(config), "paintings": n, "host": platform.node(),
                               "cpus": os.cpu_count(), "load_before": os.getloadavg()}
    try:
        def collection(count: int, name: str) -> Path:
            csv = scratch / f"{name}.csv"
            # The grown collection's rows in CSV order: new paintings fall anywhere in it.
            rows.iloc[np.sort(order[:count])].to_csv(csv, index=False)
            return config_for(cfg, base, csv, images, scratch / f"{name}.toml")

        first = scratch / "first"
        results["first_run"] = first_run(collection(n, "first"), first)
        for share, added in grown.items():
            grown_config = collection(n + added, f"grown-{share}")
            extended = scratch / f"extended-{share}"
            shutil.copytree(first, extended)
            grow = first_run(grown_config, extended)
            fresh = first_run(grown_config, scratch / f"fresh-{share}")
            results[f"grow_{share:g}"] = {
                "added": added, "grow": {k: grow[k] for k in ("status", "command_s", "stages")},
                "fresh": {k: fresh[k] for k in ("status", "command_s", "stages")},
                "ratio": round(grow["command_s"] / fresh["command_s"], 4),
                "changes": changes(extended),
                "log_tail": grow["log_tail"] if grow["status"] else []}
            # Saved after each share, so a run stopped early keeps what it measured.
            results["load_after"] = os.getloadavg()
            save(results, ROOT / "benchmarks" / "results" / "grow.json")
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
