"""The README's first command, timed per stage from a fresh run, against its networks' own cost.

    .venv/bin/python benchmarks/bench_first_run.py [--config pipelines/wikiart-pd.toml]
        [--sample 512] [--keep]

1. Runs `python -m influence.pipeline run --config CONFIG --run FRESH` (install excluded) in a
   child process and stamps each `== stage` line it prints, so every stage's wall time is the
   command's own; the stages run beside the others (train, review) print their line when they
   are joined, so their own seconds come from run.json (`beside_s`).
2. In a second child, on the same machine in the same benchmark run, times each extractor of
   the config's `extract` section on ready tensors: `transform` on batches already decoded and
   preprocessed (a seeded sample of `--sample` paintings, scaled to the collection's size).
3. Reads the held-out figures the first run recorded (the heads the explorer shows, leave-one-out
   artist top-5, influence AUC and hit@5) and puts them beside the README's figures of the
   previous default (`BEFORE`).
The ratio `command / forward` is the target of issue 23 (at most 1.5); beside it, the same with
the networks' one-time loading and first-call compilation counted as theirs, and each network's
time inside the engine against its steady forward (issue 23 asks within 10%). JSON goes to
`benchmarks/results/first_run.json`.
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
import tomllib
from pathlib import Path

from measure import in_child, save

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "pipelines" / "wikiart-pd.toml"
#: The previous default's figures (README before issue 23): the explorer's heads were those on the
#: search default (whitened three-part set), its command about 40 minutes on two cores.
BEFORE = {"command_s": 40 * 60, "style": 0.772, "artist_top5": 0.72, "influence_auc": 0.925,
          "influence_hit5": 0.72}


def forward(config: str, sample: int) -> None:
    """Child process: each extractor's seconds on ready tensors, scaled to the collection."""
    import numpy as np
    import pandas as pd
    import torch

    from influence.extract.mapper import bound_malloc
    from influence.extractors import get_extractor
    from influence.images import open_rgb

    bound_malloc()  # the engine's allocator settings, so both run the models alike
    cfg = tomllib.loads(Path(config).read_text())
    base = Path(config).resolve().parent
    section = cfg["extract"]
    collection = (base / section["collection"]).resolve()
    files = pd.read_csv(collection / "paintings.csv", dtype=str)["file"].drop_duplicates()
    n = len(files)
    rng = np.random.default_rng(0)
    chosen = files.to_numpy()[rng.choice(n, size=min(sample, n), replace=False)]
    images = [open_rgb(collection / f) for f in chosen]
    weights = {k: str(base / v) for k, v in section.get("weights", {}).items()}
    out = {"paintings": n, "sample": len(images), "torch_threads": torch.get_num_threads()}
    for name in section["extractors"]:
        extractor = get_extractor(name, weights.get(name))
        if extractor.needs_fit:
            continue
        start = time.perf_counter()
        extractor.load()
        load_s = time.perf_counter() - start
        rows = [extractor.preprocess(im) for im in images]
        stack = torch.stack if isinstance(rows[0], torch.Tensor) else np.stack
        size = extractor.batch_size
        batches = [stack(rows[i:i + size]) for i in range(0, len(rows), size)]
        start = time.perf_counter()
        extractor.transform(batches[0])  # first call: graph compilation, kernel choice
        first_s = time.perf_counter() - start
        start = time.perf_counter()
        for batch in batches:
            extractor.transform(batch)
        seconds = time.perf_counter() - start
        collection_s = seconds * n / len(rows)
        # The steady forward is the measure; loading and the first call's compilation
        # are the networks' own one-time cost, kept beside it.
        out[name] = {"sample_s": round(seconds, 2), "images_per_s": round(len(rows) / seconds, 1),
                     "collection_s": round(collection_s, 1), "load_s": round(load_s, 2),
                     "first_batch_s": round(first_s, 2),
                     "with_load_s": round(load_s + first_s + collection_s, 1)}
    parts = [v for v in out.values() if isinstance(v, dict)]
    out["total_s"] = round(sum(v["collection_s"] for v in parts), 1)
    out["total_with_load_s"] = round(sum(v["with_load_s"] for v in parts), 1)
    print(json.dumps(out))


