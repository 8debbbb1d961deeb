"""Clustering speed and memory per feature set, stage by stage, on a finished run's features.

    .venv/bin/python benchmarks/bench_cluster.py [--run RUN] [--features NAME] [--k-max 30]

Each feature set is clustered in its own child process (so its peak memory is its own) in a
scratch run holding copies of the catalog, manifest and that feature matrix: the measured run is
only read. The times are the stage's own (`cluster_features`: reduce, KMeans sweep, GMM sweep,
scores, UMAP, profiles, write). The map is laid out in numpy (`influence.estimators.layout`):
nothing is compiled, so the first feature set pays what every later one does.
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

from measure import in_child

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("reduce", "kmeans_sweep", "gmm_sweep", "scores", "umap", "profiles", "write", "total")


def one(run_dir: str, name: str, k_min: int, k_max: int) -> None:
    """Child process: cluster one feature set and print its record as JSON."""
    from influence.cluster import cluster_features
    from influence.runs import Run

    run = Run(Path(run_dir))
    start = time.perf_counter()
    s = cluster_features(run, name, k_min=k_min, k_max=k_max, progress=False)
    wall = time.perf_counter() - start
    print(json.dumps({
        "rows": s["rows"], "input_dims": s["reduction"]["input_dims"],
        "pca_dims": s["reduction"]["pca_dims"], "standardised": s["reduction"]["standardised"],
        "silhouette_rows": s["reduction"]["silhouette_rows"], "k": s["k"],
        "k_range": [k_min, k_max], "choice": s["choice"]["method"].split(" (")[0],
        "gmm_bic_best_k": s["gmm"]["bic_best_k"], "gmm_converged": s["gmm"]["converged"],
        "scores": s["scores"], "seconds": {k: s["timings"].get(k, 0.0) for k in STAGES},
        "wall_s": round(wall, 2)}))


def scratch_run(source: Path, name: str, dest: Path) -> Path:
    """A run holding copies of the source's catalog, manifest and one feature set."""
    (dest / "features").mkdir(parents=True)
    for file in ("catalog.parquet", "run.json"):
        shutil.copy2(source / file, dest / file)
    for ext in ("npy", "json"):
        shutil.copy2(source / "features" / f"{name}.{ext}", dest / "features" / f"{name}.{ext}")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "data" / "runs" / "wikiart-pd-full"))
    parser.add_argument("--features", action="append", default=[], metavar="NAME",
                        help="feature set(s) to cluster (repeat or comma-separate; default all)")
    parser.add_argument("--k-min", type=int, default=2)
    parser.add_argument("--k-max", type=int, default=30)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "cluster.json"))
    parser.add_argument("--one", nargs=2, metavar=("RUN", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one, args.k_min, args.k_max)
        return

    from influence.runs import InfluenceError, Run

    source = Run(Path(args.run))
    names = [n for v in args.features for n in v.split(",") if n] or source.feature_names()
    missing = [n for n in names if n not in source.feature_names()]
    if not names or missing:
        raise SystemExit(f"error: no finished features {', '.join(missing) or ''} in {source.root}"
                         f" (has: {', '.join(source.feature_names()) or 'none'})")
    scratch = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results = {"run": str(source.root), "k_range": [args.k_min, args.k_max],
               "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                           "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}}
    features = {}
    try:
        for name in names:
            run = scratch_run(source.root, name, scratch / name)
            record = in_child([__file__, "--one", str(run), name, "--k-min", str(args.k_min),
                               "--k-max", str(args.k_max)])
            features[name] = record
            if "error" in record:
                continue
            print(f"{name}: {record['wall_s']} s, k = {record['k']}", file=sys.stderr)
    except InfluenceError as e:
        raise SystemExit(f"error: {e}") from None
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["features"] = features
    results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    results["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")

    header = ["features", "rows", "dims", "k", *(s.replace("_sweep", "") for s in STAGES),
              "peak MB"]
    lines = [header]
    for name, r in features.items():
        if "error" in r:
            lines.append([name, r["error"]] + [""] * (len(header) - 2))
            continue
        lines.append([name, str(r["rows"]), f"{r['input_dims']}->{r['pca_dims']}", str(r["k"]),
                      *(f"{r['seconds'][s]:.1f}" for s in STAGES), f"{r['peak_rss_mb']:.0f}"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    for line in lines:
        print("  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)))
    print(f"seconds per stage; -> {args.out}")


if __name__ == "__main__":
    main()
