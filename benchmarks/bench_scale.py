"""Every stage at several collection sizes: seconds, peak memory and growth, in one run.

    .venv/bin/python benchmarks/bench_scale.py [--sizes 7000,25000,100000]
        [--extractors pca,mobilenet_v2] [--root data/scale] [--no-app] [--stages a,b]

For each size N, `make_collection.py` varies the shared paintings into data/scale/N/ (kept, so a
second run reuses it), then each stage runs from the command line in its own child process on
data/scale/N/run: extract, cluster, index, train, influence, and warm `similar` queries. Each
record has the stage's seconds and the child's peak memory; the growth exponent between two sizes
is log(t2 / t1) / log(n2 / n1). At the smallest size past the clustering's fit sample, one
feature set is also clustered in full, to measure what the sample fit costs (`cluster_shortcut`:
NMI between the partitions, both fits' scores). At the largest size the explorer is measured by
`bench_app.py` (start, the map's first paint, an upload's answer). The JSON also checks the
targets of issue 12 (`targets`). Nothing is written to the shared collection.

`--stages` runs only some stages (at every size) and merges their records into the JSON already
at `--out`, so the long extraction can be measured once and the later stages again after a
change; each record keeps the load average it was taken under.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

from measure import in_child, save

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet_features.pth"
RECORDED = SHARED / "data" / "wikiart-pd" / "influences.csv"
STAGES = ("extract", "cluster", "index", "train", "influence", "similar")
QUERIES = 20


def child_stage(argv: list[str]) -> None:
    """Child process: one CLI stage, timed; prints its record as JSON."""
    from influence.pipeline import main

    start = time.perf_counter()
    status = main(["--no-progress", *argv])
    print(json.dumps({"status": status, "seconds": round(time.perf_counter() - start, 2)}))


def child_similar(run_dir: str) -> None:
    """Child process: load the explorer once, then time warm single-image queries (embedding
    included: `seconds`) and the same answers for indexed paintings (search, similar artists,
    heads and clusters without embedding: `search_s`)."""
    from influence.runs import Run
    from influence.similar import Explorer

    run = Run(Path(run_dir))
    start = time.perf_counter()
    explorer = Explorer(run)
    loaded = time.perf_counter() - start
    catalog = run.catalog()
    step = max(1, len(catalog) // QUERIES)
    files = [run.image_path(f) for f in catalog["file"].iloc[::step][:QUERIES]]
    explorer.query(files[0])
    times = [explorer.query(f)["seconds"] for f in files]
    ids = catalog["image_id"].iloc[::step][:QUERIES]
    search = [explorer.neighbours_of(i)["seconds"] for i in ids]
    print(json.dumps({"status": 0, "seconds": round(statistics.median(times), 4),
                      "p90_s": round(sorted(times)[int(0.9 * (len(times) - 1))], 4),
                      "search_s": round(statistics.median(search), 4),
                      "load_s": round(loaded, 2), "features": explorer.features,
                      "queries": len(times)}))


def child_shortcut(run_dir: str, features: str) -> None:
    """Child process: what fitting on a sample costs against a full fit of the same features:
    NMI between the two partitions, both fits' scores, k and seconds."""
    import numpy as np
    from sklearn.metrics import normalized_mutual_info_score

    from influence.cluster import FIT_SAMPLE, fit_clustering
    from influence.runs import Run

    x = np.asarray(Run(Path(run_dir)).features(features))
    fits = {}
    for name, limit in (("sample", FIT_SAMPLE), ("full", len(x))):
        start = time.perf_counter()
        fits[name] = fit_clustering(x, progress=False, name=features, fit_sample=limit)
        fits[name].timings["total"] = time.perf_counter() - start
    sample, full = fits["sample"], fits["full"]
    print(json.dumps({
        "status": 0, "features": features, "rows": len(x), "fit_sample": FIT_SAMPLE,
        "nmi": {"kmeans": round(normalized_mutual_info_score(full.clusters.labels_,
                                                             sample.clusters.labels_), 4),
                "gmm": round(normalized_mutual_info_score(full.clusters.gmm_labels_,
                                                          sample.clusters.gmm_labels_), 4)},
        **{name: {"k": fit.clusters.k_, "scores": {m: {s: round(v, 4) for s, v in sc.items()}
                                                   for m, sc in fit.clusters.scores_.items()},
                  "seconds": {s: round(v, 2) for s, v in fit.timings.items()}}
           for name, fit in fits.items()}}))


