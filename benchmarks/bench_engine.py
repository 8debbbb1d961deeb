"""Extraction engines compared in one run: local and Ray (local Ray, all cores), one CNN.

    .venv/bin/python benchmarks/bench_engine.py [--limit N] [--repeat N] [--baseline ../main]
                                                [--parts engines,decode] [--out FILE]

Each engine extracts `mobilenet_v2` (the shared weights) into a fresh copy of one catalog, in its
own child process (`--repeat N`: N times, interleaved, keeping each engine's best, which is what
a shared machine lets through), so speed and memory are its own: images/s over the whole
extraction (Ray's start included) and peak memory, the sum of the resident memory of the child
and every process under it (Ray's raylet, workers and object store included), sampled every
0.2 s. `--baseline` also runs the local engine of another checkout (the code before this change)
in the same run, so "no slower than today" is a ratio taken at the same time on the same machine.

Decode once: the thumbnails and the pixel extractors (`pca`, `kpca`) on the same images, each
decoding every image itself ("separate") and sharing the thumbnails' decoding pass ("shared").
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

import numpy as np
import psutil
from measure import save

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
COLLECTION = SHARED / "data" / "wikiart-pd"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet_features.pth"
NAME = "mobilenet_v2"


def one(run_dir: str, engine: str) -> None:
    """Child process: extract NAME with one engine and print its record as JSON."""
    from influence.extract import extract_features
    from influence.runs import Run

    kwargs: dict[str, Any] = {} if engine == "baseline" else {"engine": engine}
    start = time.perf_counter()
    info = extract_features(Run(Path(run_dir)), NAME, str(MOBILENET), progress=False, **kwargs)
    wall = time.perf_counter() - start
    print(json.dumps({"rows": info["rows"], "wall_s": round(wall, 2),
                      "images_per_s": round(info["rows"] / wall, 2),
                      "timings": info["timings"], "weights": info["weights"]}))


def decode(run_dir: str, mode: str) -> None:
    """Child process: thumbnails, pca and kpca, decoding separately or once; prints seconds."""
    from influence.extract import extract_features
    from influence.extractors import get_extractor
    from influence.runs import Run
    from influence.thumbnails import make_thumbnails

    run = Run(Path(run_dir))
    keep = [get_extractor("pca").preprocess] if mode == "shared" else []
    seconds = {}
    start = time.perf_counter()
    make_thumbnails(run, progress=False, keep=keep)
    seconds["thumbnails"] = time.perf_counter() - start
    for name in ("pca", "kpca"):
        t = time.perf_counter()
        extract_features(run, name, progress=False)
        seconds[name] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - start
    print(json.dumps({k: round(v, 2) for k, v in seconds.items()}))


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
    parser.add_argument("--repeat", type=int, default=1,
                        help="run the engines this many times, interleaved; keep each one's best")
    parser.add_argument("--parts", default="engines,decode", help="what to measure (default: both)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine.json"))
    parser.add_argument("--one", nargs=2, metavar=("RUN", "ENGINE"), help=argparse.SUPPRESS)
    parser.add_argument("--decode", nargs=2, metavar=("RUN", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return
    if args.decode:
        decode(*args.decode)
        return

    sys.path.insert(0, str(ROOT))
    from influence.catalog import Collection, build_catalog
    from influence.runs import Run

    scratch = Path(tempfile.mkdtemp(prefix="bench-engine-"))
    base = Run(scratch / "base")
    catalog = build_catalog(Collection.from_dir(COLLECTION), base, progress=False).catalog
    if args.limit:
        catalog.head(args.limit).to_parquet(base.catalog_path, index=False)
    runs = [("local", ROOT), ("ray", ROOT)] if "engines" in args.parts else []
    if args.baseline and runs:
        runs.insert(0, ("baseline", args.baseline.resolve()))
    engines: dict[str, Any] = {}
    for attempt in range(args.repeat):
        for engine, code in runs:
            run = Run(scratch / engine)
            shutil.rmtree(run.root, ignore_errors=True)
            shutil.copytree(base.root, run.root)
            record = measured([__file__, "--one", str(run.root), engine], code)
            print(engine, attempt, record, file=sys.stderr)
            best = engines.get(engine, {})
            if record.get("images_per_s", 0) > best.get("images_per_s", 0):
                engines[engine] = {**record, "attempts": attempt + 1}
            engines[engine]["attempts"] = attempt + 1
    results: dict[str, Any] = {"features": NAME, "images": len(base.catalog()),
                               "cpu_count": os.cpu_count(), "engines": engines}
    decoding = {}
    for mode in ("separate", "shared") if "decode" in args.parts else ():
        run = Run(scratch / f"decode-{mode}")
        shutil.copytree(base.root, run.root)
        decoding[mode] = measured([__file__, "--decode", str(run.root), mode], ROOT)
        print(mode, decoding[mode], file=sys.stderr)
    if decoding and all("total" in d for d in decoding.values()):
        decoding["shared_over_separate"] = round(decoding["shared"]["total"]
                                                 / decoding["separate"]["total"], 3)
    results["decode_once"] = decoding
    matrices = {e: Run(scratch / e).features(NAME) for e, r in engines.items() if "error" not in r}
    results["max_abs_difference_from_local"] = {
        e: float(np.abs(np.asarray(m) - np.asarray(matrices["local"])).max())
        for e, m in matrices.items() if e != "local" and "local" in matrices}
    rate = {e: r.get("images_per_s") for e, r in engines.items()}
    if rate.get("local") and rate.get("ray"):
        results["ray_over_local"] = round(rate["ray"] / rate["local"], 3)
    if rate.get("local") and rate.get("baseline"):
        results["local_over_baseline"] = round(rate["local"] / rate["baseline"], 3)
    save(results, Path(args.out))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
