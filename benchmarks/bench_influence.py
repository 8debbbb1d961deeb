"""The influence stage on a finished run: time, peak memory and evaluation per feature set.

    .venv/bin/python benchmarks/bench_influence.py [--run RUN] [--features NAME]
        [--recorded ../shared/data/wikiart-pd/influences.csv]

Each feature set runs the stage in its own child process (so its peak memory is its own) in a
scratch run holding copies of what the stage reads (catalog, manifest, features, clustering and
index): the measured run is only read. The evaluation compares the method with the two baselines
computed in the same child: cosine between artists' mean vectors, and metadata alone.
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

from measure import in_child, save

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT.parent / "shared" / "data" / "wikiart-pd" / "influences.csv"


def one(run_dir: str, name: str, recorded: str) -> None:
    """Child process: run the influence stage on one feature set and print its record as JSON."""
    from influence.influence import build_influence
    from influence.runs import Run

    start = time.perf_counter()
    s = build_influence(Run(Path(run_dir)), name, Path(recorded), progress=False)
    wall = time.perf_counter() - start
    evaluation = json.loads((Path(run_dir) / "influence" / "evaluation.json").read_text())
    print(json.dumps({"artists": s["artists"], "pairs": s["pairs"], "families": s["families"],
                      "seconds": s["timings"], "wall_s": round(wall, 2),
                      "evaluation": evaluation["table"],
                      "edges_used": evaluation["edges_used"],
                      "artists_with_recorded": evaluation["artists_with_recorded"],
                      "against_time_rule": evaluation["against_time_rule"],
                      "per_artist": evaluation["results"]["method"]["artists"]}))


def scratch_run(source: Path, name: str, dest: Path) -> Path:
    """A run holding copies of what the influence stage reads for one feature set."""
    for sub in ("features", "index", "clusters"):
        (dest / sub).mkdir(parents=True)
    for file in ("catalog.parquet", "run.json"):
        shutil.copy2(source / file, dest / file)
    for file in source.glob(f"features/{name}.*"):
        if file.is_file():
            shutil.copy2(file, dest / "features" / file.name)
    for ext in ("faiss", "json"):
        shutil.copy2(source / "index" / f"{name}.{ext}", dest / "index" / f"{name}.{ext}")
    shutil.copytree(source / "clusters" / name, dest / "clusters" / name)
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default=str(ROOT / "data" / "runs" / "wikiart-pd-full"))
    parser.add_argument("--features", action="append", default=[], metavar="NAME",
                        help="feature set(s) (repeat or comma-separate; default: every indexed "
                             "and clustered one)")
    parser.add_argument("--recorded", default=str(RECORDED), help="recorded influences CSV")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "influence.json"))
    parser.add_argument("--one", nargs=3, metavar=("RUN", "NAME", "CSV"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return

    from influence.index import indexed_features
    from influence.readers import clustered_features
    from influence.runs import Run

    source = Run(Path(args.run))
    ready = sorted(set(indexed_features(source)) & set(clustered_features(source)))
    names = [n for v in args.features for n in v.split(",") if n] or ready
    missing = [n for n in names if n not in ready]
    if not names or missing:
        raise SystemExit(f"error: {', '.join(missing) or 'no feature set'} not indexed and "
                         f"clustered in {source.root} (ready: {', '.join(ready) or 'none'})")
    scratch = Path(tempfile.mkdtemp(prefix="bench-influence-"))
    results = {"run": str(source.root), "recorded": str(Path(args.recorded).resolve()),
               "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                           "load_average_at_start": [round(v, 2) for v in os.getloadavg()]}}
    features = {}
    try:
        for name in names:
            run = scratch_run(source.root, name, scratch / name)
            features[name] = in_child([__file__, "--one", str(run), name, args.recorded])
            if "error" not in features[name]:
                print(f"{name}: {features[name]['wall_s']} s", file=sys.stderr)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["features"] = features
    results["machine"]["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    save(results, Path(args.out))

    lines = [["features", "scores", "AUC", "hit@5", "MRR", "stage s", "peak MB"]]
    for name, r in features.items():
        if "error" in r:
            lines.append([name, r["error"], "", "", "", "", ""])
            continue
        for n, row in enumerate(r["evaluation"]):
            lines.append([name if n == 0 else "", row["scores"], f"{row['auc']:.3f}",
                          f"{row['hit@5']:.3f}", f"{row['mrr']:.3f}",
                          f"{r['wall_s']:.1f}" if n == 0 else "",
                          f"{r['peak_rss_mb']:.0f}" if n == 0 else ""])
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    for line in lines:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
