"""Search speed and quality per feature set: query latency, artist retrieval, head metrics.

    .venv/bin/python benchmarks/bench_search.py [--run data/runs/wikiart-pd] [--queries 50]

For each indexed feature set, in one warm process: an `Explorer` is built (its start-up timed),
answers one warm-up query, then `--queries` collection paintings read from disk, one at a time as
`similar` and the app ask them (decode, embed, search, heads, clusters; target median < 50 ms).
Also reported: the bare faiss search time for one stored vector, how often a painting finds itself
first (the query path reproduces the stored features), the leave-one-out artist retrieval recorded
by `index` and the metrics of every head trained on the feature set. The run is only read: feature
sets without an index are indexed into a scratch directory that links to the run's features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HEAD_METRICS = ("accuracy", "macro_precision", "macro_recall", "macro_f1", "top5_accuracy",
                "chance_accuracy", "n_train", "n_test", "converged")


def scratch_run(run_root: Path, scratch: Path) -> Path:
    """A run directory that shares the run's catalog, features and manifest but not its outputs."""
    scratch.mkdir(parents=True, exist_ok=True)
    for name in ("catalog.parquet", "features", "run.json"):
        (scratch / name).symlink_to(run_root / name)
    for name in ("models", "clusters"):
        if (run_root / name).exists():
            (scratch / name).symlink_to(run_root / name)
    return scratch


def percentile_ms(seconds: list[float], q: float) -> float:
    return round(float(np.percentile(seconds, q)) * 1000, 1)


def bench_features(run, name: str, queries: int) -> dict:
    """Latency of one-image queries in a warm Explorer, and search-only time, for a feature set."""
    from influence.index import load_index, search
    from influence.similar import Explorer

    start = time.perf_counter()
    explorer = Explorer(run, name)
    startup = time.perf_counter() - start
    catalog = run.catalog()
    rng = np.random.default_rng(0)
    rows = rng.choice(len(catalog), size=min(queries + 1, len(catalog)), replace=False)
    paths = [run.image_path(f) for f in catalog["file"].to_numpy()[rows]]
    explorer.query(paths[0])  # warm-up: first-call allocations, lazily loaded clustering model
    latency, self_first = [], 0
    for row, path in zip(rows[1:], paths[1:], strict=True):
        start = time.perf_counter()
        answer = explorer.query(path, k=10)
        latency.append(time.perf_counter() - start)
        self_first += answer["paintings"][0]["image_id"] == catalog["image_id"].iloc[row]
    index, x = load_index(run, name), np.asarray(run.features(name))
    search_s = []
    for row in rows[1:]:
        start = time.perf_counter()
        search(index, x[row:row + 1], 50)
        search_s.append(time.perf_counter() - start)
    return {"startup_s": round(startup, 2), "queries": len(latency),
            "median_ms": percentile_ms(latency, 50), "p90_ms": percentile_ms(latency, 90),
            "max_ms": percentile_ms(latency, 100),
            "search_only_median_ms": percentile_ms(search_s, 50),
            "finds_itself_first": round(self_first / len(latency), 3),
            "heads_used": explorer.targets}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "data" / "runs" / "wikiart-pd-full"))
    parser.add_argument("--features", help="comma-separated feature sets (default: all)")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "search.json"))
    args = parser.parse_args()

    from influence.index import build_run_index, index_paths, indexed_features
    from influence.runs import Run, read_json

    run = Run(Path(args.run))
    names = args.features.split(",") if args.features else run.feature_names()
    scratch = None
    if not set(names) <= set(indexed_features(run)):
        scratch = Path(tempfile.mkdtemp(prefix="bench-search-"))
        run = Run(scratch_run(run.root, scratch / "run"))
        for name in names:
            build_run_index(run, name)
    catalog = run.catalog()
    results = {"run": str(Path(args.run).resolve()), "paintings": len(catalog),
               "artists": int(catalog["artist"].nunique()),
               "index_built_in_scratch": scratch is not None,
               "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                           "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
               "features": {}}
    heads = [read_json(p) for p in sorted(run.models_dir.glob("*.json"))] \
        if run.models_dir.exists() else []
    for name in names:
        info = read_json(index_paths(run, name)[1])
        entry = {"weights": info.get("weights"), "index": info["kind"], "dim": info["dim"],
                 "leave_one_out": info["leave_one_out"],
                 "latency": bench_features(run, name, args.queries),
                 "heads": {h["target"]: {k: h.get(k) for k in HEAD_METRICS}
                           | {"classes": len(h["classes"])}
                           for h in heads if h.get("features") == name and "target" in h}}
        results["features"][name] = entry
        lat = entry["latency"]
        print(f"{name}: median {lat['median_ms']} ms, p90 {lat['p90_ms']} ms, artist top-5 "
              f"{entry['leave_one_out']['artist_top5']}, heads {sorted(entry['heads'])}",
              file=sys.stderr)
    results["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if scratch is not None:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
