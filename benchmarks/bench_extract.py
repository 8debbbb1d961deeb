"""Extraction speed and memory per extractor, against a plain per-image torchvision loop.

    .venv/bin/python benchmarks/bench_extract.py [--limit vgg16=600] [--out FILE]

Each extractor runs in its own child process on a fresh run (so its peak memory is its own),
over the whole shared collection unless limited. The plain loop (open, transform, one forward
pass per image, eager PyTorch) is measured in the same invocation, so speed-ups are ratios of
numbers taken on the same machine at the same time. VGG16 is also compared with the machine's
measured fp32 matrix-multiply throughput: what its FLOPs allow.
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
SHARED = ROOT.parent / "shared"
COLLECTION = SHARED / "data" / "wikiart-pd"
MOBILENET = SHARED / "models" / "mobilenet_v2_imagenet_features.pth"
WEIGHTS = {"mobilenet_v2": str(MOBILENET), "vgg16": "random"}
DEFAULT_LIMITS = {"vgg16": 600}


def one(run_dir: str, name: str) -> None:
    """Child process: extract one feature set and print its timings as JSON."""
    from influence.extract import extract_features
    from influence.runs import Run

    start = time.perf_counter()
    info = extract_features(Run(Path(run_dir)), name, WEIGHTS.get(name), progress=False)
    wall = time.perf_counter() - start
    print(json.dumps({"rows": info["rows"], "wall_s": round(wall, 2),
                      "images_per_s": round(info["rows"] / wall, 2),
                      "steady_images_per_s": info["timings"]["images_per_s"],
                      "timings": info["timings"], "weights": info["weights"]}))


def plain_loop(name: str, n: int) -> dict[str, float]:
    """The baseline: a per-image torchvision loop as tutorials write it (eager, batch of one)."""
    import torch
    import torchvision.transforms as T
    from PIL import Image
    from torchvision import models

    torch.set_num_threads(os.cpu_count() or 1)
    model = getattr(models, name)()
    if name == "mobilenet_v2":
        model.load_state_dict(torch.load(MOBILENET, weights_only=True), strict=False)
    model.eval()
    tf = T.Compose([T.Resize(224), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = sorted((COLLECTION / "images").glob("*.jpg"))[:n]
    start = time.perf_counter()
    with torch.no_grad():
        for f in files:
            x = tf(Image.open(f).convert("RGB")).unsqueeze(0)
            model.features(x).mean(dim=(2, 3))
    return {"images": n, "images_per_s": round(n / (time.perf_counter() - start), 2)}


def gemm_gflops() -> float:
    """fp32 matrix-multiply throughput of this machine, all cores: the ceiling for convolutions."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    start, reps = time.perf_counter(), 10
    for _ in range(reps):
        a @ b
    return reps * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def vgg16_gflop_per_image() -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode
    from torchvision.models import vgg16

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        vgg16().features(torch.zeros(1, 3, 224, 224))
    return counter.get_total_flops() / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extractors", default="pca,kpca,mobilenet_v2,efficientnet_lite0,style,"
                        "vgg16")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=N",
                        help="extract only the first N catalog rows for NAME (default vgg16=600)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "extract.json"))
    parser.add_argument("--one", nargs=2, metavar=("RUN", "NAME"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(*args.one)
        return

    from influence.catalog import Collection, build_catalog
    from influence.runs import Run

    limits = {**DEFAULT_LIMITS, **{k: int(v) for k, v in (x.split("=") for x in args.limit)}}
    scratch = Path(tempfile.mkdtemp(prefix="bench-extract-"))
    base = Run(scratch / "base")
    start = time.perf_counter()
    catalog = build_catalog(Collection.from_dir(COLLECTION), base, progress=False).catalog
    seconds = round(time.perf_counter() - start, 2)
    results = {"catalog": {"images": len(catalog), "seconds": seconds}}
    extractors = {}
    for name in args.extractors.split(","):
        run = Run(scratch / name)
        shutil.copytree(base.root, run.root)
        if name in limits:
            catalog.head(limits[name]).to_parquet(run.catalog_path, index=False)
        record = in_child([__file__, "--one", str(run.root), name])
        extractors[name] = record
        if "error" in record:
            continue
        print(name, record["images_per_s"], "img/s", file=sys.stderr)
    results["extractors"] = extractors

    plain = {"mobilenet_v2": plain_loop("mobilenet_v2", 300), "vgg16": plain_loop("vgg16", 40)}
    results["plain_torchvision_loop"] = plain
    gemm, vgg_gflop = gemm_gflops(), vgg16_gflop_per_image()
    results["machine"] = {"cpu_count": os.cpu_count(), "processor": platform.processor(),
                          "fp32_gemm_gflops": round(gemm, 1)}
    speedup = {}
    for name, base_rate in plain.items():
        if "images_per_s" in extractors.get(name, {}):
            speedup[name] = round(extractors[name]["steady_images_per_s"]
                                  / base_rate["images_per_s"], 2)
    results["speedup_vs_plain_loop"] = speedup
    if "images_per_s" in extractors.get("vgg16", {}):
        rate = extractors["vgg16"]["steady_images_per_s"]
        results["vgg16_vs_flops"] = {
            "gflop_per_image": round(vgg_gflop, 2),
            "images_per_s_allowed_by_gemm": round(gemm / vgg_gflop, 2),
            "fraction_of_gemm_bound": round(rate * vgg_gflop / gemm, 3)}
    save(results, Path(args.out))
    shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