def first_run(config: Path, run_dir: Path) -> dict:
    """The command, its stages' wall times (from its `== stage` lines), the seconds of those it
    ran beside the others (from run.json) and its exit status."""
    cmd = [sys.executable, "-m", "influence.pipeline", "--no-progress", "run",
           "--config", str(config), "--run", str(run_dir)]
    begun = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    start = time.perf_counter()
    stages: dict[str, float] = {}
    current, since = None, start
    log = []
    with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as child:
        for line in child.stdout:
            log.append(line)
            if line.startswith("== "):
                now = time.perf_counter()
                if current:
                    stages[current] = round(now - since, 1)
                current, since = line[3:].strip(), now
        status = child.wait()
    end = time.perf_counter()
    if current:
        stages[current] = round(end - since, 1)
    return {"status": status, "command_s": round(end - start, 1), "stages": stages,
            "beside_s": beside_seconds(run_dir, begun), "log_tail": log[-40:]}


def beside_seconds(run_dir: Path, since: str) -> dict[str, float]:
    """The seconds of each stage `run` ran beside the others (`BESIDE`: its `== stage` line only
    says how long it was waited for), summed over the steps it recorded from `since` on."""
    from influence.commands import BESIDE
    from influence.runs import Run

    steps = Run(run_dir).manifest().get("steps", {}) if (run_dir / "run.json").exists() else {}
    return {stage: round(sum(r.get("seconds") or 0.0 for r in steps.get(stage, {}).values()
                             if r.get("finished_at", "") >= since), 1) for stage in BESIDE}


def engine_models(run_dir: Path, forward: dict) -> dict:
    """Each network's seconds inside the engine (its `model_s`: load, compilation and forward,
    as the run recorded them, summed over the runner processes that ran side by side, so over
    their number: the wall time the network took of them) against its steady forward on ready
    tensors (one process on every core)."""
    from influence.runs import Run

    run = Run(run_dir)
    out = {}
    for name, ready in forward.items():
        if not isinstance(ready, dict):
            continue
        timings = run.features_info(name)["timings"]
        processes = timings.get("processes", 1)
        model_s = timings["model_s"] / processes
        out[name] = {"engine_model_s": round(model_s, 1), "processes": processes,
                     "ready_s": ready["collection_s"],
                     "over_ready": round(model_s / ready["collection_s"] - 1, 3),
                     "over_ready_with_load": round(model_s / ready["with_load_s"] - 1, 3)}
    return out


def quality(run_dir: Path) -> dict:
    """The held-out figures of what the explorer shows, as the run recorded them."""
    from influence.runs import Run, read_json
    from influence.similar import default_features

    run = Run(run_dir)
    features = default_features(run)
    steps = run.manifest()["steps"]
    heads = {name.split("/")[0]: {"accuracy": r.get("accuracy"), "head": r.get("head"),
                                  "features": name.split("/", 1)[1]}
             for name, r in steps.get("train", {}).items() if "/" in name}
    index = read_json(run.index_dir / f"{features}.json")
    evaluation = read_json(run.root / "influence" / "evaluation.json")
    method = next(r for r in evaluation["table"] if r["scores"] == "method")
    return {"search_features": features, "heads": heads,
            "artist_top5": index["leave_one_out"]["artist_top5"],
            "influence_auc": method["auc"], "influence_hit5": method["hit@5"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--sample", type=int, default=512,
                        help="paintings whose ready tensors time the networks (default 512)")
    parser.add_argument("--keep", action="store_true", help="keep the fresh run directory")
    parser.add_argument("--forward", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward:
        forward(args.forward, args.sample)
        return
    config = Path(args.config).resolve()
    scratch = Path(tempfile.mkdtemp(prefix="first-run-"))
    try:
        command = first_run(config, scratch / "run")
        nets = in_child([__file__, "--forward", str(config), "--sample", str(args.sample)])
        results = {
            "machine": {"cpu": _cpu(), "cores": os.cpu_count(), "python": platform.python_version(),
                        "load_at_end": os.getloadavg()},
            "config": str(config.relative_to(ROOT)) if config.is_relative_to(ROOT) else str(config),
            "command": command, "forward": nets,
            "ratio_command_to_forward": (round(command["command_s"] / nets["total_s"], 2)
                                         if "total_s" in nets else None),
            "ratio_command_to_forward_with_load": (
                round(command["command_s"] / nets["total_with_load_s"], 2)
                if "total_with_load_s" in nets else None),
            "engine": engine_models(scratch / "run", nets) if command["status"] == 0 else None,
            "speedup_vs_before": round(BEFORE["command_s"] / command["command_s"], 1),
            "quality": quality(scratch / "run") if command["status"] == 0 else None,
            "before": BEFORE,
        }
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
    save(results, ROOT / "benchmarks" / "results" / "first_run.json")


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


if __name__ == "__main__":
    main()
