"""RunContext: what a method works with (the recipe, the data, the starting model, the run
folder) and what it does with them (`train_stage`, `record`). Its own module, below the methods
and the runner: a method annotates `ctx: RunContext` without importing the orchestration."""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from . import cost
from .data import BatchLoader, load_dataset
from .engine import MetricsLog, Trainer, cross_entropy_objective, evaluate, resolve_device
from .engine import distributed
from .engine.checkpoint import load_checkpoint, load_state, read_model_file, save_checkpoint, save_model
from .errors import TandemError
from .files import atomic_write

if TYPE_CHECKING:   # the recipe's type only: recipes validates method names, so it sits above the methods
    from .recipes import Recipe


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
            path, spec = self.recipe.model.checkpoint, self.recipe.model
            net, meta = load_model(path, build=self.create_model, source=f"model.checkpoint = {path!r}")
            held = (meta.get("config") or {}).get("name", spec.name)
            if held != spec.name and spec.name != type(spec).model_fields["name"].default:
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
