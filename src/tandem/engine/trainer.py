"""The one training loop: trains one or more networks under an objective.

An *objective* is a function `objective(outputs, y, x) -> {name: loss}`; `outputs` maps every
network's name (trainable and frozen) to its logits for the batch. The engine sums the named
losses and takes one backward pass, then steps each trainable network's own optimiser. Terms
that must not feed a network (a peer's prediction used as a target, a teacher) are detached
by the objective, so the sum gives each network exactly the gradient of its own loss.

With `update="sequential"` (Deep Mutual Learning's algorithm) the networks instead step one
after another, each on the terms named `<term>/<its name>`, with the predictions recomputed
after every update.

Methods plug in through the objective and through callbacks (objects with any of
`before_step(trainer)` (`trainer.step` steps done, `trainer.steps_per_epoch` per epoch: what a
schedule of loss weights needs), `after_backward(trainer)`, `after_step(trainer)`, `before_validation(trainer, epoch)` (the
epoch's training is done, its validation not yet: what is changed here is what validation and
best-by-val selection see), `on_epoch_end(trainer, epoch)`), never by writing another loop. A callback with state (soft pruning's zeroed channels, a gate
snapshot) gives `state_dict()` / `load_state_dict(state)`; it is saved in the stage checkpoint,
so a run killed mid-stage resumes to the result of one never interrupted. The trainer owns devices, mixed precision, checkpoints, best-by-val
selection, progress bars and the metrics log.
"""
from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..errors import TandemError
from . import distributed
from .checkpoint import load_checkpoint, load_state, save_checkpoint
from .evaluate import evaluate
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler, parameter_groups

Objective = Callable[[dict, torch.Tensor, torch.Tensor], dict]


class TrainingDiverged(TandemError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp):
    """bf16 autocast (no loss scaler needed): `amp` True on CUDA only (full precision on CPU),
    'bf16' on CUDA and on a CPU with bf16 instructions, False never."""
    if amp is True and device.type == "cuda":
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    if amp == "bf16":
        if device.type == "cpu":
            from ..latency import cpu_flags
            if not {"avx512_bf16", "amx_bf16"} & set(cpu_flags()):
                raise TandemError("train.amp bf16: this CPU has no bf16 instructions (avx512_bf16 or amx_bf16), so "
                                  "bf16 would be emulated and slower; use amp: true (float32 on CPU)")
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


@contextlib.contextmanager
def _bn_stats_frozen(module):
    """Batch statistics still normalise, but running statistics stay as they are."""
    bns = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _no_grad_call(module, x):
    """A prediction used only as a target: no graph, and no update of BN running statistics
    (a network whose turn it is not must not count this batch twice)."""
    with torch.no_grad(), _bn_stats_frozen(module):
        return module(x)


def cross_entropy_objective(outputs: dict, y: torch.Tensor, x: torch.Tensor) -> dict:
    """Plain supervised training: CE for every network."""
    return {f"ce/{name}": torch.nn.functional.cross_entropy(z.float(), y) for name, z in outputs.items()}


