"""Heads: the `train` stage of a previous checkout against this one, time and held-out accuracy.

    .venv/bin/python benchmarks/bench_heads.py --run RUN --baseline ../previous-checkout \
        [--features a,b,...] [--targets style,...] [--single style/FEATURES]

`RUN` holds the feature sets asked (the full config's seven by default); `--baseline` is a
checkout of the code to compare with (`git worktree add ../previous-checkout COMMIT`). Each code
runs the whole `train` stage (`--drop-small-classes`, `auto`) on its own scratch copy of the
run's catalog and features, with no heads, in a child process; then `--single` heads are trained
alone by each code back to back, for a ratio less exposed to a shared machine's load. Every
figure carries the load average before and after it and the child's CPU seconds. Results, with
each head's held-out accuracy, top-5 and fit seconds under both codes:
`benchmarks/results/heads.json` via `measure.save`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from measure import save

ROOT = Path(__file__).resolve().parents[1]
THREE = "mobilenet_v2+efficientnet_lite0+style"
TARGETS = ("style", "genre", "artist", "nationality")
FEATURES = ("pca", "kpca", "mobilenet_v2", "efficientnet_lite0", "style", THREE,
            f"{THREE}@0.5~w512")
SINGLE = (f"artist/{THREE}@0.5~w512", f"style/{THREE}")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def scratch_run(source: Path, features: list[str], dest: Path) -> Path:
    """A run holding copies of the source's catalog, manifest and the feature sets asked."""
    (dest / "features").mkdir(parents=True)
    for file in ("catalog.parquet", "run.json"):
        shutil.copy2(source / file, dest / file)
    for name in features:
        for path in (source / "features").glob(f"{name}.*"):
            if path.name in (f"{name}.npy", f"{name}.json"):
                shutil.copy2(path, dest / "features" / path.name)
    return dest


def train(code: Path, run: Path, targets: list[str], features: list[str]) -> dict[str, Any]:
    """The `train` stage of the checkout `code` on `run`, timed in a child process."""
    before = load()
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "influence.pipeline", "train", "--run",
                              str(run), "--drop-small-classes", "--target", ",".join(targets),
                              "--features", ",".join(features)], cwd=code,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"train failed in {code} (exit status {status})")
    heads = {}
    for path in sorted((run / "models").glob("*.json")):
        info = json.loads(path.read_text())
        if "timings" in info:
            heads[f"{info['target']}/{info['features']}"] = {
                "kind": info["head"], "accuracy": round(info["accuracy"], 4),
                "top5_accuracy": round(info["top5_accuracy"], 4),
                "macro_f1": round(info["macro_f1"], 4), "ece": round(info["ece"], 4),
                "validation_accuracy": info["head_choice"]["validation_accuracy"],
                **info["timings"]}
    return {"code": str(code), "seconds": round(seconds, 1),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 1), "load_before": before,
            "load_after": load(), "heads": heads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run with the feature sets extracted")
    parser.add_argument("--baseline", required=True, help="a checkout of the code to compare with")
    parser.add_argument("--features", default=",".join(FEATURES))
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--single", default=",".join(SINGLE),
                        help="target/features heads also trained alone by each code")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "heads.json"))
    args = parser.parse_args()
    features = [f for f in args.features.split(",") if f]
    targets = [t for t in args.targets.split(",") if t]
    codes = {"previous": Path(args.baseline).resolve(), "current": ROOT}
    results: dict[str, Any] = {
        "run": str(Path(args.run).resolve()),
        "machine": {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                    "load_average_at_start": load()}, "whole": {}, "single": []}
    scratch = Path(tempfile.mkdtemp(prefix="bench-heads-"))
    try:
        for name, code in codes.items():
            run = scratch_run(Path(args.run), features, scratch / name)
            results["whole"][name] = train(code, run, targets, features)
            print(name, results["whole"][name]["seconds"], "s", file=sys.stderr, flush=True)
            shutil.rmtree(run / "models")
        for head in filter(None, args.single.split(",")):
            target, feature = head.split("/", 1)
            pair = {"head": head}
            for name, code in codes.items():
                shutil.rmtree(scratch / name / "models", ignore_errors=True)
                record = train(code, scratch / name, [target], [feature])
                pair[name] = {k: v for k, v in record.items() if k != "heads"}
                pair[name]["fit_s"] = record["heads"][head]["fit_s"]
            pair["ratio"] = round(pair["previous"]["seconds"] / pair["current"]["seconds"], 2)
            results["single"].append(pair)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    old, new = results["whole"]["previous"], results["whole"]["current"]
    results["speedup"] = round(old["seconds"] / new["seconds"], 2)
    results["heads"] = [{"head": h, "previous": old["heads"][h], "current": new["heads"].get(h),
                         "accuracy_change": round(new["heads"][h]["accuracy"]
                                                  - old["heads"][h]["accuracy"], 4)}
                        for h in old["heads"] if h in new["heads"]]
    results["machine"]["load_average_at_end"] = load()
    save(results, Path(args.out))


if __name__ == "__main__":
    main()
