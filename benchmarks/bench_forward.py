"""Each CNN's forward pass on ready tensors, per fast path, against the engine's throughput.

    .venv/bin/python benchmarks/bench_forward.py [--images 320] [--engine-images 640]
                                                 [--repeat 2] [--out FILE]

Ready tensors: `--images` real paintings (every n-th of the collection) preprocessed by the
extractor's own `preprocess`, held in memory; the forward is `transform` over them in batches of
the extractor's `batch_size`: model, pooling and the copy to numpy, nothing else. Each
(extractor, fast path) runs in its own child process (`INFLUENCE_FAST_PATH`), and the engine
(bench_extract's child: the local engine extracting the first `--engine-images` catalog rows,
automatic path) in another; all are interleaved `--repeat` times and each keeps its best, which
is what a shared machine lets through. Each figure carries the 1-minute load average it was
taken under. Agreement: every path's features against fp32 TorchScript on the same paintings:
per-painting cosine, and how many paintings keep their nearest neighbour and top-10 set.
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

import numpy as np
from measure import in_child, save

ROOT = Path(__file__).resolve().parents[1]
COLLECTION = ROOT.parent / "shared" / "data" / "wikiart-pd"
MOBILENET = ROOT.parent / "shared" / "models" / "mobilenet_v2_imagenet_features.pth"
WEIGHTS = {"mobilenet_v2": str(MOBILENET)}
#: Fast paths per extractor (`INFLUENCE_FAST_PATH` values); `auto` is the machine's choice.
PATHS = {"mobilenet_v2": ["torchscript", "onednn", "bf16"],
         "efficientnet_lite0": ["torchscript", "onednn", "bf16"], "style": ["auto"]}
#: The reference the agreement figures compare with: fp32 TorchScript, as before fast paths.
REFERENCE = "torchscript"


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def forward(name: str, images: int, out: str, reps: int = 2) -> None:
    """Child process: `transform` over ready tensors; prints images/s, saves the features."""
    import torch

    from influence.extractors import get_extractor
    from influence.images import open_rgb

    torch.set_num_threads(os.cpu_count() or 1)
    files = sorted((COLLECTION / "images").glob("*.jpg"))
    files = files[::max(1, len(files) // images)][:images]
    extractor = get_extractor(name, WEIGHTS.get(name))
    start = time.perf_counter()
    extractor.load()
    load_s = time.perf_counter() - start
    items = [extractor.preprocess(open_rgb(f)) for f in files]
    stack = torch.stack if isinstance(items[0], torch.Tensor) else np.stack
    size = extractor.batch_size
    batches = [stack(items[i:i + size]) for i in range(0, len(items), size)]
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        rows = [extractor.transform(b) for b in batches]
        best = min(best, time.perf_counter() - start)
    np.save(out, np.concatenate(rows))
    print(json.dumps({"images_per_s": round(len(items) / best, 2), "load_s": round(load_s, 2),
                      "fast_path": extractor.info().get("fast_path"),
                      "load_average": load_average()}))


def agreement(reference: np.ndarray, other: np.ndarray, k: int = 10) -> dict[str, float]:
    """Per-painting cosine to the reference and how many paintings keep their neighbours."""
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(reference.astype(np.float64)), unit(other.astype(np.float64))
    cosine = (a * b).sum(axis=1)
    sims = [x @ x.T for x in (a, b)]
    for s in sims:
        np.fill_diagonal(s, -np.inf)
    top_a, top_b = (np.argsort(-s, axis=1, kind="stable")[:, :k] for s in sims)
    return {"cosine_min": round(float(cosine.min()), 6),
            "share_cosine_above_0.999": round(float((cosine > 0.999).mean()), 4),
            "share_same_top1": round(float((top_a[:, 0] == top_b[:, 0]).mean()), 4),
            f"share_same_top{k}_set": round(float(np.mean(
                [set(x) == set(y) for x, y in zip(top_a, top_b, strict=True)])), 4)}


def keep_best(into: dict[str, Any], key: str, record: dict[str, Any], rate: str) -> None:
    if "error" in record or record.get(rate, 0) > into.get(key, {}).get(rate, -1):
        into[key] = record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extractors", default=",".join(PATHS))
    parser.add_argument("--images", type=int, default=320)
    parser.add_argument("--engine-images", type=int, default=640)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "forward.json"))
    parser.add_argument("--forward", nargs=3, metavar=("NAME", "IMAGES", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.forward:
        sys.path.insert(0, str(ROOT))
        forward(args.forward[0], int(args.forward[1]), args.forward[2])
        return

    sys.path.insert(0, str(ROOT))
    from influence.catalog import Collection, build_catalog
    from influence.extractors import FAST_PATH_ENV, cpu_flags, fast_path
    from influence.runs import Run

    names = args.extractors.split(",")
    flags = cpu_flags()
    # Children import this checkout's code, and the engine runs on the automatic path.
    os.environ["PYTHONPATH"] = str(ROOT)
    os.environ.pop(FAST_PATH_ENV, None)
    chosen = fast_path()
    scratch = Path(tempfile.mkdtemp(prefix="bench-forward-"))
    base = Run(scratch / "base")
    catalog = build_catalog(Collection.from_dir(COLLECTION), base, progress=False).catalog
    catalog.head(args.engine_images).to_parquet(base.catalog_path, index=False)
    forwards: dict[str, dict[str, Any]] = {n: {} for n in names}
    engines: dict[str, Any] = {}
    for _ in range(args.repeat):
        for name in names:
            for path in PATHS[name]:
                if path == "bf16" and "avx512_bf16" not in flags:
                    continue
                env = {} if path == "auto" else {FAST_PATH_ENV: path}
                out = scratch / f"{name}-{path}.npy"
                record = child([__file__, "--forward", name, str(args.images), str(out)], env)
                keep_best(forwards[name], path, record, "images_per_s")
                print(name, path, record, file=sys.stderr)
            run = Run(scratch / f"engine-{name}")
            shutil.rmtree(run.root, ignore_errors=True)
            shutil.copytree(base.root, run.root)
            record = in_child([str(ROOT / "benchmarks" / "bench_extract.py"), "--one",
                               str(run.root), name])
            record["load_average"] = load_average()
            keep_best(engines, name, record, "steady_images_per_s")
            print(name, "engine", record.get("steady_images_per_s"), file=sys.stderr)
    results: dict[str, Any] = {"machine": machine(flags), "images": args.images,
                               "engine_images": args.engine_images, "extractors": {}}
    for name in names:
        paths = forwards[name]
        ref = scratch / f"{name}-{REFERENCE}.npy"
        for path, record in paths.items():
            if ref.exists() and path != REFERENCE and "error" not in record:
                record["agreement_with_fp32"] = agreement(np.load(ref),
                                                          np.load(scratch / f"{name}-{path}.npy"))
        engine = engines.get(name, {})
        auto = paths.get("auto") or next(
            (r for r in paths.values() if r.get("fast_path") == chosen), {})
        entry = {"forward": paths, "engine": engine, "engine_fast_path": chosen}
        if "images_per_s" in auto and "steady_images_per_s" in engine:
            entry["engine_over_forward"] = round(engine["steady_images_per_s"]
                                                 / auto["images_per_s"], 3)
        results["extractors"][name] = entry
    save(results, Path(args.out))
    shutil.rmtree(scratch, ignore_errors=True)


def child(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """`in_child` with extra environment variables."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return in_child(args)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def machine(flags: frozenset[str]) -> dict[str, Any]:
    model = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    name = next((line.split(":", 1)[1].strip() for line in model.splitlines()
                 if line.startswith("Model name")), platform.processor())
    return {"cpu": name, "cpu_count": os.cpu_count(),
            "flags": sorted(f for f in flags if f.startswith(("avx512_bf16", "amx")))}


if __name__ == "__main__":
    main()
