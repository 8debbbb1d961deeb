"""Extraction engines compared in one run: local and Ray (local Ray, all cores), one CNN.

    .venv/bin/python benchmarks/bench_engine.py [--limit N] [--baseline /work/main] [--out FILE]

Each engine extracts `mobilenet_v2` (the shared weights) into a fresh copy of one catalog, in its
own child process, so speed and memory are its own: images/s over the whole extraction (Ray's
start included) and peak memory, the sum of the resident memory of the child and every process
under it (Ray's raylet, workers and object store included), sampled every 0.2 s. `--baseline`
also runs the local engine of another checkout (the code before this change) in the same run,
so "no slower than today" is a ratio taken at the same time on the same machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
from measure import save

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COLLECTION = SHARED / "data" / "wikiart-pd"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet_features.pth"
NAME = "mobilenet_v2"


def one(run_dir: str, engine: str) -> None:
    """Child process: extract NAME with one engine and print its record as JSON."""
    from influence.features import extract_features
    from influence.runs import Run

    kwargs: dict[str, Any] = {} if engine == "baseline" else {"engine": engine}
    start = time.perf_counter()
    info = extract_features(Run(Path(run_dir)), NAME, str(MOBILENET), progress=False, **kwargs)
    wall = time.perf_counter() - start
    print(json.dumps({"rows": info["rows"], "wall_s": round(wall, 2),
                      "images_per_s": round(info["rows"] / wall, 2),
                      "timings": info["timings"], "weights": info["weights"]}))


def measured(args: list[str], code: Path) -> dict[str, Any]:
    """Run a child with `code` first on its path; its JSON record plus its tree's peak memory."""
    env = {**os.environ, "PYTHONPATH": str(code)}
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True, env=env,
                             cwd=code)
    peak, done = [0], threading.Event()

    def sample() -> None:
        proc = psutil.Process(child.pid)
        while not done.is_set():
            try:
                tree = [proc, *proc.children(recursive=True)]
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in tree
                                           if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    if child.returncode:
        return {"error": f"exit status {child.returncode}"}
    record = json.loads(out.strip().splitlines()[-1])
    record["peak_tree_rss_mb"] = round(peak[0] / 2**20, 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, help="only the first N catalog rows")
    parser.add_argument("--baseline", type=Path,
                        help="a checkout whose local engine to time alongside (e.g. /work/main)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    parser.add_argument("--one", nargs=2, metavar=("RUN", "ENGINE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return

    sys.path.insert(0, str(ROOT))
    from influence.catalog import Collection, build_catalog
    from influence.runs import Run

    scratch = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base = Run(scratch / "base")
    catalog = build_catalog(Collection.from_dir(COLLECTION), base, progress=False).catalog
    if args.limit:
        catalog.head(args.limit).to_parquet(base.catalog_path, index=False)
    runs = [("local", ROOT), ("ray", ROOT)]
    if args.baseline:
        runs.insert(0, ("baseline", args.baseline.resolve()))
    engines = {}
    for engine, code in runs:
        run = Run(scratch / engine)
        shutil.copytree(base.root, run.root)
        engines[engine] = measured([__file__, "--one", str(run.root), engine], code)
        print(engine, engines[engine], file=sys.stderr)
    results: dict[str, Any] = {"features": NAME, "images": len(run.catalog()),
                               "cpu_count": os.cpu_count(), "engines": engines}
    rate = {e: r.get("images_per_s") for e, r in engines.items()}
    if rate.get("local") and rate.get("ray"):
        results["ray_over_local"] = round(rate["ray"] / rate["local"], 3)
    if rate.get("local") and rate.get("baseline"):
        results["local_over_baseline"] = round(rate["local"] / rate["baseline"], 3)
    save(results, Path(args.out))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