class Trainer:
    def __init__(self, nets: dict, objective: Objective, cfg, *, device="cpu", frozen: dict | None = None,
                 callbacks=(), ckpt_path: Path | None = None, log: MetricsLog | None = None,
                 stage: str = "train", update: str = "simultaneous", param_options: dict | None = None):
        if update not in ("simultaneous", "sequential"):
            raise TandemError(f"update = {update!r}; allowed: simultaneous, sequential")
        self.update = update
        self.device = torch.device(device)
        self.dist = distributed.info()
        if self.dist.enabled and self.device.type == "cuda" and cfg.sync_bn:
            nets = {n: torch.nn.SyncBatchNorm.convert_sync_batchnorm(m) for n, m in nets.items()}
        self.nets = {n: m.to(self.device) for n, m in nets.items()}
        self.memory_format = torch.channels_last if cfg.channels_last else torch.contiguous_format
        if cfg.channels_last:
            for m in self.nets.values():
                m.to(memory_format=torch.channels_last)
        if cfg.compile:
            for m in self.nets.values():
                m.compile()   # in place: the state dict keeps its keys
        # what the forward pass calls: DDP wrappers under torchrun, the nets themselves otherwise
        self.forward_nets = self.nets
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.forward_nets = {n: torch.nn.parallel.DistributedDataParallel(m, device_ids=ids)
                                 for n, m in self.nets.items()}
        # teachers run in eval mode without gradients while this trainer fits; fit() gives them back
        # as they came, so a teacher shared across stages (ctx.pretrained()) can be trained later
        self._frozen_as_given = {n: (m.training, [p.requires_grad for p in m.parameters()])
                                 for n, m in (frozen or {}).items()}
        self.frozen = {n: m.to(self.device).eval().requires_grad_(False) for n, m in (frozen or {}).items()}
        self.objective = objective
        self.cfg = cfg
        self.callbacks = list(callbacks)
        self.ckpt_path = Path(ckpt_path) if ckpt_path else None
        self.log = log if (log is not None and self.dist.is_main) else MetricsLog(None)
        self.stage = stage
        self.autocast = autocast_for(self.device, cfg.amp)
        self.optimizers = {n: build_optimizer(parameter_groups(m, cfg, param_options), cfg)
                           for n, m in self.nets.items()}
        self.schedulers: dict = {}
        self.epoch = 0          # epochs completed
        self.step = 0           # optimiser steps taken
        self.best = {n: {"val_top1": -1.0, "epoch": -1, "state": None} for n in self.nets}
        self.history: list[dict] = []

    # ---- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step, "stage": self.stage,
                "nets": {n: m.state_dict() for n, m in self.nets.items()},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                "best": self.best, "history": self.history, "rng": torch.get_rng_state(),
                "callbacks": [cb.state_dict() for cb in self._stateful()]}

    def load_state_dict(self, state: dict) -> None:
        for n, m in self.nets.items():
            load_state(m, state["nets"][n], f"checkpoint {self.ckpt_path}")
            self.optimizers[n].load_state_dict(state["optimizers"][n])
            self.schedulers[n].load_state_dict(state["schedulers"][n])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best, self.history = state["best"], state["history"]
        torch.set_rng_state(state["rng"])
        stateful = self._stateful()
        saved = state.get("callbacks", [])
        if len(saved) != len(stateful):
            raise TandemError(f"checkpoint {self.ckpt_path} holds the state of {len(saved)} callbacks, this stage "
                              f"has {len(stateful)}; it was written by another recipe")
        for cb, cb_state in zip(stateful, saved):
            cb.load_state_dict(cb_state)

    def _stateful(self) -> list:
        return [cb for cb in self.callbacks if hasattr(cb, "state_dict")]

    def resume(self) -> bool:
        """Continue from `ckpt_path` if it exists (schedulers must be built); True when loaded."""
        if self.ckpt_path is None or not self.ckpt_path.exists():
            return False
        self.load_state_dict(load_checkpoint(self.ckpt_path))
        return True

    def save(self) -> None:
        if self.ckpt_path is not None and self.dist.is_main:
            save_checkpoint(self.state_dict(), self.ckpt_path)

    # ---- the loop ----------------------------------------------------------------------
    def _hook(self, name: str, *args) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, name, None)
            if fn is not None:
                fn(self, *args)

    def forward(self, x: torch.Tensor) -> dict:
        with self.autocast():
            outputs = {n: m(x) for n, m in self.forward_nets.items()}
            if self.frozen:
                with torch.no_grad():
                    outputs.update({n: m(x) for n, m in self.frozen.items()})
        return outputs

    def _simultaneous_step(self, x, y) -> dict:
        """One backward pass of the summed losses; every network steps."""
        losses = self.objective(self.forward(x), y, x)
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        self._hook("after_backward")
        for n, opt in self.optimizers.items():
            opt.step()
            self.schedulers[n].step()
        return losses

    def _sequential_step(self, x, y) -> dict:
        """Deep Mutual Learning's own order: update network 1, recompute the predictions, update
        network 2, ... Each network steps on the loss terms named `<term>/<its name>`."""
        own_losses = {}
        for name, opt in self.optimizers.items():
            with self.autocast():
                outputs = {n: m(x) if n == name else _no_grad_call(m, x) for n, m in self.forward_nets.items()}
                outputs.update({n: _no_grad_call(m, x) for n, m in self.frozen.items()})
            losses = self.objective(outputs, y, x)
            own = {k: v for k, v in losses.items() if k.rsplit("/", 1)[-1] == name}
            if not own:
                raise TandemError(f"sequential updates: the objective returned no loss term for network "
                                  f"'{name}' (terms must be named '<term>/{name}'); got {sorted(losses)}")
            opt.zero_grad(set_to_none=True)
            sum(own.values()).backward()
            self._hook("after_backward")
            opt.step()
            self.schedulers[name].step()
            own_losses.update(own)
        return own_losses

    def train_epoch(self, loader) -> dict:
        for m in self.nets.values():
            m.train()
        loader.set_epoch(self.epoch)
        sums: dict[str, torch.Tensor] = {}
        bar = self._bar
        bar.set_description(f"{self.stage} epoch {self.epoch + 1}/{self.cfg.epochs}")
        check_every = 1 if self.device.type == "cpu" else 25
        step_fn = self._sequential_step if self.update == "sequential" else self._simultaneous_step
        self.steps_per_epoch = len(loader)
        for i, (x, y) in enumerate(loader):
            self._hook("before_step")
            if x.dim() == 4 and self.cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            losses = step_fn(x, y)
            total = sum(losses.values())
            self.step += 1
            bar.update()
            self._hook("after_step")
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + v.detach().float()
            if (i + 1) % check_every == 0 or i + 1 == len(loader):
                finite = torch.isfinite(sum(sums.values())).float()
                if self.dist.enabled:   # every rank stops together, none waits forever
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not finite.item():
                    raise TrainingDiverged(
                        f"loss became NaN or infinite in stage '{self.stage}' at epoch {self.epoch + 1}, "
                        f"step {i + 1}; the last good checkpoint is kept at {self.ckpt_path}")
                if self.cfg.progress:
                    bar.set_postfix(loss=f"{total.item():.3f}", **self._last_val, refresh=False)
        return {k: (distributed.all_reduce_mean(v) / max(1, len(loader))).item() for k, v in sums.items()}

    def train_steps(self, batches, steps: int) -> None:
        """`steps` optimiser steps on `batches` (an iterable of (x, y)), outside the epoch loop:
        no validation, checkpoint or progress bar (a search's short fine-tune of each candidate)."""
        if not self.schedulers:
            self.schedulers = {n: build_scheduler(o, self.cfg, steps) for n, o in self.optimizers.items()}
        for m in self.nets.values():
            m.train()
        done = 0
        for x, y in batches:
            if done == steps:
                break
            self._simultaneous_step(x, y)
            self.step += 1
            done += 1

    def fit(self, train_loader, val_loader=None, resume: bool = False) -> dict:
        """Train for cfg.epochs; afterwards each net holds its best-by-validation weights."""
        self.schedulers = {n: build_scheduler(o, self.cfg, len(train_loader)) for n, o in self.optimizers.items()}
        if resume:
            self.resume()
        steps = len(train_loader)
        self._last_val = {}
        show = self.cfg.progress and self.dist.is_main
        # a terminal gets the bar; a log file or CI gets one plain line per epoch (_epoch_line),
        # not the bar's cursor-control codes
        self._epoch_lines = show and not sys.stderr.isatty()
        self._bar = tqdm(total=self.cfg.epochs * steps, initial=self.epoch * steps, desc=self.stage,
                         disable=not show or self._epoch_lines, dynamic_ncols=True, unit="step", mininterval=0.5)
        try:
            self._fit_epochs(train_loader, val_loader)
        finally:
            self._bar.close()
            for n, (training, flags) in self._frozen_as_given.items():
                self.frozen[n].train(training)
                for p, flag in zip(self.frozen[n].parameters(), flags):
                    p.requires_grad_(flag)
        for n, m in self.nets.items():
            if self.best[n]["state"] is not None:
                m.load_state_dict(self.best[n]["state"])
        return {n: {"val_top1": b["val_top1"], "epoch": b["epoch"]} for n, b in self.best.items()}

    def _epoch_line(self, record: dict, losses: dict) -> str:
        """`baseline epoch 3/20: train loss 0.412, val top-1 91.20%, 1.8 s` (one net's name is left out)."""
        vals = {n: record[f"val_top1/{n}"] for n in self.nets if record.get(f"val_top1/{n}") is not None}
        line = f"{self.stage} epoch {self.epoch}/{self.cfg.epochs}: train loss {sum(losses.values()):.3f}"
        if vals:
            line += ", val top-1 " + ", ".join(f"{v:.2f}%" if len(self.nets) == 1 else f"{n} {v:.2f}%"
                                               for n, v in vals.items())
        return line + f", {record['epoch_time']:.1f} s"

    def _fit_epochs(self, train_loader, val_loader) -> None:
        while self.epoch < self.cfg.epochs:
            start = time.perf_counter()
            losses = self.train_epoch(train_loader)
            self._hook("before_validation", self.epoch + 1)
            train_time = time.perf_counter() - start
            record = {"stage": self.stage, "epoch": self.epoch + 1, "step": self.step, "train_time": train_time,
                      "lr": next(iter(self.optimizers.values())).param_groups[0]["lr"], **losses}
            for n, m in self.nets.items():
                val = evaluate(m, val_loader, self.autocast) if val_loader is not None else {"n": 0}
                record[f"val_top1/{n}"] = val.get("top1")
                if val["n"]:
                    self._last_val[f"val_{n}"] = f"{val['top1']:.2f}"
                has_val = val["n"] > 0
                if not has_val or val["top1"] > self.best[n]["val_top1"]:
                    self.best[n] = {"val_top1": val["top1"] if has_val else float("nan"),
                                    "epoch": self.epoch + 1,
                                    "state": {k: v.detach().clone() for k, v in m.state_dict().items()}}
            record["epoch_time"] = time.perf_counter() - start
            self.epoch += 1
            if self._epoch_lines:
                print(self._epoch_line(record, losses), file=sys.stderr, flush=True)
            self.history.append(record)
            self.log.write(record, step=self.epoch)
            self._hook("on_epoch_end", self.epoch)
            self.save()
