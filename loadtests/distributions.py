"""Length distributions for prompts and outputs, written as short strings on the command line.

    fixed:N               always N
    uniform:LO:HI         an integer drawn uniformly from LO..HI (both included)
    normal:MEAN:STD       round(gauss(MEAN, STD)), clipped to at least 1
    lognormal:MEDIAN:SIGMA round(MEDIAN * exp(gauss(0, SIGMA))), clipped to at least 1: the long-tailed
                          lengths of real chat traffic

Draws come from a caller-owned ``random.Random`` so a fixed seed gives the same lengths every run.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

KINDS = {"fixed": 1, "uniform": 2, "normal": 2, "lognormal": 2}
"""Distribution name -> number of parameters after it."""


@dataclass(frozen=True)
class LengthDistribution:
    """A distribution of positive integer lengths (tokens); see the module docstring for the kinds."""

    kind: str
    params: tuple[float, ...]

    @classmethod
    def parse(cls, spec: str) -> LengthDistribution:
        """Parse ``kind:p1[:p2]``; raises ValueError with the accepted forms on anything else."""
        kind, *fields = spec.strip().split(":")
        if kind not in KINDS or len(fields) != KINDS[kind]:
            raise ValueError(f"bad length distribution {spec!r}: use fixed:N, uniform:LO:HI, normal:MEAN:STD "
                             "or lognormal:MEDIAN:SIGMA")
        try:
            params = tuple(float(f) for f in fields)
        except ValueError:
            raise ValueError(f"bad length distribution {spec!r}: parameters must be numbers") from None
        if kind in ("fixed", "uniform") and any(p != int(p) or p < 1 for p in params):
            raise ValueError(f"bad length distribution {spec!r}: lengths must be integers >= 1")
        if kind == "uniform" and params[0] > params[1]:
            raise ValueError(f"bad length distribution {spec!r}: LO must not exceed HI")
        if kind in ("normal", "lognormal") and (params[0] < 1 or params[1] < 0):
            raise ValueError(f"bad length distribution {spec!r}: need a centre >= 1 and a spread >= 0")
        return cls(kind, params)

    def sample(self, rng: random.Random) -> int:
        """One length >= 1."""
        if self.kind == "fixed":
            return int(self.params[0])
        if self.kind == "uniform":
            return rng.randint(int(self.params[0]), int(self.params[1]))
        if self.kind == "normal":
            value = rng.gauss(*self.params)
        else:
            value = self.params[0] * math.exp(rng.gauss(0.0, self.params[1]))
        return max(1, round(value))

    def __str__(self) -> str:
        return ":".join([self.kind, *(f"{p:g}" for p in self.params)])
