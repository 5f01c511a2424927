"""Where a number came from: the commit and the machine, written next to every result."""
from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path


def git_commit(cwd: Path | None = None) -> str:
    """The commit of the source tree (with '+dirty' when it has uncommitted changes), or 'unknown'.
    Result files (benchmarks/results/) do not count: one benchmark's fresh results must not mark
    the next one's as run from changed code."""
    cwd = cwd or Path(__file__).resolve().parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                             timeout=5).stdout.strip()
        if not rev:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                ":(top)", ":(top,exclude)benchmarks/results"], cwd=cwd,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine() -> dict:
    import torch
    info = {"platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
