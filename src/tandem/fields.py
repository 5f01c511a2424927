"""Recipe field types shared by sections: fractions, stage milestones, the section base classes and
a model (`ArchSpec`). A leaf (it imports only errors, and models to check a model name), so the
sections of every layer and the methods import it without importing the recipe."""
from __future__ import annotations

from typing import Annotated, Any, Optional

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .errors import one_of


def Fraction(interval: str, meaning: str):
    """A float in ``interval`` ('[0, 1)', '(0, 1]' or '(0, 1)'; a bracket holds its end); outside
    it, the recipe error says ``meaning`` and the range."""
    low, high = interval[0] == "[", interval[-1] == "]"

    def check(v: float) -> float:
        if not ((0 <= v if low else 0 < v) and (v <= 1 if high else v < 1)):
            raise ValueError(f"{meaning}; allowed range {interval}")
        return v
    return Annotated[float, AfterValidator(check)]


def _stage_fractions(v: list[float]) -> list[float]:
    if any(not 0 < m < 1 for m in v):
        raise ValueError("milestones are fractions of the stage's epochs, each in (0, 1)")
    return v


# a method stage's lr milestones, as fractions of its epochs (TrainSpec.multistep)
StageMilestones = Annotated[list[float], AfterValidator(_stage_fractions)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Named(Section):
    """A section that may be given as its name alone (`model: resnet20`)."""

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v


class ArchSpec(Named):
    """A model (the model section, a teacher): a registered one by `name` (with widths and
    options), or the user's own by `factory` ('package.module:function', called with
    num_classes and in_channels where it takes them, and `options`)."""
    name: str = "small_cnn"
    factory: Optional[str] = None
    widths: Optional[list[int]] = None
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_model(cls, v: str) -> str:
        from .models import list_models
        from .models.registry import is_factory
        return v if is_factory(v) else one_of(v, list_models(), "model")

    @model_validator(mode="after")
    def _factory(self):
        """A factory model is named by its factory (so name and factory agree once written)."""
        from .models.registry import is_factory
        if self.factory is None and is_factory(self.name):
            object.__setattr__(self, "factory", self.name)
        if self.factory is None:
            return self
        if not is_factory(self.factory):
            raise ValueError(f"factory {self.factory!r}: write it as 'package.module:function'")
        if "name" in self.model_fields_set and self.name != self.factory:
            raise ValueError(f"name {self.name!r} and factory {self.factory!r} both given: name picks a registered "
                             f"model, factory builds your own; give one")
        if self.widths is not None:
            raise ValueError("widths set the layers of a registered model; a factory builds its own architecture "
                             "(give its options instead)")
        object.__setattr__(self, "name", self.factory)
        return self
