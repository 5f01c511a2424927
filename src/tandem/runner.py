"""Runs a recipe: builds the data, hands a RunContext to the method, writes the report.

A method is a function `method(ctx) -> None` that trains networks through `ctx.train_stage`
and records each finished network with `ctx.record`. Stages that finished are skipped on
`--resume`; a stage that was interrupted continues from its last epoch checkpoint.
"""
from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path

import torch

from . import cost
from .data import BatchLoader, load_dataset
from .engine import MetricsLog, Trainer, cross_entropy_objective, evaluate, resolve_device
from .engine.checkpoint import atomic_write, read_model_file, load_state, save_model
from .errors import TandemError
from .provenance import git_commit, machine
from .recipes import Recipe, dump_recipe


class RunContext:
    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool = False):
        self.recipe = recipe
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.device = resolve_device(recipe.device)
        self.data = load_dataset(recipe.dataset.name, recipe.dataset.root,
                                 val_fraction=recipe.dataset.val_fraction, seed=recipe.seed,
                                 **recipe.dataset.options)
        self.log = MetricsLog(self.out_dir / "metrics.jsonl")
        self.results: list[dict] = []

    # ---- data ----------------------------------------------------------------------------
    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.data.in_channels, *self.data.image_size)

    def train_loader(self, cfg=None) -> BatchLoader:
        cfg = cfg or self.recipe.train
        d = self.data
        return BatchLoader(d.train, cfg.batch_size, shuffle=True,
                           augment=d.augment if self.recipe.dataset.augment else None,
                           mean=d.mean, std=d.std, device=self.device, seed=self.recipe.seed,
                           drop_last=len(d.train) > cfg.batch_size)

    def eval_loader(self, split: str) -> BatchLoader:
        d = self.data
        return BatchLoader(getattr(d, split), self.recipe.train.eval_batch_size, mean=d.mean, std=d.std,
                           device=self.device)

    # ---- building blocks for methods --------------------------------------------------------
    def create_model(self, **overrides) -> torch.nn.Module:
        from .models import create_model
        spec = self.recipe.model
        kwargs = dict(name=spec.name, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                      widths=spec.widths, **spec.options)
        kwargs.update(overrides)
        torch.manual_seed(self.recipe.seed)
        return create_model(**kwargs)

    def pretrained(self) -> torch.nn.Module:
        """The full-precision starting point of a compression method: `model.checkpoint` when the
        recipe names one, else a baseline trained (and recorded) by this run first."""
        ckpt = self.recipe.model.checkpoint
        if ckpt:
            from .engine import load_model
            net, _ = load_model(ckpt)
            return net.to(self.device)
        net = self.create_model()
        best = self.train_stage("baseline", {"baseline": net})
        if not any(r["name"] == "baseline" for r in self.results):
            self.record("baseline", net, best["baseline"]["val_top1"])
        return net

    def train_stage(self, stage: str, nets: dict, objective=cross_entropy_objective, cfg=None,
                    frozen: dict | None = None, callbacks=()) -> dict:
        """Train `nets` for one stage; afterwards each holds its best-by-validation weights.

        Returns {net: {'val_top1', 'epoch'}}. A stage finished by an earlier run of this folder
        is loaded instead of trained again.
        """
        cfg = cfg or self.recipe.train
        stage_dir = self.out_dir / "stages" / stage
        done_file = stage_dir / "done.json"
        if done_file.exists():
            for name, net in nets.items():
                state, _ = read_model_file(stage_dir / f"{name}.safetensors")
                load_state(net, state, str(stage_dir / f"{name}.safetensors"))
                net.to(self.device)
            return json.loads(done_file.read_text())
        torch.manual_seed(self.recipe.seed)
        trainer = Trainer(nets, objective, cfg, device=self.device, frozen=frozen, callbacks=callbacks,
                          ckpt_path=stage_dir / "last.ckpt", log=self.log, stage=stage)
        best = trainer.fit(self.train_loader(cfg), self.eval_loader("val"), resume=self.resume)
        for name, net in nets.items():
            save_model(net, stage_dir / f"{name}.safetensors")
        atomic_write(done_file, lambda tmp: Path(tmp).write_text(json.dumps(best)))
        return best

    def record(self, name: str, net: torch.nn.Module, val_top1: float | None = None, *,
               stage: str | None = None, **cost_options) -> dict:
        """Evaluate `net` on test (and val when not given), count its cost, save it; one results row.

        Bits come from the layers themselves (quantized layers carry `w_bits`/`a_bits`);
        `cost_options` go to `cost.profile` (e.g. `first_last_bits=8`)."""
        test = evaluate(net, self.eval_loader("test"))
        if val_top1 is None:
            val_top1 = evaluate(net, self.eval_loader("val"))["top1"]
        c = cost.profile(net, self.input_size, **cost_options)
        w_bits, a_bits = cost.bits_summary(c)
        model_file = self.out_dir / "models" / f"{name}.safetensors"
        save_model(net, model_file, dataset=self.recipe.dataset.model_dump(mode="json"),
                   mean=list(self.data.mean), std=list(self.data.std), seed=self.recipe.seed)
        row = {"name": name, "stage": stage or name, "top1": test["top1"], "val_top1": val_top1,
               "params": c.params, "macs": c.macs, "bops": c.bops, "bytes": c.bytes,
               "w_bits": w_bits, "a_bits": a_bits, "model_file": str(model_file.relative_to(self.out_dir))}
        self.results.append(row)
        return row


def default_out_dir(recipe: Recipe) -> Path:
    return Path("runs") / f"{recipe.name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def run(recipe: Recipe, out: str | Path | None = None, resume: bool = False) -> dict:
    """Run a validated recipe into `out`; returns the results dict also written to results.json."""
    from .methods import get_method
    from .report import write_report

    method = get_method(recipe.method)
    out_dir = Path(out) if out else default_out_dir(recipe)
    if out_dir.exists() and any(out_dir.iterdir()) and not resume:
        raise TandemError(f"run folder {out_dir} already holds a run; pass --resume to continue it, "
                          f"or choose another --out")
    if resume and not out_dir.exists():
        raise TandemError(f"cannot resume: run folder {out_dir} does not exist")
    start = time.perf_counter()
    ctx = RunContext(recipe, out_dir, resume=resume)   # loads data before anything is written
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "recipe.yaml", lambda tmp: Path(tmp).write_text(dump_recipe(recipe)))
    method(ctx)
    results = {"recipe": recipe.model_dump(mode="json"), "protocol": recipe.protocol,
               "models": ctx.results, "commit": git_commit(), "machine": machine(),
               "wall_time_s": time.perf_counter() - start, "device": str(ctx.device)}
    write_report(out_dir, results)
    return results
