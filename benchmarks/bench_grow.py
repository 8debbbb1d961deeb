"""A finished run grown by 1% and 10% of its paintings, against a fresh run of the grown collection.

    .venv/bin/python benchmarks/bench_grow.py [--config pipelines/wikiart-pd.toml]
        [--sample 400] [--shares 0.01,0.1] [--keep]
    .venv/bin/python benchmarks/bench_grow.py --from data/runs/wikiart-pd --shares 0.01
        [--fresh-s 348]

1. A seeded sample of `--sample` paintings of the config's collection (all of it without
   `--sample`; do not run that on a shared machine) is run fresh through every stage of the
   config (`python -m influence.pipeline run`, in a child process, each stage's wall time
   stamped from its `== stage` lines, as `bench_first_run.py` does).
2. For each share, a copy of that finished run is given the collection with that share more
   paintings (the next ones of the same seeded order) and run again: the run protocol extends
   what it can. Its seconds are set against a fresh run of the same grown collection, and what
   run.json's `changes` says was extended and refitted is kept beside them.

With `--from RUN` (a finished run of the config's whole collection, left as it is) step 1 is
skipped: for each share a copy of RUN is given the collection less that share's paintings (the
last of the seeded order: a removal, which the protocol extends), the removed paintings' feature
rows, thumbnails and kept pixels are forgotten, so they are new to it, and the whole collection
is then run again: that addition is what is timed. The fresh run's seconds are `--fresh-s`
(e.g. from `benchmarks/results/first_run.json`) or, without it, measured.
The issue's aim: a 1% addition under 5% of a fresh run. JSON goes to
`benchmarks/results/grow.json`.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
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


def forget(run_dir: Path, ids: set[str]) -> None:
    """Make paintings new to a run they were removed from: their rows leave every feature set's
    parts and the kept pixels, their thumbnails go (the catalog's check cache already lost them
    with the removal), so an addition extracts and makes them again."""
    for folder in [*run_dir.glob("features/*.parts"), *run_dir.glob(".cache/decoded-*")]:
        for path in folder.glob("*.npz"):
            with np.load(path) as z:
                arrays = {k: z[k] for k in z.files}
            keep = ~np.isin(arrays["ids"], list(ids))
            if keep.all():
                continue
            arrays.update(ids=arrays["ids"][keep], x=arrays["x"][keep])
            buffer = io.BytesIO()
            np.savez(buffer, **arrays)
            path.write_bytes(buffer.getvalue())
    for image_id in ids:
        (run_dir / "thumbs" / f"{image_id}.jpg").unlink(missing_ok=True)


def measured(config: Path, run_dir: Path) -> dict[str, Any]:
    """`first_run` with the command's CPU seconds (user + system, its children included): on a
    shared machine the wall time grows with the load, the CPU time much less."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = first_run(config, run_dir)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out["cpu_s"] = round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1)
    return out


def timed(run: dict[str, Any]) -> dict[str, Any]:
    return {k: run[k] for k in ("status", "command_s", "cpu_s", "stages", "beside_s") if k in run}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--sample", type=int,
                        help="paintings of the collection the first run holds (default: all)")
    parser.add_argument("--shares", default="0.01,0.1",
                        help="growths to time, as shares of the first run (default 0.01,0.1)")
    parser.add_argument("--from", dest="source", metavar="RUN",
                        help="a finished run of the whole collection to start from (copied)")
    parser.add_argument("--fresh-s", type=float, metavar="SECONDS",
                        help="a fresh run's seconds, instead of measuring one")
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
    if args.sample is None and not args.source:
        n = len(rows) - max(grown.values())
    order = np.random.default_rng(0).permutation(len(rows))
    scratch = Path(tempfile.mkdtemp(prefix="grow-"))
    results: dict[str, Any] = {"config": str(config), "paintings": n, "host": platform.node(),
                               "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    try:
        def collection(count: int, name: str) -> Path:
            csv = scratch / f"{name}.csv"
            # The grown collection's rows in CSV order: new paintings fall anywhere in it.
            rows.iloc[np.sort(order[:count])].to_csv(csv, index=False)
            return config_for(cfg, base, csv, images, scratch / f"{name}.toml")

        first = scratch / "first"
        if args.source:
            results["from"] = str(Path(args.source).resolve())
        else:
            results["first_run"] = measured(collection(n, "first"), first)
        for share, added in grown.items():
            extended = scratch / f"extended-{share}"
            if args.source:
                shutil.copytree(args.source, extended)
                before = {*pd.read_parquet(extended / "catalog.parquet")["image_id"]}
                removal = measured(collection(len(rows) - added, f"less-{share}"), extended)
                kept = {*pd.read_parquet(extended / "catalog.parquet")["image_id"]}
                forget(extended, before - kept)
                grown_config = collection(len(rows), "whole")
            else:
                grown_config = collection(n + added, f"grown-{share}")
                shutil.copytree(first, extended)
            grow = measured(grown_config, extended)
            fresh = ({"status": 0, "command_s": args.fresh_s, "stages": "given (--fresh-s)"}
                     if args.fresh_s else measured(grown_config, scratch / f"fresh-{share}"))
            results[f"grow_{share:g}"] = {
                "added": added, "grow": timed(grow), "fresh": timed(fresh),
                **({"removal_before": timed(removal)} if args.source else {}),
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
