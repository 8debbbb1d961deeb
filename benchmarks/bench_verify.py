"""What verifying a run's files costs: `file_digest` (size + BLAKE2b) on matrices of real sizes.

    .venv/bin/python benchmarks/bench_verify.py [--out benchmarks/results/verify.json]

Writes float32 .npy matrices to a scratch folder (the page cache warm, as after a stage wrote
them): the full collection's mobilenet_v2 (6,962 x 1,280, hashed whole), one just over the
whole-hash limit and one four times over it (both hashed by sampled blocks), and times a first
digest and a verification against the record (`damage`) in a fresh process each (no cache).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.measure import in_child, save  # noqa: E402
from influence.runs import FULL_HASH_MAX  # noqa: E402

SHAPES = {"mobilenet_v2, whole collection": (6962, 1280),
          "just over the whole-hash limit (sampled)": (FULL_HASH_MAX // (4 * 1024), 1024),
          "4x the limit (sampled)": (4 * FULL_HASH_MAX // (4 * 1024), 1024)}


def child(path: str) -> None:
    """One measurement: digest the file, then verify it against that record."""
    from influence.runs import _digests, damage, file_digest

    start = time.perf_counter()
    digest = file_digest(Path(path))
    digest_s = time.perf_counter() - start
    _digests.clear()
    start = time.perf_counter()
    assert damage(Path(path), digest) is None
    verify_s = time.perf_counter() - start
    print(json.dumps({"bytes": digest["bytes"], "hashed": digest["hashed"],
                      "digest_ms": round(digest_s * 1000, 1),
                      "verify_ms": round(verify_s * 1000, 1)}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verify.json"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = {"machine": platform.processor() or platform.machine(), "files": {}}
    with tempfile.TemporaryDirectory() as scratch:
        for label, shape in SHAPES.items():
            path = Path(scratch) / "x.npy"
            np.save(path, np.random.default_rng(0).random(shape, dtype=np.float32))
            results["files"][label] = {"shape": list(shape),
                                       **in_child([__file__, "--child", str(path)])}
    save(results, Path(args.out))


if __name__ == "__main__":
    main()
