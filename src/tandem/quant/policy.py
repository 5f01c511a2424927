"""QuantSpec: what to quantize and how, as one small validated object.

It is both the `quant:` section of a recipe and the policy of `tandem.quantize_`:

    QuantSpec(method="lsq", w_bits=4, a_bits=4, first_last=8,
              overrides={"layer3.*": {"w_bits": 2}}, skip=["fc"])

Patterns are shell-style globs (fnmatch) on module names as `model.named_modules()` gives them.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ..errors import RecipeError, one_of
from . import bit_sharing, kmeans, quantizers  # noqa: F401  (they register the built-in quantizers)
from .registry import QUANTIZERS, list_quantizers  # noqa: F401

PACT_ALPHA = 10.0   # the PACT paper's alpha initialisation


def _check_bits(v: int, what: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 32:
        raise ValueError(f"{what} must be an integer in 1..32 (32 = full precision)")
    return v


def _check_method(v: str) -> str:
    return one_of(v, QUANTIZERS, "quantizer")


# field types that validate themselves, shared by QuantSpec and its per-layer overrides
Bits = Annotated[int, AfterValidator(lambda v, info: _check_bits(v, info.field_name))]
Method = Annotated[str, AfterValidator(_check_method)]


class LayerOverride(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: Optional[Method] = None
    w_bits: Optional[Bits] = None
    a_bits: Optional[Bits] = None


class QuantSpec(BaseModel):
    """Quantization policy (defaults: LSQ W4A4, first and last layers at 8 bits)."""
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    method: Method = "lsq"
    w_bits: Bits = 4
    a_bits: Bits = 4
    per_channel: bool = False                  # weights: one scale per output channel
    first_last: Union[int, Literal["fp", "same"]] = 8   # bits of the first and last layer, fp or same
    first_last_method: Optional[Method] = "minmax"   # quantizer of the first/last layer (None: method's)
    overrides: dict[str, LayerOverride] = Field(default_factory=dict)  # glob -> bits/method
    skip: list[str] = Field(default_factory=list)    # globs of layers left in full precision
    signed_inputs: Literal["auto", "unsigned", "signed"] = "auto"
    # where the activation clips start: 'calibrated' at `percentile` of |x| of each layer's input on
    # the calibration batches (and SBS's weight alpha at that percentile of the standardised |w|);
    # 'paper' at the papers' constants: DoReFa's fixed [0, 1], PACT's alpha = pact_alpha, SBS's 1
    act_init: Literal["calibrated", "paper"] = "calibrated"
    pact_alpha: float = Field(PACT_ALPHA, gt=0)      # PACT's alpha initialisation with act_init paper (paper: 10)
    percentile: float = Field(99.99, gt=50, le=100)
    # sbs weights: 'restored' w_q = std alpha (2 Q(z) - 1), the float weights' scale (a pretrained
    # network's residual branches keep their size); 'standardised' = alpha (2 Q(z) - 1), the code's
    sbs_weight_scale: Literal["restored", "standardised"] = "restored"
    kmeans_iters: int = Field(30, ge=1)
    # where activations are rounded: 'inputs' (the papers': each quantized layer's own input) or
    # 'deploy' (each tensor once where it is made, Add inputs included: what an int8 runtime fuses;
    # tandem/quant/deploy.py)
    layout: Literal["inputs", "deploy"] = "inputs"
    # options of `method` when it registered an options model (quant/registry.py); the built-in
    # quantizers take theirs as the fields above
    options: dict[str, Any] = Field(default_factory=dict)

    def clip_percentile(self) -> float | None:
        """act_init calibrated: the clips start at `percentile` of the calibration data; paper: at
        the papers' constants (DoReFa 1, PACT pact_alpha, SBS 1)."""
        return self.percentile if self.act_init == "calibrated" else None

    def method_options(self):
        """`options` validated by the options model `method` registered (None if it has none)."""
        model = QUANTIZERS.get(self.method).options
        return model.model_validate(self.options) if model is not None else None

    @field_validator("first_last", mode="before")
    @classmethod
    def _first_last(cls, v):
        if isinstance(v, str) and v.isdigit():
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return _check_bits(v, "first_last")
        if v in ("fp", "same"):
            return v
        raise ValueError("allowed: bits 1..32, 'fp' (full precision) or 'same' (like the other layers)")

    @model_validator(mode="after")
    def _layout_quantizer(self):
        if self.layout == "deploy":
            for m in sorted({self.method, self.first_last_method, *(o.method for o in self.overrides.values())} - {None}):
                if not QUANTIZERS.get(m).deploy_layout:
                    raise ValueError(f"layout 'deploy' does not apply to {m} (its input quantizers stay with "
                                     f"their layers); use layout: inputs")
        return self

    @model_validator(mode="after")
    def _options(self):
        model = QUANTIZERS.get(self.method).options
        if model is None and self.options:
            raise ValueError(f"quantizer {self.method!r} takes no options; got {sorted(self.options)}")
        if model is not None:
            try:
                model.model_validate(self.options)
            except ValidationError as exc:
                err = exc.errors()[0]
                key = ".".join(str(p) for p in err["loc"])
                allowed = ", ".join(model.model_fields)
                raise ValueError(f"options.{key}: {err['msg'].removeprefix('Value error, ')} "
                                 f"(options of {self.method!r}: {allowed})") from None
        return self

    @model_validator(mode="after")
    def _pact_alpha_used(self):
        if self.act_init == "calibrated" and self.pact_alpha != PACT_ALPHA:
            raise ValueError(f"pact_alpha = {self.pact_alpha} would have no effect: with act_init 'calibrated' PACT's "
                             f"alpha starts at the calibrated clip; set act_init: paper to start it at pact_alpha")
        return self


def make_spec(policy: Any = None, **kwargs) -> QuantSpec:
    """A QuantSpec from a QuantSpec, a dict, or keyword arguments; errors as RecipeError."""
    if isinstance(policy, QuantSpec):   # a recipe's quant section too: its run fields are not the policy's
        data = {**policy.model_dump(include=set(QuantSpec.model_fields)), **kwargs}
    elif isinstance(policy, dict):
        data = {**policy, **kwargs}
    elif policy is None:
        data = kwargs
    else:
        raise RecipeError(f"quantize_: policy must be a QuantSpec or a dict, not {type(policy).__name__}")
    try:
        return QuantSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        key = ".".join(str(p) for p in err["loc"])
        if err["type"] == "extra_forbidden":
            allowed = LayerOverride.model_fields if "overrides" in err["loc"] else QuantSpec.model_fields
            raise RecipeError(f"quant error: unknown key '{key}'; allowed: {', '.join(allowed)}") from None
        msg = err["msg"].removeprefix("Value error, ")
        if not key:   # a rule between fields: the message names them
            raise RecipeError(f"quant error: {msg}") from None
        raise RecipeError(f"quant error: {key} = {err.get('input')!r}: {msg}") from None
