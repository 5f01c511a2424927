"""Runs a recipe: builds the data, hands a RunContext to the method, writes the report.

A method is a function `method(ctx) -> None` that trains networks through `ctx.train_stage`
and records each finished network with `ctx.record`. Stages that finished are skipped on
`--resume`; a stage that was interrupted continues from its last epoch checkpoint.

Under torchrun every rank runs all of this; only rank 0 writes files (see engine/distributed.py).
"""
from __future__ import annotations

import copy
import json
import os
import time
from datetime import datetime
from pathlib import Path

import torch

from . import cost
from .data import BatchLoader, load_dataset
from .engine import MetricsLog, Trainer, cross_entropy_objective, evaluate, resolve_device
from .engine import distributed
from .engine.checkpoint import load_checkpoint, load_state, read_model_file, save_checkpoint, save_model
from .errors import TandemError
from .files import atomic_write
from .provenance import git_commit, machine
from .recipes import Recipe, changed_keys, dump_recipe


class RunContext:
    """What a method works with: the recipe, the data, the starting model, the run folder.
    `data` (DataSplits) and `model` (a trained nn.Module) come from `tandem.compress`: then
    no dataset is loaded and `model` is the full-precision start instead of a baseline."""

    def __init__(self, recipe: Recipe, out_dir: Path, resume: bool = False, data=None, model=None):
        self.recipe = recipe
        self.user_model = model
        self.out_dir = Path(out_dir)
        self.resume = resume
        self.dist = distributed.info()
        self.device = resolve_device(recipe.device)
        if self.dist.enabled and self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)
        if self.dist.enabled and recipe.train.batch_size % self.dist.world_size:
            raise TandemError(f"train.batch_size = {recipe.train.batch_size} must be divisible by the "
                              f"number of processes ({self.dist.world_size}); it is the global batch")
        self.data = data if data is not None else self._load_data()
        if recipe.dataset.augment and not self.data.augment.active:
            raise TandemError(f"dataset.augment = true, but {recipe.dataset.name} has no augmentation with these "
                              f"options; {_augment_hint(recipe.dataset.name)}")
        self.log = MetricsLog(self.out_dir / "metrics.jsonl" if self.dist.is_main else None)
        self.results: list[dict] = []
        self.models: dict[str, torch.nn.Module] = {}   # row name -> the recorded network
        self._pretrained: torch.nn.Module | None = None
        self._checkpoint_net: torch.nn.Module | None = None

    # ---- data ----------------------------------------------------------------------------
    def _load_data(self):
        """The recipe's dataset; rank 0 loads first, so a dataset that builds a decode cache
        builds it once."""
        spec, data = self.recipe.dataset, None
        for turn in (True, False):
            if self.dist.is_main == turn:
                data = load_dataset(spec.name, spec.root, val_fraction=spec.val_fraction, seed=spec.split_seed,
                                    train_limit=spec.train_limit, test_limit=spec.test_limit, **spec.options)
            distributed.barrier()
        return data

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (self.data.in_channels, *self.data.image_size)

    def train_loader(self, cfg=None) -> BatchLoader:
        """This rank's shard of the training set; `batch_size` is the global batch."""
        cfg = cfg or self.recipe.train
        d, world = self.data, self.dist.world_size
        return BatchLoader(d.train, cfg.batch_size // world, shuffle=True,
                           augment=None if self.recipe.dataset.augment is False else d.augment,
                           mean=d.mean, std=d.std, device=self.device, seed=self.recipe.seed,
                           drop_last=len(d.train) > cfg.batch_size, rank=self.dist.rank, world_size=world)

    def eval_loader(self, split: str) -> BatchLoader:
        d = self.data
        return BatchLoader(getattr(d, split), self.recipe.train.eval_batch_size, mean=d.mean, std=d.std,
                           device=self.device)

    # ---- building blocks for methods --------------------------------------------------------
    def create_model(self, **overrides) -> torch.nn.Module:
        """A freshly initialised recipe model (`overrides`: another model, e.g. a teacher)."""
        from .models import create_model
        from .models.registry import reinitialised
        if self.user_model is not None and not overrides:
            torch.manual_seed(self.recipe.seed)
            return reinitialised(self.user_model)
        spec = self.recipe.model
        kwargs = dict(name=spec.name, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                      widths=spec.widths, **spec.options)
        kwargs.update(overrides)
        torch.manual_seed(self.recipe.seed)
        return create_model(**kwargs)

    def pretrained(self) -> torch.nn.Module:
        """The full-precision starting point of every method: `model.checkpoint` when the recipe
        names one, else a baseline trained by this run. Recorded once as the 'baseline' row;
        methods copy it before changing it."""
        if self._pretrained is None:
            ckpt, val_top1 = self.recipe.model.checkpoint, None
            if self.user_model is not None:
                net = copy.deepcopy(self.user_model).to(self.device)
            elif ckpt:
                net = self.checkpoint_model()
            else:
                net = self.create_model()
                val_top1 = self.train_stage("baseline", {"baseline": net})["baseline"]["val_top1"]
            self.record("baseline", net, val_top1)
            self._pretrained = net
        return self._pretrained

    def checkpoint_model(self) -> torch.nn.Module:
        """`model.checkpoint` loaded (once; `run` loads it before the run folder is written): a
        tandem model file rebuilds its own architecture (which must be the recipe's model when
        the recipe names one); a plain state dict is loaded into the recipe's model."""
        if self._checkpoint_net is None:
            from .engine import load_model
            from .recipes import ModelSpec
            path, spec = self.recipe.model.checkpoint, self.recipe.model
            net, meta = load_model(path, build=self.create_model, source=f"model.checkpoint = {path!r}")
            held = (meta.get("config") or {}).get("name", spec.name)
            if held != spec.name and spec.name != ModelSpec.model_fields["name"].default:
                raise TandemError(f"model.checkpoint = {path!r} holds a {held!r} model, the recipe names "
                                  f"{spec.name!r}; drop the model name or give a checkpoint of that model")
            self._checkpoint_net = net.to(self.device)
        return self._checkpoint_net

    def train_stage(self, stage: str, nets: dict, objective=cross_entropy_objective, cfg=None,
                    frozen: dict | None = None, callbacks=(), update: str = "simultaneous",
                    param_options: dict | None = None) -> dict:
        """Train `nets` for one stage; afterwards each holds its best-by-validation weights.

        Returns {net: {'val_top1', 'epoch'}}. A stage finished by an earlier run of this folder
        is loaded instead of trained again. `param_options`: per parameter category (weight,
        bias, bn, quantizer, gate) optimiser options, e.g. {'gate': {'weight_decay': 0}}.
        """
        cfg = cfg or self.recipe.train
        stage_dir = self.out_dir / "stages" / stage
        done_file = stage_dir / "done.json"
        stateful = [cb for cb in callbacks if hasattr(cb, "state_dict")]
        if done_file.exists():
            for name, net in nets.items():
                state, _ = read_model_file(stage_dir / f"{name}.safetensors")
                load_state(net, state, str(stage_dir / f"{name}.safetensors"))
                net.to(self.device)
            if stateful:   # e.g. which channels soft pruning zeroed in each epoch
                for cb, cb_state in zip(stateful, load_checkpoint(stage_dir / "callbacks.ckpt")):
                    cb.load_state_dict(cb_state)
            return json.loads(done_file.read_text())
        torch.manual_seed(self.recipe.seed)
        trainer = Trainer(nets, objective, cfg, device=self.device, frozen=frozen, callbacks=callbacks,
                          ckpt_path=stage_dir / "last.ckpt", log=self.log, stage=stage, update=update,
                          param_options=param_options)
        best = trainer.fit(self.train_loader(cfg), self.eval_loader("val"), resume=self.resume)
        if self.dist.is_main:
            for name, net in nets.items():
                save_model(net, stage_dir / f"{name}.safetensors")
            if stateful:
                save_checkpoint([cb.state_dict() for cb in stateful], stage_dir / "callbacks.ckpt")
            atomic_write(done_file, lambda tmp: Path(tmp).write_text(json.dumps(best)))
        distributed.barrier()
        return best

    def record(self, name: str, net: torch.nn.Module, val_top1: float | None = None, *,
               stage: str | None = None, control: str | list[str] | None = None, **cost_options) -> dict:
        """Evaluate `net` on test (and val when not given), count its cost, save it; one results row.

        Bits come from the layers themselves (quantized layers carry `w_bits`/`a_bits`);
        `cost_options` go to `cost.profile` (e.g. `first_last_bits=8`). `control` names the row of
        this run (or a list of rows) that the network is to be compared with (summaries over seeds pair them)."""
        test = evaluate(net, self.eval_loader("test"))
        if val_top1 is None:
            val_top1 = evaluate(net, self.eval_loader("val"))["top1"]
        model_file = self.out_dir / "models" / f"{name.replace('/', '-')}.safetensors"   # 'mutual/pruned': one folder
        if self.dist.is_main:
            save_model(net, model_file, dataset=self.recipe.dataset.model_dump(mode="json"),
                       mean=list(self.data.mean), std=list(self.data.std), seed=self.recipe.seed,
                       input_size=list(self.input_size))
        row = self._row(name, net, test["top1"], val_top1, stage or name, cost_options)
        if self.recipe.report.latency and self.dist.is_main:
            row.update(latency_columns(net, self.input_size, self.recipe.report.latency_batch))
        row["model_file"] = str(model_file.relative_to(self.out_dir))
        if control:
            row["control"] = control
        self.results.append(row)
        self.models[name] = net
        return row

    def record_init(self, name: str, net: torch.nn.Module, *, stage: str | None = None, **cost_options) -> dict:
        """`net` as its method's first training step will see it (quantizers calibrated, gates as
        initialised): one results row `name` (`<method>/init`, `<method>/init-<which>`) with
        `init: true`, its validation and test top-1 and its cost. A start the implementation broke
        shows here; reports keep it out of the verdict and the plot (it is a start, not a result),
        and no model file is written. `val_top1_bn_reestimated` is the same network with its
        BatchNorm statistics re-estimated on 8 training batches (a copy; no random numbers drawn):
        training normalises with batch statistics, so a start that is low only because the stored
        statistics are stale (one-shot pruning) is high here; one that the quantizers or gates
        broke is low in both."""
        from .quant.quantize import reestimate_bn
        val, test = (evaluate(net, self.eval_loader(split))["top1"] for split in ("val", "test"))
        fresh = copy.deepcopy(net)
        reestimate_bn(fresh, self.eval_loader("train"), num_batches=8)
        row = {**self._row(name, net, test, val, stage or name, cost_options), "init": True,
               "val_top1_bn_reestimated": evaluate(fresh, self.eval_loader("val"))["top1"]}
        self.results.append(row)
        return row

    def _row(self, name, net, top1, val_top1, stage, cost_options) -> dict:
        c = cost.profile(net, self.input_size, **cost_options)
        w_bits, a_bits = cost.bits_summary(c)
        return {"name": name, "stage": stage, "top1": top1, "val_top1": val_top1,
                "params": c.params, "macs": c.macs, "bops": c.bops, "bytes": c.bytes,
                "w_bits": w_bits, "a_bits": a_bits, **_layout_of(net),
                "layers": cost.layer_summary(c)}   # per conv/linear layer; their macs sum to row['macs']


