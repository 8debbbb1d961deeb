"""Heads: the previous recipe against the current one, time and held-out accuracy, same machine.

    .venv/bin/python benchmarks/bench_heads.py --run RUN [--heads style/mobilenet_v2,...] [--all]

Each head is fitted in its own child process on the run's recorded split of its target, twice:
`previous` is the recipe the `train` stage used before (`auto`: a logistic regression and a soft
vote of three scikit-learn MLPs on all feature columns fitted on 80 % of the training part, the
better on the other 20 % refitted on all of it; default BLAS threads), `current` is
`make_estimator("auto")` fitted as the stage fits it (`THREADS` BLAS threads). With
`--all`, the whole `train` stage (every target and feature set asked, `auto`) is then timed on a
scratch copy of the run with the current code. The machine is shared: every figure carries the
load average before and after it. Results: `benchmarks/results/heads.json` via `measure.save`.
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
THREE = "mobilenet_v2+efficientnet_lite0+style"
HEADS = (f"style/{THREE}", f"genre/{THREE}", f"artist/{THREE}", "style/mobilenet_v2",
         "genre/mobilenet_v2")
TARGETS = ("style", "genre", "artist", "nationality")
FEATURES = ("pca", "kpca", "mobilenet_v2", "efficientnet_lite0", "style", THREE,
            f"{THREE}@0.5~w512")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def previous_head(kind: str):
    """The head the `train` stage fitted before this recipe (influence 0.1.0, VERSION 2)."""
    from sklearn.ensemble import VotingClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer, StandardScaler

    if kind == "mlp":
        model = VotingClassifier(
            [(f"seed{seed}", MLPClassifier(hidden_layer_sizes=(512,), alpha=1.0,
                                           early_stopping=True, n_iter_no_change=10,
                                           max_iter=1000, random_state=seed))
             for seed in range(3)], voting="soft")
    else:
        model = LogisticRegression(C=0.1, class_weight="balanced", max_iter=1000, random_state=0)
    return make_pipeline(Normalizer(), StandardScaler(), model)


def previous_auto(x, y):
    """The previous `auto`: both kinds on 80 % of the training part, the better refitted."""
    from sklearn.metrics import accuracy_score
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(range(len(y)), test_size=0.2, random_state=0, stratify=y)
    scores = {kind: float(accuracy_score(y[val], previous_head(kind).fit(x[fit], y[fit])
                                         .predict(x[val]))) for kind in ("logistic", "mlp")}
    kind = max(scores, key=scores.get)
    return previous_head(kind).fit(x, y), kind, scores


def one(run_dir: str, head: str, recipe: str) -> None:
    """Child process: fit one head by one recipe on its recorded split; print its record."""
    import warnings

    import numpy as np
    from threadpoolctl import threadpool_limits

    from influence.runs import Run
    from influence.train import THREADS, fit_sample, make_estimator, run_split

    warnings.filterwarnings("ignore")
    target, features = head.split("/", 1)
    run = Run(Path(run_dir))
    catalog = run.catalog()
    split, _ = run_split(run, target, catalog)
    row = {image: i for i, image in enumerate(catalog["image_id"])}
    x = np.asarray(run.features(features), dtype=np.float32)[[row[i] for i in split["image_id"]]]
    labels = split["label"].to_numpy(dtype=object)
    train = np.flatnonzero((split["part"] != "test").to_numpy())
    train = train[fit_sample(labels[train])]
    test = (split["part"] == "test").to_numpy()
    before = load()
    start = time.perf_counter()
    if recipe == "previous":
        model, kind, scores = previous_auto(x[train], labels[train])
    else:
        with threadpool_limits(THREADS):  # as the train stage fits it
            model = make_estimator("auto").fit(x[train], labels[train])
        kind, scores = model[-1].kind_, model[-1].validation_accuracy_
    seconds = time.perf_counter() - start
    print(json.dumps({"head": head, "recipe": recipe, "fit_s": round(seconds, 2), "kind": kind,
                      "validation_accuracy": scores, "n_train": int(len(train)),
                      "accuracy": round(float((model.predict(x[test]) == labels[test]).mean()), 4),
                      "n_test": int(test.sum()), "load_before": before, "load_after": load()}))


def whole(run_dir: str, features: list[str]) -> None:
    """Child process: the whole `train` stage, current code, every target; print its record."""
    from influence.runs import Run
    from influence.train import train_heads

    run = Run(Path(run_dir))
    before = load()
    start = time.perf_counter()
    heads = train_heads(run, TARGETS, features, progress=False, drop_small_classes=True)
    seconds = time.perf_counter() - start
    print(json.dumps({"heads": len(heads), "seconds": round(seconds, 1), "load_before": before,
                      "load_after": load(),
                      "per_head": [{"head": f"{h['target']}/{h['features']}", "kind": h["head"],
                                    "accuracy": round(h["accuracy"], 4),
                                    "fit_s": h["timings"]["fit_s"]} for h in heads]}))


def scratch_run(source: Path, features: list[str], dest: Path) -> Path:
    """A run holding copies of the source's catalog, manifest and the feature sets asked."""
    (dest / "features").mkdir(parents=True)
    for file in ("catalog.parquet", "run.json"):
        shutil.copy2(source / file, dest / file)
    for name in features:
        for ext in ("npy", "json"):
            shutil.copy2(source / "features" / f"{name}.{ext}",
                         dest / "features" / f"{name}.{ext}")
    return dest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", help="a run with the feature sets extracted (required)")
    parser.add_argument("--heads", default=",".join(HEADS),
                        help="target/features pairs compared, comma-separated")
    parser.add_argument("--recipes", default="previous,current")
    parser.add_argument("--all", action="store_true",
                        help="then time the whole train stage (current code) on --features")
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heads.json"))
    parser.add_argument("--one", nargs=3, metavar=("RUN", "HEAD", "RECIPE"), help=argparse.SUPPRESS)
    parser.add_argument("--whole", nargs=2, metavar=("RUN", "FEATURES"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return
    if args.whole:
        whole(args.whole[0], args.whole[1].split(","))
        return
    if not args.run:
        parser.error("--run is required")
    heads = [h for h in args.heads.split(",") if h]
    features = [f for f in args.features.split(",") if f] if args.all else []
    needed = sorted({h.split("/", 1)[1] for h in heads} | set(features))
    scratch = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    results = {"run": str(Path(args.run).resolve()),
               "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                           "load_average_at_start": load()}, "heads": []}
    try:
        run = scratch_run(Path(args.run), needed, scratch / "run")
        for head in heads:
            for recipe in args.recipes.split(","):
                record = in_child([__file__, "--one", str(run), head, recipe])
                results["heads"].append(record)
                print(json.dumps(record), file=sys.stderr, flush=True)
        if features:
            shutil.rmtree(run / "models", ignore_errors=True)
            results["train"] = in_child([__file__, "--whole", str(run), ",".join(features)])
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results["machine"]["load_average_at_end"] = load()
    save(results, Path(args.out))


if __name__ == "__main__":
    main()
