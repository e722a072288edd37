"""Shannon rate, Rayleigh ergodic capacity and outage probability.

- AWGN (Shannon): ``C = B log2(1 + γ)`` bit/s.
- Rayleigh ergodic capacity (Lee 1990; Goldsmith, *Wireless Communications*, §4.2.4):
  ``E[log2(1 + γ̄ G)] = log2(e) · e^{1/γ̄} · E1(1/γ̄)`` bit/s/Hz, ``E1`` the exponential integral.
- Rayleigh outage at rate ``R`` bit/s/Hz: ``P(log2(1 + γ̄ G) < R) = 1 − exp(−(2^R − 1)/γ̄)``.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.special
from numpy.typing import ArrayLike, NDArray

from meg.errors import InvalidInputError

__all__ = [
    "rayleigh_ergodic_capacity_bps_hz",
    "rayleigh_outage_probability",
    "shannon_capacity_bps_hz",
    "shannon_rate_bps",
]


def _check_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {value!r}", field=name)
    return value


def shannon_capacity_bps_hz(snr_db: ArrayLike) -> NDArray[np.float64]:
    """Spectral efficiency ``log2(1 + γ)`` (bit/s/Hz) at SNR ``snr_db``."""
    return np.log2(1.0 + np.power(10.0, np.asarray(snr_db, dtype=np.float64) / 10.0))


def shannon_rate_bps(snr_db: float, bandwidth_hz: float) -> float:
    """Shannon rate ``B log2(1 + γ)`` in bit/s.

    Args:
        snr_db: received SNR over the band (dB).
        bandwidth_hz: bandwidth ``B`` (Hz), ``> 0``.
    """
    snr_db = _check_finite("snr_db", snr_db)
    bandwidth_hz = _check_finite("bandwidth_hz", bandwidth_hz)
    if bandwidth_hz <= 0:
        raise InvalidInputError(f"bandwidth_hz must be > 0, got {bandwidth_hz!r}", field="bandwidth_hz")
    return bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))


def _exp_e1(x: NDArray[np.float64]) -> NDArray[np.float64]:
    """``e^x E1(x)`` without overflow: direct below 500, asymptotic series above."""
    out = np.empty_like(x)
    small = x < 500.0
    out[small] = np.exp(x[small]) * scipy.special.exp1(x[small])
    xl = x[~small]
    # e^x E1(x) ~ (1/x) Σ (−1)^k k! / x^k; five terms are exact to float64 for x ≥ 500
    out[~small] = (1.0 - 1.0 / xl + 2.0 / xl**2 - 6.0 / xl**3 + 24.0 / xl**4) / xl
    return out


def rayleigh_ergodic_capacity_bps_hz(snr_db: ArrayLike) -> NDArray[np.float64]:
    """Ergodic capacity of Rayleigh fading with mean SNR ``γ̄``: ``log2(e) e^{1/γ̄} E1(1/γ̄)`` bit/s/Hz."""
    inv = 1.0 / np.power(10.0, np.atleast_1d(np.asarray(snr_db, dtype=np.float64)) / 10.0)
    result = math.log2(math.e) * _exp_e1(inv)
    return result.reshape(np.shape(snr_db))


def rayleigh_outage_probability(rate_bps_hz: ArrayLike, snr_db: ArrayLike) -> NDArray[np.float64]:
    """Probability that Rayleigh fading with mean SNR ``γ̄`` cannot carry ``R`` bit/s/Hz: ``1 − exp(−(2^R−1)/γ̄)``."""
    rate = np.asarray(rate_bps_hz, dtype=np.float64)
    if np.any(rate < 0):
        raise InvalidInputError(f"rate_bps_hz must be >= 0, got {rate_bps_hz!r}", field="rate_bps_hz")
    gamma = np.power(10.0, np.asarray(snr_db, dtype=np.float64) / 10.0)
    return -np.expm1(-(np.exp2(rate) - 1.0) / gamma)
