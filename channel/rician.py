"""Rician flat fading with K-factor ``K`` (power of the line-of-sight path over the scattered power).

``h = sqrt(K / (K + 1)) · e^{jφ} + sqrt(1 / (K + 1)) · g``, ``g ~ CN(0, 1)``, so that
``E|h|^2 = 1``, ``E[h] = sqrt(K / (K + 1)) e^{jφ}`` and ``Var|h|^2 = (2K + 1) / (K + 1)^2``.
``K = 0`` is Rayleigh fading; ``K → ∞`` tends to AWGN.
"""

from __future__ import annotations

import cmath
import math

import torch
from torch import Tensor

from meg.channel.awgn import sample_complex_normal
from meg.channel.flat import FlatFading
from meg.errors import InvalidInputError

__all__ = ["RicianFading", "check_k_factor", "rician_gain_moments"]


def check_k_factor(k_factor: float) -> float:
    """Validate a Rician K-factor (linear, finite, ``>= 0``)."""
    value = float(k_factor)
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"rician_k must be finite and >= 0 (linear), got {k_factor!r}", field="rician_k")
    return value


def rician_gain_moments(k_factor: float) -> tuple[float, float]:
    """Mean and variance of the power gain ``|h|^2`` for K-factor ``k_factor``: ``(1, (2K+1)/(K+1)^2)``."""
    k = check_k_factor(k_factor)
    return 1.0, (2.0 * k + 1.0) / (k + 1.0) ** 2


class RicianFading(FlatFading):
    """Rician flat fading.

    Args:
        k_factor: ``K`` (linear), line-of-sight power over scattered power.
        block_length: symbols per independent gain (see ``FlatFading``); ``1`` fast fading.
        los_phase_rad: phase ``φ`` of the line-of-sight component.
    """

    def __init__(self, k_factor: float, block_length: int | None = 1, *, los_phase_rad: float = 0.0) -> None:
        super().__init__(block_length)
        self.k_factor = check_k_factor(k_factor)
        self.los_phase_rad = float(los_phase_rad)

    @property
    def los(self) -> complex:
        """The deterministic line-of-sight part ``sqrt(K/(K+1)) e^{jφ}``."""
        return math.sqrt(self.k_factor / (self.k_factor + 1.0)) * cmath.exp(1j * self.los_phase_rad)

    def _draw(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str | None
    ) -> Tensor:
        scattered = sample_complex_normal(shape, generator=generator, dtype=dtype, device=device)
        return scattered * math.sqrt(1.0 / (self.k_factor + 1.0)) + self.los
