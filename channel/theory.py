"""Closed-form bit error rates of the Gray-mapped modems over AWGN, Rayleigh and Rician fading.

Everything is in terms of ``Eb/N0`` (energy per bit over noise spectral density) and, for
fading, its average ``γ̄``; gains have ``E|h|^2 = 1`` and the receiver knows ``h``
(coherent detection). Textbook forms (Proakis, *Digital Communications*, 5th ed., §4.3 and
§13.3; Simon & Alouini, *Digital Communication over Fading Channels*, §8.1):

- BPSK / QPSK over AWGN: ``Q(√(2 Eb/N0))``; over Rayleigh: ``½ (1 − √(γ̄ / (1 + γ̄)))``.
- square M-QAM, standard approximation (nearest neighbours only):
  ``(4 / log2 M)(1 − 1/√M) Q(√(3 log2 M · Eb/N0 / (M − 1)))``.

``ber_theory`` is exact for every modem here: a Gray √M-PAM axis errs into level ``j`` from
level ``i`` with a difference of Q-functions at odd multiples of the half distance ``d``;
weighting each by the Hamming distance of the labels gives the BER as a sum
``Σ_n c_n Q(n d/σ)``, and over fading each ``Q(√(2 t G))`` term is averaged in closed form
(Rayleigh) or by Craig's formula with the moment generating function of ``G = |h|^2`` (Rician).
"""

from __future__ import annotations

import math
from functools import cache
from typing import Literal

import numpy as np
import scipy.special
from numpy.typing import ArrayLike, NDArray

from meg.channel.modem import BITS_PER_SYMBOL, Modulation, check_modulation
from meg.channel.rician import check_k_factor
from meg.errors import InvalidInputError

__all__ = [
    "Fading",
    "average_q",
    "ber_bpsk_awgn",
    "ber_bpsk_rayleigh",
    "ber_qam_approx",
    "ber_theory",
    "db_to_linear",
    "q_function",
]

Fading = Literal["awgn", "rayleigh", "rician"]


def db_to_linear(value_db: ArrayLike) -> NDArray[np.float64]:
    """``10^(x/10)``."""
    return np.power(10.0, np.asarray(value_db, dtype=np.float64) / 10.0)


def q_function(x: ArrayLike) -> NDArray[np.float64]:
    """Gaussian tail probability ``Q(x) = P(N(0,1) > x) = ½ erfc(x/√2)``."""
    return 0.5 * scipy.special.erfc(np.asarray(x, dtype=np.float64) / math.sqrt(2.0))


def ber_bpsk_awgn(ebn0_db: ArrayLike) -> NDArray[np.float64]:
    """BPSK (and Gray QPSK) over AWGN: ``Q(√(2 Eb/N0))``."""
    return q_function(np.sqrt(2.0 * db_to_linear(ebn0_db)))


def ber_bpsk_rayleigh(ebn0_db: ArrayLike) -> NDArray[np.float64]:
    """BPSK (and Gray QPSK) over Rayleigh fading: ``½ (1 − √(γ̄/(1+γ̄)))``, ``γ̄`` = mean Eb/N0."""
    gamma = db_to_linear(ebn0_db)
    return 0.5 * (1.0 - np.sqrt(gamma / (1.0 + gamma)))


# Gauss–Legendre nodes on θ ∈ (0, π/2) for Craig's formula; the integrand is smooth.
_CRAIG_NODES, _CRAIG_WEIGHTS = np.polynomial.legendre.leggauss(96)
_CRAIG_THETA = (_CRAIG_NODES + 1.0) * (math.pi / 4.0)
_CRAIG_WEIGHTS = _CRAIG_WEIGHTS * (math.pi / 4.0)


def average_q(t: ArrayLike, fading: Fading = "awgn", rician_k: float = 3.0) -> NDArray[np.float64]:
    """``E[Q(√(2 t G))]`` over the power gain ``G = |h|^2`` (mean 1) of ``fading``.

    AWGN: ``G = 1``; Rayleigh: ``½ (1 − √(t/(1+t)))``; Rician (K): Craig's formula
    ``(1/π) ∫_0^{π/2} M_G(−t / sin²θ) dθ`` with ``M_G(s) = (1+K)/(1+K−s) · exp(K s/(1+K−s))``.
    """
    t = np.asarray(t, dtype=np.float64)
    if fading == "awgn":
        return q_function(np.sqrt(2.0 * t))
    if fading == "rayleigh":
        return 0.5 * (1.0 - np.sqrt(t / (1.0 + t)))
    if fading == "rician":
        k = check_k_factor(rician_k)
        s = -t[..., None] / np.sin(_CRAIG_THETA) ** 2
        mgf = (1.0 + k) / (1.0 + k - s) * np.exp(k * s / (1.0 + k - s))
        return (mgf * _CRAIG_WEIGHTS).sum(-1) / math.pi
    raise InvalidInputError(f"unknown fading {fading!r}; expected awgn, rayleigh or rician", field="fading")


