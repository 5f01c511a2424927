"""The recipe sections of the distillation methods: ``mutual:`` (methods.md §1.3-1.4) and
``distill:`` (the KD stage of pqkd, §2.3 / §6.9). Defaults follow methods.md; every [INFER]
or [UNKNOWN] detail there is a field here, so a user can switch it."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field


class MutualSpec(BaseModel):
    """Deep Mutual Learning of a pruned peer and a quantized peer."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    temperature: float = Field(1.0, gt=0)          # DML: softmax at T = 1 [UNKNOWN for the paper]
    kl_weight: float = Field(1.0, ge=0)            # weight of each peer's KL term
    update: Literal["simultaneous", "sequential"] = "simultaneous"   # DML's algorithm is sequential
    kd_weight: float = Field(0.0, ge=0)            # optional KD from the FP model (0 = off) [INFER]
    kd_temperature: float = Field(4.0, gt=0)
    feature_weight: float = Field(0.0, ge=0)       # optional feature (hint) term (0 = off) [UNKNOWN]
    feature_layers: list[str] = Field(default_factory=list)   # module names tapped on both peers
    epochs: Optional[int] = Field(None, ge=0)      # joint-phase epochs (None: train.epochs)
    lr: Optional[float] = Field(None, gt=0)        # joint-phase learning rate (None: train.lr)


class DistillSpec(BaseModel):
    """Hinton KD from the uncompressed network: (1 - alpha) CE + alpha T^2 KL."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    alpha: float = Field(0.9, ge=0, le=1)          # paper's value [UNKNOWN]; §6.9: 0.9 with T = 4
    temperature: float = Field(4.0, gt=0)
    epochs: Optional[int] = Field(None, ge=0)      # KD epochs (None: train.epochs)
    lr: Optional[float] = Field(None, gt=0)        # KD learning rate (None: train.lr)
    # also train a twin for the same KD epochs with CE only (row pqkd/no-kd), the control that
    # separates distillation's gain from the extra epochs' (None: on except for protocol paper)
    control: Optional[bool] = None
