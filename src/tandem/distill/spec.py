"""The recipe sections of the distillation methods: ``mutual:`` (methods.md §1.3-1.4) and
``distill:`` (the KD stage of pqkd, §2.3 / §6.9). Defaults follow methods.md; every [INFER]
or [UNKNOWN] detail there is a field here, so a user can switch it."""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

PEERS = ("pruned", "quantized")


class MutualSpec(BaseModel):
    """Deep Mutual Learning of a pruned peer and a quantized peer."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # pretrained: both peers are made from the trained full-precision model (its row is recorded);
    # scratch: from the randomly initialised model, as Deep Mutual Learning trains its cohort
    # (no baseline is trained unless kd_weight > 0 needs the teacher) [UNKNOWN for the paper]
    init: Literal["pretrained", "scratch"] = "pretrained"
    temperature: float = Field(1.0, gt=0)          # DML: softmax at T = 1 [UNKNOWN for the paper]
    # weight of each peer's KL term: one number for both, or {pruned: w, quantized: w}
    kl_weight: Union[float, dict[str, float]] = 1.0
    kl_rampup_epochs: float = Field(0.0, ge=0)     # KL weight rises linearly from 0 over these epochs
    update: Literal["simultaneous", "sequential"] = "simultaneous"   # DML's algorithm is sequential
    kd_weight: float = Field(0.0, ge=0)            # optional KD from the FP model (0 = off) [INFER]
    kd_temperature: float = Field(4.0, gt=0)
    feature_weight: float = Field(0.0, ge=0)       # optional feature (hint) term (0 = off) [UNKNOWN]
    feature_layers: list[str] = Field(default_factory=list)   # module names tapped on both peers
    epochs: Optional[int] = Field(None, ge=0)      # joint-phase epochs (None: train.epochs)
    lr: Optional[float] = Field(None, gt=0)        # joint-phase learning rate (None: train.lr)

    @field_validator("kl_weight")
    @classmethod
    def _per_peer(cls, v):
        if isinstance(v, dict):
            if set(v) != set(PEERS):
                raise ValueError(f"give one weight per peer: {{pruned: w, quantized: w}}, got keys {sorted(v)}")
            if min(v.values()) < 0:
                raise ValueError("weights must be >= 0")
        elif v < 0:
            raise ValueError("must be >= 0")
        return v

    def kl_weights(self) -> dict[str, float]:
        w = self.kl_weight
        return dict(w) if isinstance(w, dict) else {k: float(w) for k in PEERS}


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