def latency_columns(net, input_size, batch: int) -> dict:
    """A results row's latency: `<runtime>_ms_1` and `<runtime>_ms_batch` (ms per call of a
    batch of 1 and of `latency_batch` images; runtime eager or ort), and how it was measured."""
    from .latency import measure
    m = measure(net, input_size, batch=batch)
    cols = {f"{short}_ms_{'1' if b == '1' else 'batch'}": ms
            for runtime, short in (("eager", "eager"), ("onnxruntime", "ort"))
            for b, ms in m["latency_ms"].get(runtime, {}).items()}
    if batch == 1:
        cols.update({k.replace("_ms_1", "_ms_batch"): v for k, v in list(cols.items()) if k.endswith("_ms_1")})
    return {**cols, "latency_batch": batch, "latency_setup": m["latency_setup"]}


def _layout_of(net) -> dict:
    """{"quant_layout": ...} for a network quantize_ swapped (its recorded policy), else {}."""
    for record in reversed(getattr(net, "tandem_transforms", [])):
        if record.get("kind") == "quantize":
            return {"quant_layout": record["policy"].get("layout", "inputs")}
    return {}


def _augment_hint(dataset: str) -> str:
    from .data import dataset_options
    names = [f"dataset.options.{o}" for o in dataset_options(dataset) if o in ("crop_padding", "hflip")]
    if not names:
        return "it has no augmentation options: leave augment unset"
    return f"turn it on with {' / '.join(names)}, or leave augment unset"


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
