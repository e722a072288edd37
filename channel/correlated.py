"""Time-correlated flat fading across successive transmissions (first-order Gauss–Markov).

The scattered part of the gain follows ``g_{t+1} = ρ g_t + sqrt(1 - ρ^2) w_t`` with
``w_t ~ CN(0, 1)``, started from its stationary law ``g_0 ~ CN(0, 1)``. So every ``g_t`` is
``CN(0, 1)`` and ``E[g_{t+k} g_t^*] = ρ^k``: a channel with memory, as a policy that
decides request after request sees it. With a line-of-sight part (K-factor ``K``),
``h_t = sqrt(K/(K+1)) e^{jφ} + sqrt(1/(K+1)) g_t`` (``K = 0``: Rayleigh).

``ρ`` is the correlation between consecutive draws; for a mobile with Doppler frequency
``f_D`` and draws ``T`` seconds apart, Jakes' (Clarke's) model gives ``ρ = J0(2π f_D T)``
(``jakes_correlation``). The state (``g``) is passed in and returned, so the model is a
pure function; the caller keeps the state between requests.
"""

from __future__ import annotations

import cmath
import math

import scipy.special
import torch
from torch import Tensor

from meg.channel.awgn import sample_complex_normal
from meg.channel.rician import check_k_factor
from meg.errors import InvalidInputError

__all__ = ["GaussMarkovFading", "jakes_correlation"]


def jakes_correlation(doppler_hz: float, interval_s: float) -> float:
    """Correlation ``J0(2π f_D T)`` of Clarke/Jakes fading between samples ``T`` seconds apart.

    Args:
        doppler_hz: maximum Doppler frequency ``f_D = v f_c / c`` (Hz), ``>= 0``.
        interval_s: time between the two samples (s), ``>= 0``.
    """
    if not (math.isfinite(doppler_hz) and doppler_hz >= 0):
        raise InvalidInputError(f"doppler_hz must be finite and >= 0, got {doppler_hz!r}")
    if not (math.isfinite(interval_s) and interval_s >= 0):
        raise InvalidInputError(f"interval_s must be finite and >= 0, got {interval_s!r}")
    return float(scipy.special.j0(2.0 * math.pi * doppler_hz * interval_s))


class GaussMarkovFading:
    """First-order Gauss–Markov fading process.

    Args:
        correlation: ``ρ`` in ``[-1, 1]``, correlation of consecutive scattered gains
            (``0``: independent draws, ``1``: a frozen channel).
        k_factor: Rician K-factor (linear); ``0`` gives Rayleigh fading.
        los_phase_rad: phase of the line-of-sight part.
    """

    def __init__(self, correlation: float, k_factor: float = 0.0, *, los_phase_rad: float = 0.0) -> None:
        rho = float(correlation)
        if not (math.isfinite(rho) and -1.0 <= rho <= 1.0):
            raise InvalidInputError(f"correlation must lie in [-1, 1], got {correlation!r}", field="correlation")
        self.correlation = rho
        self.k_factor = check_k_factor(k_factor)
        self.los_phase_rad = float(los_phase_rad)

    def initial(
        self,
        shape: tuple[int, ...] | torch.Size = (),
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.complex64,
    ) -> Tensor:
        """Draw the initial scattered state ``g_0 ~ CN(0, 1)`` of ``shape`` (the stationary law)."""
        return sample_complex_normal(tuple(shape), generator=generator, dtype=dtype)

    def step(self, state: Tensor, *, generator: torch.Generator | None = None) -> Tensor:
        """Advance the scattered state one draw: ``ρ g + sqrt(1 - ρ^2) w``; same shape and dtype."""
        innovation = sample_complex_normal(state.shape, generator=generator, dtype=state.dtype, device=state.device)
        return state * self.correlation + innovation * math.sqrt(max(0.0, 1.0 - self.correlation**2))

    def gain(self, state: Tensor) -> Tensor:
        """The channel gain ``h`` for a scattered state ``g`` (adds the line-of-sight part)."""
        if self.k_factor == 0.0:
            return state
        los = math.sqrt(self.k_factor / (self.k_factor + 1.0)) * cmath.exp(1j * self.los_phase_rad)
        return state * math.sqrt(1.0 / (self.k_factor + 1.0)) + los

    def sample_path(
        self,
        num_steps: int,
        shape: tuple[int, ...] | torch.Size = (),
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.complex64,
    ) -> Tensor:
        """Draw ``num_steps`` consecutive gains of ``shape`` from a fresh stationary start.

        Returns:
            ``[num_steps, *shape]`` complex gains ``h_0 … h_{num_steps-1}``.
        """
        if num_steps < 1:
            raise InvalidInputError(f"num_steps must be >= 1, got {num_steps!r}")
        state = self.initial(shape, generator=generator, dtype=dtype)
        path = [state]
        for _ in range(num_steps - 1):
            state = self.step(state, generator=generator)
            path.append(state)
        return self.gain(torch.stack(path))
