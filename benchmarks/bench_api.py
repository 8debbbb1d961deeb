"""How fast the JSON API answers on the production server (waitress, `python -m dash_app`).

    .venv/bin/python benchmarks/bench_api.py --run RUN [--sequential 50] [--concurrent 20]
        [--threads 8] [--out benchmarks/results/api.json]

For `POST /api/v1/similar` (an upload of a collection painting, a different one per request)
and `GET /api/v1/paintings/<image_id>`: `--sequential` requests one after another, then
`--concurrent` sent at once, each timed from send to parsed answer on the client. Every answer
must be its own (an upload's nearest painting is the uploaded painting where its features are
learned; a painting's answer names that painting). Writes median (p50) and p95 per kind and
mode, the server's start and its peak memory, the machine and its load average when it began.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
from bench_app import cpu_name, peak_memory_mb, quantiles, start_server
from measure import save

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from influence.runs import Run  # noqa: E402

REQUEST_TIMEOUT = 300


def similar(base: str, path: Path, image_id: str, learned: bool) -> tuple[float, bool]:
    """Upload one painting; (seconds, whether the answer is this painting's)."""
    raw = path.read_bytes()
    start = time.perf_counter()
    response = requests.post(f"{base}/api/v1/similar", files={"image": (path.name, raw)},
                             timeout=REQUEST_TIMEOUT)
    answer = response.json()
    seconds = time.perf_counter() - start
    ok = response.status_code == 200 and answer["query"] == path.name
    return seconds, ok and (not learned or answer["paintings"][0]["image_id"] == image_id)


def painting(base: str, image_id: str) -> tuple[float, bool]:
    """Ask for one painting; (seconds, whether the answer is that painting's)."""
    start = time.perf_counter()
    response = requests.get(f"{base}/api/v1/paintings/{image_id}", timeout=REQUEST_TIMEOUT)
    answer = response.json()
    seconds = time.perf_counter() - start
    return seconds, response.status_code == 200 and answer["image_id"] == image_id


def measure(base: str, jobs: list[tuple], call: object, at_once: bool) -> dict:
    """Time every job, one after another or all at once; p50 / p95 and how many were right."""
    start = time.perf_counter()
    if at_once:
        with ThreadPoolExecutor(len(jobs)) as pool:
            done = list(pool.map(lambda job: call(base, *job), jobs))
    else:
        done = [call(base, *job) for job in jobs]
    wall = time.perf_counter() - start
    return {"count": len(done), "correct": sum(ok for _, ok in done),
            **quantiles([s for s, _ in done]), "wall_s": round(wall, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True)
    parser.add_argument("--sequential", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--threads", type=int, default=8, help="the server's threads")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "api.json"))
    args = parser.parse_args()
    run = Run(Path(args.run))
    catalog = run.catalog()
    load = os.getloadavg()
    server, base, health, ready = start_server(args)
    try:
        learned = health["search"] not in ("pca", None)
        count = args.sequential + args.concurrent
        step = max(1, len(catalog) // count)
        rows = [(n * step) % len(catalog) for n in range(count)]
        uploads = [(run.image_path(catalog["file"].iat[r]), catalog["image_id"].iat[r], learned)
                   for r in rows]
        ids = [(catalog["image_id"].iat[r],) for r in rows]
        # One request of each first, so the timings below are of a warm server.
        similar(base, *uploads[0])
        painting(base, *ids[0])
        result = {
            "similar": {"sequential": measure(base, uploads[:args.sequential], similar, False),
                        "concurrent": measure(base, uploads[args.sequential:], similar, True)},
            "paintings": {"sequential": measure(base, ids[:args.sequential], painting, False),
                          "concurrent": measure(base, ids[args.sequential:], painting, True)},
        }
        peak = peak_memory_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    wrong = [f"{kind} {mode}" for kind, modes in result.items() for mode, r in modes.items()
             if r["correct"] != r["count"]]
    save({"run": str(run.root.resolve()), "catalog_paintings": len(catalog),
          "server": f"waitress, {args.threads} threads (python -m dash_app)",
          "search_features": health["search"], "startup_s": round(ready, 2),
          "server_peak_memory_mb": peak, "cpu": cpu_name(), "cores": os.cpu_count(),
          "load_average_at_start": [round(x, 2) for x in load], **result}, Path(args.out))
    if wrong:
        raise SystemExit(f"some answers were wrong or not their own: {', '.join(wrong)}")


if __name__ == "__main__":
    main()