def shortcut(sizes: list[int], root: Path, extractors: str) -> dict:
    """The sample fit against a full fit, at the smallest size past FIT_SAMPLE, on the last
    extractor (the learned one by default)."""
    from influence.cluster import FIT_SAMPLE

    past = [n for n in sizes if n > FIT_SAMPLE]
    if not past:
        return {"skipped": f"no size above the fit sample ({FIT_SAMPLE})"}
    features = [e for e in extractors.split(",") if e][-1]
    record = in_child([__file__, "--shortcut", str(root / str(past[0]) / "run"), features])
    print(f"{past[0]:>7} shortcut  {record}", file=sys.stderr, flush=True)
    return record


def stage_args(stage: str, run: Path, collection: Path, extractors: str) -> list[str]:
    """The command line of one stage at one size."""
    common = ["--run", str(run)]
    if stage == "extract":
        weights = (["--weights", f"mobilenet_v2={MOBILENET}"]
                   if "mobilenet_v2" in extractors.split(",") else [])
        return ["extract", *common, "--collection", str(collection), "--extractors", extractors,
                *weights]
    if stage == "train":
        # Logistic heads: `auto` fits each kind again to choose, which measures the choice three
        # times over rather than the head.
        return ["train", *common, "--target", "style,genre,artist,nationality",
                "--head", "logistic"]
    if stage == "influence":
        return ["influence", *common, "--recorded", str(RECORDED)]
    return [stage, *common]


def growth(sizes: list[int], values: list[float | None]) -> list[float | None]:
    """Growth exponents between consecutive sizes: log(t2 / t1) / log(n2 / n1)."""
    out = []
    for i in range(1, len(sizes)):
        (n1, t1), (n2, t2) = (sizes[i - 1], values[i - 1]), (sizes[i], values[i])
        ok = t1 is not None and t2 is not None and t1 > 0 and t2 > 0
        out.append(round(math.log(t2 / t1) / math.log(n2 / n1), 3) if ok else None)
    return out


