"""Runs a recipe: builds the data, hands a RunContext (tandem/context.py) to the methods, writes
the report.

A method is a function `method(ctx) -> None` that trains networks through `ctx.train_stage`
and records each finished network with `ctx.record`. Stages that finished are skipped on
`--resume`; a stage that was interrupted continues from its last epoch checkpoint.

Under torchrun every rank runs all of this; only rank 0 writes files (see engine/distributed.py).
"""
from __future__ import annotations

import json
import os
import time
from datetime import datetime
from pathlib import Path

import torch

from .context import RunContext  # noqa: F401  (re-exported: tandem.runner.RunContext)
from .engine import distributed
from .errors import TandemError
from .files import atomic_write
from .provenance import git_commit, machine
from .recipes import Recipe, changed_keys, dump_recipe


def _invocations(out_dir: Path) -> dict:
    path = out_dir / "invocations.json"
    return json.loads(path.read_text()) if path.exists() else {"wall_time_s": 0.0, "invocations": 0}


def _open_invocation(out_dir: Path) -> None:
    """Mark OUT/invocations.json as running since now. An invocation still marked when the next
    one starts was killed (SIGKILL, a lost node) before it could add its time: it is counted up
    to the newest file it wrote, and `killed_invocations` says how many were counted so."""
    totals = _invocations(out_dir)
    if "running_since" in totals:
        files = [p.stat().st_mtime for p in out_dir.rglob("*") if p.is_file() and p.name != "invocations.json"]
        totals["wall_time_s"] += max(0.0, max(files, default=totals["running_since"]) - totals["running_since"])
        totals["invocations"] += 1
        totals["killed_invocations"] = totals.get("killed_invocations", 0) + 1
    totals["running_since"] = time.time()
    atomic_write(out_dir / "invocations.json", lambda tmp: Path(tmp).write_text(json.dumps(totals)))


def _record_invocation(out_dir: Path, seconds: float) -> dict:
    """Add one invocation's wall time to OUT/invocations.json and close it; returns the totals."""
    totals = _invocations(out_dir)
    totals.pop("running_since", None)
    totals.update(wall_time_s=totals["wall_time_s"] + seconds, invocations=totals["invocations"] + 1)
    if out_dir.exists():
        atomic_write(out_dir / "invocations.json", lambda tmp: Path(tmp).write_text(json.dumps(totals)))
    return totals


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(recipe: Recipe, out: str | Path | None = None, resume: bool = False) -> dict:
    """Run a validated recipe into `out`; returns the results dict also written to results.json.

    The recipe's methods (one, or a list) run in turn on one RunContext, sharing its baseline.
    Under torchrun this joins the process group and trains with DDP on every rank."""
    return execute(recipe, out, resume)[0]


def execute(recipe: Recipe, out: str | Path | None = None, resume: bool = False, *, data=None,
            model=None) -> tuple[dict, RunContext]:
    """`run`, also returning the RunContext (its `models`: the recorded networks); `data` and
    `model`: a user's own (see RunContext)."""
    from .methods import get_method, preflight
    from .report import write_report

    steps = [get_method(name) for name in recipe.methods]
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    dist_info = distributed.init_distributed(recipe.device)
    out_dir = Path(out) if out else distributed.on_rank0(lambda: default_out_dir(recipe))
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise TandemError(f"run folder {out_dir} already holds a run; pass --resume to continue it, "
                          f"or choose another --out")
    if resume and not out_dir.exists():
        raise TandemError(f"cannot resume: run folder {out_dir} does not exist")
    if resume and (out_dir / "recipe.yaml").exists():
        differ = changed_keys(out_dir / "recipe.yaml", recipe)
        if differ:
            raise TandemError(f"--resume continues the recorded recipe; these keys differ from {out_dir}/recipe.yaml: "
                              f"{', '.join(differ[:6])}{' ...' if len(differ) > 6 else ''} (to change them, start a "
                              f"new run with another --out)")
    start, load_start = time.perf_counter(), os.getloadavg()
    commit = git_commit()   # the code that runs now (the tree may change while it trains)
    ctx = RunContext(recipe, out_dir, resume=resume, data=data, model=model)   # data before any file
    if recipe.model.checkpoint:
        ctx.checkpoint_model()
    elif model is None:
        ctx.create_model()   # a model that cannot be built (a bad factory) stops before the run folder exists
    preflight(ctx, steps)
    if dist_info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        _open_invocation(out_dir)   # first: a killed invocation is counted up to its own last file
        atomic_write(out_dir / "recipe.yaml", lambda tmp: Path(tmp).write_text(dump_recipe(recipe)))
    try:
        for method in steps:
            method(ctx)
    finally:   # this invocation's time counts even when it stops (a SIGKILL loses it)
        before = _record_invocation(out_dir, time.perf_counter() - start) if dist_info.is_main else {}
    results = {"recipe": recipe.model_dump(mode="json"), "protocol": recipe.protocol,
               "methods": recipe.methods,
               "models": ctx.results, "commit": commit, "machine": machine(),
               "load_average_1_5_15min": {"start": [round(v, 2) for v in load_start],   # this invocation's
                                          "end": [round(v, 2) for v in os.getloadavg()]},
               "wall_time_s": before.get("wall_time_s", time.perf_counter() - start),
               "invocations": before.get("invocations", 1),
               "killed_invocations": before.get("killed_invocations", 0), "device": str(ctx.device),
               "world_size": dist_info.world_size,
               "train_images": len(ctx.data.train), "val_images": len(ctx.data.val),
               "test_images": len(ctx.data.test)}   # report.md derives the standard error from it
    if dist_info.is_main:
        write_report(out_dir, results)
    return results, ctx
