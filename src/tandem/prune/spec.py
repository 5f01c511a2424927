"""The recipe's ``prune:`` section (validated with the rest of the recipe)."""
from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..errors import TandemError, one_of
from ..fields import Fraction
from .criteria import criterion_class, get_criterion, list_criteria

Ratio = Fraction("[0, 1)", "ratio is the fraction of channels removed")
MacsTarget = Fraction("(0, 1]", "macs_target is the fraction of MACs that remain")


class PruneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    criterion: str = "l1"
    ratio: Optional[Ratio] = None
    macs_target: Optional[MacsTarget] = None
    scope: Optional[Literal["layer", "global"]] = None        # None: the criterion's default_scope
    schedule: Literal["one_shot", "iterative", "soft"] = "one_shot"
    max_ratio: float = Field(0.9, ge=0, lt=1)                 # at most this fraction of a layer goes
    normalize: Literal["auto", "mean", "max", "none"] = "auto"
    ignore: list[str] = Field(default_factory=list)   # globs of layers whose channels stay whole (structured only)
    round_to: int = Field(1, ge=1)                     # kept widths are multiples of this (structured only)
    steps: int = Field(3, ge=1)                                # iterative: prune/fine-tune rounds
    soft_epochs: int = Field(5, ge=1)                          # soft: epochs of zero-and-regrow
    sparsity_epochs: int = Field(0, ge=0)                      # slimming: epochs with the BN-L1 penalty first
    slimming_penalty: float = Field(1e-4, ge=0)                # lambda of the BN-L1 penalty
    hrank_batches: int = Field(6, ge=1)     # training batches a data-driven criterion sees
    criterion_options: dict[str, Any] = Field(default_factory=dict)   # the criterion's own options
    finetune_epochs: Optional[int] = Field(None, ge=0)         # None: train.epochs
    finetune_lr: Optional[float] = Field(None, gt=0)           # None: train.lr

    @field_validator("criterion")
    @classmethod
    def _known(cls, v: str) -> str:
        return one_of(v, list_criteria(), "pruning criterion")

    @field_validator("criterion_options")
    @classmethod
    def _options(cls, v: dict, info: ValidationInfo) -> dict:
        if "criterion" in info.data:   # else the criterion's own error is the one reported
            try:
                get_criterion(info.data["criterion"], **v)   # the options, and the values it refuses
            except TandemError as exc:
                raise ValueError(str(exc)) from None
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if self.ratio is not None and self.macs_target is not None:
            raise ValueError("give ratio or macs_target, not both")
        if self.ratio is not None and self.ratio > self.max_ratio:
            raise ValueError(f"ratio {self.ratio} exceeds max_ratio {self.max_ratio}")
        if not criterion_class(self.criterion).structured:
            if self.schedule == "soft":
                raise ValueError(f"{self.criterion} pruning has no soft schedule; use one_shot or iterative")
            if self.round_to != 1:
                raise ValueError(f"round_to rounds channel counts; {self.criterion} pruning keeps every channel, "
                                 "so it would have no effect")
        return self

    def options_for_criterion(self) -> dict:
        """criterion_options, with ``batches`` from hrank_batches for a data-driven criterion that
        takes that option and was not given it (so ``prune.hrank_batches`` works as it always did)."""
        cls = criterion_class(self.criterion)
        if cls.needs_data and "batches" in cls.options():
            return {"batches": self.hrank_batches, **self.criterion_options}
        return dict(self.criterion_options)

    def data_batches(self) -> int:
        """How many training batches the criterion's ``prepare`` is given (0: it needs none)."""
        if not criterion_class(self.criterion).needs_data:
            return 0
        return self.options_for_criterion().get("batches", self.hrank_batches)

    def target(self) -> dict:
        """ratio / macs_target as given; neither: half the MACs remain."""
        if self.ratio is None and self.macs_target is None:
            return {"ratio": None, "macs_target": 0.5}
        return {"ratio": self.ratio, "macs_target": self.macs_target}
