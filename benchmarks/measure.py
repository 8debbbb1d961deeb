"""What the benchmarks share: run one measurement in a fresh child process and read its record."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def in_child(args: Sequence[str], record: bool = True) -> dict[str, Any]:
    """Run `python ARGS` (its last stdout line a JSON record, unless `record` is False) and add
    the child's peak memory.

    A fresh process per measurement, so one model's memory and warm caches do not count against
    the next; ru_maxrss of the waited child (Linux: kB) includes its own worker processes.
    """
    child = subprocess.Popen([sys.executable, *args], stdout=subprocess.PIPE, text=True)
    out = child.stdout.read()
    _, status, usage = os.wait4(child.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code:
        return {"error": f"exit status {code}"}
    found = json.loads(out.strip().splitlines()[-1]) if record else {}
    found["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)
    return found


def save(results: dict[str, Any], out: Path) -> None:
    """Stamp the results with the time, write them as JSON to `out` and print them."""
    results["recorded_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