def targets(result: dict) -> dict[str, dict]:
    """Issue 12's targets, checked on this run's records (largest and smallest sizes)."""
    sizes = result["sizes"]
    small, large = str(sizes[0]), str(sizes[-1])
    stage = result["stages"]
    out: dict[str, dict] = {}

    def check(name: str, value: float | None, limit: float, below: bool = True) -> None:
        passed = value is not None and (value <= limit if below else value >= limit)
        out[name] = {"value": value, "limit": limit, "passed": passed}

    extract_small = stage["extract"].get(small, {}).get("peak_rss_mb")
    extract_large = stage["extract"].get(large, {}).get("peak_rss_mb")
    check("extract peak memory, largest / smallest", round(extract_large / extract_small, 3)
          if extract_small and extract_large else None, 1.10)
    check("cluster seconds per feature set at the largest size",
          stage["cluster"].get(large, {}).get("seconds_per_feature_set"), 180)
    check("index seconds at the largest size", stage["index"].get(large, {}).get("seconds"), 30)
    check("similar median seconds at the largest size",
          stage["similar"].get(large, {}).get("seconds"), 0.05)
    if result.get("app"):
        check("map first paint seconds at the largest size",
              result["app"].get("views_s", {}).get("map"), 2.0)
    for name in STAGES:
        if name in ("extract", "similar"):
            continue
        exponents = [g for g in result["growth"][name] if g is not None]
        check(f"{name} growth exponent (largest)", max(exponents) if exponents else None, 1.2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="7000,25000,100000")
    parser.add_argument("--extractors", default="pca,mobilenet_v2")
    parser.add_argument("--root", default=str(ROOT / "data" / "scale"))
    parser.add_argument("--no-app", dest="app", action="store_false")
    parser.add_argument("--stages", default=",".join(STAGES),
                        help="stages to measure; the others keep their records from --out")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "scale.json"))
    parser.add_argument("--stage", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--similar", help=argparse.SUPPRESS)
    parser.add_argument("--shortcut", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        child_stage(args.stage)
        return
    if args.similar:
        child_similar(args.similar)
        return
    if args.shortcut:
        child_shortcut(*args.shortcut)
        return

    sizes = sorted(int(s) for s in args.sizes.split(",") if s)
    stages = [s for s in STAGES if s in args.stages.split(",")]
    unknown = set(args.stages.split(",")) - set(STAGES)
    if unknown:
        raise SystemExit(f"error: unknown stages {sorted(unknown)}; choose from {STAGES}")
    n_features = len([e for e in args.extractors.split(",") if e])
    out = Path(args.out)
    earlier = json.loads(out.read_text()) if out.exists() and len(stages) < len(STAGES) else {}
    if earlier and (earlier.get("sizes") != sizes or earlier.get("extractors") != args.extractors):
        raise SystemExit(f"error: {out} holds sizes {earlier.get('sizes')} of "
                         f"{earlier.get('extractors')}; give the same, or measure every stage")
    result: dict = {"sizes": sizes, "extractors": args.extractors,
                    "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                                "platform": platform.platform()},
                    "collections": {}, "stages": {s: {} for s in STAGES}}
    for s, records in earlier.get("stages", {}).items():
        result["stages"][s] = records
    for n in sizes:
        collection = Path(args.root) / str(n)
        start = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "make_collection.py"), str(n),
                        str(collection)], check=True)
        result["collections"][str(n)] = {"path": str(collection),
                                         "seconds": round(time.perf_counter() - start, 1)}
        run = collection / "run"
        for stage in stages:
            load = [round(v, 2) for v in os.getloadavg()]
            if stage == "similar":
                record = in_child([__file__, "--similar", str(run)])
            else:
                record = in_child([__file__, "--stage",
                                   *stage_args(stage, run, collection, args.extractors)])
            if stage == "cluster" and "seconds" in record:
                record["seconds_per_feature_set"] = round(record["seconds"] / n_features, 2)
            record["load_average_before"] = load
            result["stages"][stage][str(n)] = record
            print(f"{n:>7} {stage:<9} {record}", file=sys.stderr, flush=True)
            if record.get("status") != 0:
                raise SystemExit(f"error: {stage} failed at {n} paintings ({record}); "
                                 "see its message above")
    if "cluster" in stages:
        result["cluster_shortcut"] = shortcut(sizes, Path(args.root), args.extractors)
    elif earlier.get("cluster_shortcut"):
        result["cluster_shortcut"] = earlier["cluster_shortcut"]
    result["growth"] = {s: growth(sizes, [result["stages"][s].get(str(n), {}).get("seconds")
                                          for n in sizes]) for s in STAGES}
    if earlier.get("app") and not args.app:
        result["app"] = earlier["app"]
    if args.app:
        app_out = Path(args.out).with_name("scale-app.json")
        record = in_child([str(ROOT / "benchmarks" / "bench_app.py"), "--run",
                           str(Path(args.root) / str(sizes[-1]) / "run"), "--parts", "views",
                           "--browser-uploads", "3", "--out", str(app_out)], record=False)
        result["app"] = ({**json.loads(app_out.read_text()), "peak_rss_mb":
                          record.get("peak_rss_mb")} if app_out.exists() else record)
    result["targets"] = targets(result)
    save(result, out)
    for name, t in result["targets"].items():
        print(f"{'pass' if t['passed'] else 'MISS'}  {name}: {t['value']} (limit {t['limit']})")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
