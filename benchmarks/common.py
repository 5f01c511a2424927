"""Shared by the benchmark scripts: write results with the command, commit and machine, and the
machine's load average when the script started and when it wrote its results (other jobs on a
shared machine slow every timed model alike; the side-by-side ratios are the results)."""
from __future__ import annotations

import json
import os
import shlex
import sys
import time
from pathlib import Path

from tandem.provenance import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"
_LOAD_AT_START = os.getloadavg()


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, with what produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "commit": git_commit(Path(__file__).parent), "machine": machine(),
              "load_average_1_5_15min": {"start": [round(v, 2) for v in _LOAD_AT_START],
                                         "end": [round(v, 2) for v in os.getloadavg()]},
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
