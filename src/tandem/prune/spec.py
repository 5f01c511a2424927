"""The recipe's ``prune:`` section (validated with the rest of the recipe)."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..errors import one_of


def default_scope(criterion: str) -> str:
    """The ranking scope when none is given: global for bn_scale (network slimming ranks all BN
    scales together), per layer for the others."""
    return "global" if criterion == "bn_scale" else "layer"


class PruneSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    criterion: str = "l1"
    ratio: Optional[float] = None           # fraction of channels removed, in [0, 1)
    macs_target: Optional[float] = None     # fraction of MACs that remain, in (0, 1]
    scope: Optional[Literal["layer", "global"]] = None        # None: global for bn_scale, else layer
    schedule: Literal["one_shot", "iterative", "soft"] = "one_shot"
    max_ratio: float = Field(0.9, ge=0, lt=1)                 # at most this fraction of a layer goes
    normalize: Literal["auto", "mean", "max", "none"] = "auto"
    ignore: list[str] = Field(default_factory=list)   # globs of layers whose channels stay whole (structured only)
    round_to: int = Field(1, ge=1)                     # kept widths are multiples of this (structured only)
    steps: int = Field(3, ge=1)                                # iterative: prune/fine-tune rounds
    soft_epochs: int = Field(5, ge=1)                          # soft: epochs of zero-and-regrow
    sparsity_epochs: int = Field(0, ge=0)                      # slimming: epochs with the BN-L1 penalty first
    slimming_penalty: float = Field(1e-4, ge=0)                # lambda of the BN-L1 penalty
    hrank_batches: int = Field(6, ge=1)
    finetune_epochs: Optional[int] = Field(None, ge=0)         # None: train.epochs
    finetune_lr: Optional[float] = Field(None, gt=0)           # None: train.lr

    @field_validator("criterion")
    @classmethod
    def _known(cls, v: str) -> str:
        from .criteria import list_criteria
        return one_of(v, list_criteria(), "pruning criterion")

    @field_validator("ratio")
    @classmethod
    def _ratio(cls, v):
        if v is not None and not 0 <= v < 1:
            raise ValueError("ratio is the fraction of channels removed; allowed range [0, 1)")
        return v

    @field_validator("macs_target")
    @classmethod
    def _macs(cls, v):
        if v is not None and not 0 < v <= 1:
            raise ValueError("macs_target is the fraction of MACs that remain; allowed range (0, 1]")
        return v

    @model_validator(mode="after")
    def _one_target(self):
        if self.ratio is not None and self.macs_target is not None:
            raise ValueError("give ratio or macs_target, not both")
        if self.ratio is not None and self.ratio > self.max_ratio:
            raise ValueError(f"ratio {self.ratio} exceeds max_ratio {self.max_ratio}")
        if self.criterion == "magnitude" and self.schedule == "soft":
            raise ValueError("magnitude pruning has no soft schedule; use one_shot or iterative")
        if self.criterion == "magnitude" and self.round_to != 1:
            raise ValueError("round_to rounds channel counts; magnitude pruning keeps every channel, "
                             "so it would have no effect")
        return self

    def target(self) -> dict:
        """ratio / macs_target as given; neither: half the MACs remain."""
        if self.ratio is None and self.macs_target is None:
            return {"ratio": None, "macs_target": 0.5}
        return {"ratio": self.ratio, "macs_target": self.macs_target}
