"""Shared by the benchmark scripts: write results with the command, commit and machine."""
from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

from tandem.provenance import git_commit, machine

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, with what produced it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
              "commit": git_commit(Path(__file__).parent), "machine": machine(),
              "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **payload}
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path