@cache
def _pam_q_coefficients(bits_per_axis: int) -> tuple[tuple[int, float], ...]:
    """Exact BER of one Gray L-PAM axis as ``Σ c_n Q(n d/σ)`` over odd ``n``: the pairs ``(n, c_n)``."""
    levels = 1 << bits_per_axis
    gray = [i ^ (i >> 1) for i in range(levels)]
    coefficients: dict[int, float] = {}
    for sent in range(levels):
        for decided in range(levels):
            if decided == sent:
                continue
            weight = bin(gray[sent] ^ gray[decided]).count("1") / (levels * bits_per_axis)
            gap = abs(decided - sent)
            # P(decide j | sent i) = Q((2|j−i|−1) d/σ) − Q((2|j−i|+1) d/σ); no upper term at the edge
            coefficients[2 * gap - 1] = coefficients.get(2 * gap - 1, 0.0) + weight
            if decided not in (0, levels - 1):
                coefficients[2 * gap + 1] = coefficients.get(2 * gap + 1, 0.0) - weight
    return tuple(sorted((n, c) for n, c in coefficients.items() if c != 0.0))


def ber_theory(
    modulation: Modulation,
    ebn0_db: ArrayLike,
    fading: Fading = "awgn",
    rician_k: float = 3.0,
) -> NDArray[np.float64]:
    """Exact bit error rate of a Gray-mapped modem with coherent detection.

    Args:
        modulation: ``bpsk``, ``qpsk``, ``16qam`` or ``64qam``.
        ebn0_db: ``Eb/N0`` in dB (mean ``Eb/N0`` under fading); any shape.
        fading: ``awgn``, ``rayleigh`` (fast, known gains) or ``rician``.
        rician_k: K-factor (linear) for ``rician``.

    Returns:
        BER, same shape as ``ebn0_db`` (float64).
    """
    modulation = check_modulation(modulation)
    bits = BITS_PER_SYMBOL[modulation]
    axes = 1 if modulation == "bpsk" else 2
    bits_per_axis = bits // axes
    levels = 1 << bits_per_axis
    half_distance_sq = 1.0 / (axes * (levels * levels - 1) / 3.0)  # d² for unit symbol energy
    # d/σ with σ² = N0/2 per axis and N0 = 1/(bits · Eb/N0):  (d/σ)² = 2 d² bits Eb/N0 = 2 t
    t = half_distance_sq * bits * db_to_linear(ebn0_db)
    ber = np.zeros_like(t)
    for n, c in _pam_q_coefficients(bits_per_axis):
        ber = ber + c * average_q(n * n * t, fading, rician_k)
    return ber


def ber_qam_approx(
    modulation: Modulation, ebn0_db: ArrayLike, fading: Fading = "awgn", rician_k: float = 3.0
) -> NDArray[np.float64]:
    """The standard nearest-neighbour approximation for square M-QAM (QPSK, 16-QAM, 64-QAM).

    ``(4/log2 M)(1 − 1/√M) Q(√(3 log2 M · Eb/N0 / (M − 1)))``, averaged over ``fading``
    (Rayleigh: ``(2/log2 M)(1 − 1/√M)(1 − √(x/(1+x)))`` with ``x = 1.5 log2 M γ̄/(M − 1)``).
    Accurate to a few percent once the BER is below ~1e-2; exact for QPSK.
    """
    modulation = check_modulation(modulation)
    if modulation == "bpsk":
        raise InvalidInputError("ber_qam_approx covers square QAM (qpsk, 16qam, 64qam), got 'bpsk'", field="modulation")
    bits = BITS_PER_SYMBOL[modulation]
    m = 1 << bits
    t = 1.5 * bits * db_to_linear(ebn0_db) / (m - 1)
    return (4.0 / bits) * (1.0 - 1.0 / math.sqrt(m)) * average_q(t, fading, rician_k)

