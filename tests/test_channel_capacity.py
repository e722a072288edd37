"""Shannon rate, Rayleigh ergodic capacity and outage against Monte-Carlo over drawn gains."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.special
import torch

from meg.channel.capacity import (
    rayleigh_ergodic_capacity_bps_hz,
    rayleigh_outage_probability,
    shannon_capacity_bps_hz,
    shannon_rate_bps,
)
from meg.channel.rayleigh import RayleighFastFading
from meg.errors import InvalidInputError

N = 400_000




def _rayleigh_power(seed: int) -> torch.Tensor:
    h = RayleighFastFading().sample_gains((N,), generator=torch.Generator().manual_seed(seed))
    return h.to(torch.complex128).abs().square()


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 10.0, 20.0])
def test_ergodic_capacity_matches_monte_carlo(snr_db: float) -> None:
    gamma = 10 ** (snr_db / 10)
    rates = torch.log2(1 + gamma * _rayleigh_power(int(snr_db) + 100))
    closed = float(rayleigh_ergodic_capacity_bps_hz(snr_db))
    assert closed == pytest.approx(math.log2(math.e) * math.exp(1 / gamma) * float(scipy.special.exp1(1 / gamma)))
    assert abs(rates.mean().item() - closed) < 5 * rates.std().item() / math.sqrt(N)
    # Jensen: fading costs capacity
    assert closed < float(shannon_capacity_bps_hz(snr_db))


def test_ergodic_capacity_is_stable_at_extreme_snr() -> None:
    low = rayleigh_ergodic_capacity_bps_hz(np.array([-40.0, -30.0, -27.0]))
    # at low SNR, C ≈ γ log2(e) (fading does not matter to first order)
    gamma = 10 ** (np.array([-40.0, -30.0, -27.0]) / 10)
    assert np.all(np.isfinite(low)) and np.allclose(low, gamma * math.log2(math.e), rtol=3e-3)
    high = float(rayleigh_ergodic_capacity_bps_hz(40.0))
    # at high SNR, C ≈ log2(γ) − γ_Euler log2(e), up to O(ln γ / γ)
    assert high == pytest.approx(math.log2(1e4) - 0.5772156649 * math.log2(math.e), abs=3e-3)


@pytest.mark.parametrize(("rate_bps_hz", "snr_db"), [(1.0, 0.0), (1.0, 10.0), (2.0, 10.0), (4.0, 20.0)])
def test_outage_matches_monte_carlo(rate_bps_hz: float, snr_db: float) -> None:
    gamma = 10 ** (snr_db / 10)
    power = _rayleigh_power(int(rate_bps_hz * 10 + snr_db))
    measured = (torch.log2(1 + gamma * power) < rate_bps_hz).double().mean().item()
    closed = float(rayleigh_outage_probability(rate_bps_hz, snr_db))
    assert closed == pytest.approx(1 - math.exp(-(2**rate_bps_hz - 1) / gamma))
    assert abs(measured - closed) < 5 * math.sqrt(closed * (1 - closed) / N) + 1 / N


def test_shannon_rate() -> None:
    assert shannon_rate_bps(0.0, 1e6) == pytest.approx(1e6)
    assert shannon_rate_bps(10 * math.log10(3), 2e6) == pytest.approx(4e6)
    assert rayleigh_outage_probability(0.0, 5.0) == 0.0
    with pytest.raises(InvalidInputError, match="bandwidth_hz"):
        shannon_rate_bps(3.0, 0.0)
    with pytest.raises(InvalidInputError, match="inf"):
        shannon_rate_bps(float("inf"), 1e6)
    with pytest.raises(InvalidInputError, match="-1"):
        rayleigh_outage_probability(-1.0, 0.0)
