"""Influence AUC and hit@5 of a combined `~wK` set, whitened exactly and by seeded randomized SVD.

    .venv/bin/python benchmarks/bench_whitening.py --run RUN [--seeds 8]
        [--recorded ../shared/data/wikiart-pd/influences.csv]

The combine stage whitens each part from its covariance's eigenvectors (exact, since combine
version 2); before, scikit-learn's default solver fitted 512 of 1,280 dimensions by randomized
SVD, whose result, and so the influence figures, move with its seed. This refits the run's
default combined set both ways from its stored parts (the run is only read), scores influence
on each as the stage does (`score_pairs` on the neighbour table of an exact index of the set,
`evaluation_report`), and reports the exact figures beside the randomized ones per seed: how
far the previous default's figures moved with a seed nobody chose. JSON goes to
`benchmarks/results/whitening.json`.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from bench_first_run import _cpu
from measure import save

from influence.combine import combine, fit_whitener, parse, whitening
from influence.index import build_index, neighbour_table
from influence.influence import (
    artists_table,
    baselines,
    evaluation_report,
    read_recorded,
    score_pairs,
)
from influence.readers import load_clustering
from influence.runs import Run
from influence.similar import default_features

ROOT = Path(__file__).resolve().parents[1]
RECORDED = ROOT.parent / "shared" / "data" / "wikiart-pd" / "influences.csv"


def figures(blocks: list[np.ndarray], weights: list[float], k: int, solver: str | None,
            seed: int, context: dict) -> dict[str, float]:
    """The method's AUC and hit@5 with every part whitened to k dims by `solver`."""
    whiteners = [fit_whitener(block, k, solver, seed) for block in blocks]
    x = combine(blocks, weights, whiteners)
    pairs = score_pairs(neighbour_table(build_index(x), x), context["catalog"],
                        context["artists"])
    report = evaluation_report(pairs, baselines(x, context["catalog"], context["artists"]),
                               context["artists"], context["recorded"], "recorded")
    method = report["results"]["method"]
    return {"auc": method["auc"], "hit@5": method["hit@5"], "mrr": method["mrr"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--recorded", default=str(RECORDED))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "whitening.json"))
    args = parser.parse_args()
    run = Run(Path(args.run))
    spec = default_features(run)
    k = whitening(spec)
    if not k:
        raise SystemExit(f"the run's default set '{spec}' is not whitened (~wK)")
    parts = parse(spec)
    catalog = run.catalog()
    families = load_clustering(run, spec).assignments["kmeans"].to_numpy()
    context = {"catalog": catalog, "artists": artists_table(catalog, families),
               "recorded": read_recorded(Path(args.recorded))}
    blocks = [np.asarray(run.features(p.name), dtype=np.float32) for p in parts]
    weights = [p.weight for p in parts]
    start = time.perf_counter()
    exact = figures(blocks, weights, k, None, 0, context)
    randomized = [{"seed": s, **figures(blocks, weights, k, "randomized", s, context)}
                  for s in range(args.seeds)]
    aucs = np.array([r["auc"] for r in randomized])
    results = {"run": str(Path(args.run).resolve()), "features": spec, "paintings": len(catalog),
               "cpu": _cpu(), "cores": os.cpu_count(),
               "exact": exact, "randomized": randomized,
               "randomized_auc": {"min": float(aucs.min()), "max": float(aucs.max()),
                                  "mean": round(float(aucs.mean()), 4),
                                  "std": round(float(aucs.std(ddof=1)), 4)},
               "seeds_below_exact": int((aucs < exact["auc"]).sum()),
               "seconds": round(time.perf_counter() - start, 1)}
    save(results, Path(args.out))


if __name__ == "__main__":
    main()
