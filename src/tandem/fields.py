"""Recipe field types shared by sections (a leaf module: sections of every layer import it)."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def Fraction(interval: str, meaning: str):
    """A float in ``interval`` ('[0, 1)', '(0, 1]' or '(0, 1)'; a bracket holds its end); outside
    it, the recipe error says ``meaning`` and the range."""
    low, high = interval[0] == "[", interval[-1] == "]"

    def check(v: float) -> float:
        if not ((0 <= v if low else 0 < v) and (v <= 1 if high else v < 1)):
            raise ValueError(f"{meaning}; allowed range {interval}")
        return v
    return Annotated[float, AfterValidator(check)]
