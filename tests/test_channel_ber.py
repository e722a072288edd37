"""Bit error rates measured through modem + channel + equaliser against closed forms.

Every point uses a fixed seed. The tolerance is five Monte-Carlo standard errors of the
error count: bits of one symbol are not independent, so the variance of the count is
bounded by ``k · n · p (1 − p)`` (``k`` bits per symbol), plus ``k`` errors for the
discreteness of very small counts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from meg.channel.ber import BerPoint, simulate_ber
from meg.channel.modem import BITS_PER_SYMBOL
from meg.channel.theory import (
    average_q,
    ber_bpsk_awgn,
    ber_bpsk_rayleigh,
    ber_qam_approx,
    ber_theory,
    q_function,
)
from meg.errors import InvalidInputError

SNR_DB = [float(v) for v in range(0, 21, 2)]
BITS = 300_000  # a multiple of 1, 2, 4 and 6 bits per symbol




def _within(point: BerPoint, p: float, relative_model_error: float = 0.0) -> bool:
    k = BITS_PER_SYMBOL[point.modulation]
    n = point.bits
    tolerance = 5 * math.sqrt(k * n * p * (1 - p)) + k + relative_model_error * n * p
    return abs(point.errors - n * p) <= tolerance


@pytest.mark.parametrize("fading", ["awgn", "rayleigh"])
@pytest.mark.parametrize("modulation", ["bpsk", "qpsk", "16qam", "64qam"])
def test_all_modulations_match_exact_theory_from_0_to_20_db(modulation: str, fading: str) -> None:
    seed = ["bpsk", "qpsk", "16qam", "64qam"].index(modulation) * 2 + (fading == "rayleigh")
    rows = simulate_ber(modulation, fading, SNR_DB, BITS, generator=torch.Generator().manual_seed(seed))  # type: ignore[arg-type]
    assert [row.snr_db for row in rows] == SNR_DB
    for row in rows:
        assert row.bits == BITS
        assert row.ber_theory == pytest.approx(float(ber_theory(modulation, row.snr_db, fading)))  # type: ignore[arg-type]
        assert _within(row, row.ber_theory), row
    # the curves fall with SNR and are far from trivial at 0 dB
    assert rows[0].ber > 0.05 and rows[-1].ber < rows[0].ber / 20


@pytest.mark.parametrize("modulation", ["bpsk", "qpsk"])
def test_bpsk_and_qpsk_match_the_textbook_formulas(modulation: str) -> None:
    g = torch.Generator().manual_seed(21)
    for row in simulate_ber(modulation, "awgn", [0.0, 3.0, 6.0, 8.0], 1_000_000, generator=g):  # type: ignore[arg-type]
        gamma = 10 ** (row.snr_db / 10)
        assert _within(row, float(q_function(math.sqrt(2 * gamma)))), row
    for row in simulate_ber(modulation, "rayleigh", [0.0, 10.0, 20.0], 1_000_000, generator=g):  # type: ignore[arg-type]
        gamma = 10 ** (row.snr_db / 10)
        assert _within(row, 0.5 * (1 - math.sqrt(gamma / (1 + gamma)))), row


@pytest.mark.parametrize(("modulation", "snr_db"), [("16qam", [8.0, 10.0, 12.0]), ("64qam", [12.0, 14.0, 16.0])])
def test_square_qam_matches_the_standard_approximation_where_it_holds(modulation: str, snr_db: list[float]) -> None:
    rows = simulate_ber(modulation, "awgn", snr_db, 1_000_000, generator=torch.Generator().manual_seed(5))  # type: ignore[arg-type]
    for row in rows:
        bits = BITS_PER_SYMBOL[modulation]
        m = 2**bits
        approx = 4 / bits * (1 - 1 / math.sqrt(m)) * float(q_function(math.sqrt(3 * bits * 10 ** (row.snr_db / 10) / (m - 1))))
        assert approx == pytest.approx(float(ber_qam_approx(modulation, row.snr_db)))  # type: ignore[arg-type]
        # the approximation drops the second-nearest neighbours: within 1% here
        assert _within(row, approx, relative_model_error=0.01), row


def test_rician_ber_matches_theory() -> None:
    g = torch.Generator().manual_seed(8)
    for modulation in ("bpsk", "16qam"):
        for row in simulate_ber(modulation, "rician", [0.0, 6.0, 12.0, 18.0], 240_000, generator=g, rician_k=3.0):  # type: ignore[arg-type]
            assert _within(row, row.ber_theory), row
            assert row.ber_theory == pytest.approx(float(ber_theory(modulation, row.snr_db, "rician", 3.0)))  # type: ignore[arg-type]


def _cho_yoon(bits: int, ebn0_db: np.ndarray) -> np.ndarray:
    """Exact Gray square M-QAM BER, eq. (14)-(16) of Cho & Yoon."""
    m = 2**bits
    root = math.isqrt(m)
    gamma = 10 ** (ebn0_db / 10)
    total = np.zeros_like(gamma)
    for k in range(1, int(math.log2(root)) + 1):
        for i in range(int((1 - 2.0**-k) * root)):
            sign = (-1) ** math.floor(i * 2 ** (k - 1) / root)
            weight = 2 ** (k - 1) - math.floor(i * 2 ** (k - 1) / root + 0.5)
            total += 1 / root * sign * weight * 2 * q_function((2 * i + 1) * np.sqrt(3 * bits * gamma / (m - 1)))
    return total / math.log2(root)


def test_theory_reduces_to_known_cases() -> None:
    snr = np.arange(0.0, 21.0, 2.0)
    # BPSK and Gray QPSK have the same BER per Eb/N0
    assert np.allclose(ber_theory("bpsk", snr), ber_bpsk_awgn(snr), rtol=1e-12, atol=0)
    assert np.allclose(ber_theory("qpsk", snr), ber_bpsk_awgn(snr), rtol=1e-12, atol=0)
    assert np.allclose(ber_theory("qpsk", snr, "rayleigh"), ber_bpsk_rayleigh(snr), rtol=1e-12, atol=0)
    # square QAM: the independent closed form of Cho & Yoon (IEEE Trans. Commun. 50(7), 2002)
    for modulation in ("16qam", "64qam"):
        assert np.allclose(ber_theory(modulation, snr), _cho_yoon(BITS_PER_SYMBOL[modulation], snr), rtol=1e-9, atol=0)
    # Rician: K = 0 is Rayleigh, a large K approaches AWGN
    assert np.allclose(ber_theory("16qam", snr, "rician", 0.0), ber_theory("16qam", snr, "rayleigh"), rtol=1e-9)
    low = np.array([0.0, 4.0])
    assert np.allclose(ber_theory("bpsk", low, "rician", 1e4), ber_bpsk_awgn(low), rtol=1e-3)
    # Rayleigh is worse than Rician (K=3) is worse than AWGN
    assert np.all(ber_theory("64qam", snr, "rayleigh") > ber_theory("64qam", snr, "rician", 3.0))
    assert np.all(ber_theory("64qam", snr, "rician", 3.0) > ber_theory("64qam", snr))
    # Craig's-formula average agrees with direct numerical integration over the Rician law
    t = 2.0
    from scipy import integrate, special

    k = 3.0
    nu, var = math.sqrt(k / (k + 1)), 1 / (2 * (k + 1))  # |h| is Rice(ν, σ² per quadrature)

    def rice_pdf(r: float) -> float:  # r/σ² exp(−(r²+ν²)/2σ²) I0(rν/σ²), with i0e for range
        return r / var * math.exp(-((r - nu) ** 2) / (2 * var)) * float(special.i0e(r * nu / var))

    direct = integrate.quad(lambda r: rice_pdf(r) * 0.5 * math.erfc(math.sqrt(t) * r), 0, 10)[0]
    assert float(average_q(t, "rician", k)) == pytest.approx(direct, rel=1e-6)


def test_bad_arguments_are_rejected() -> None:
    g = torch.Generator()
    with pytest.raises(InvalidInputError, match="bits"):
        simulate_ber("64qam", "awgn", [0.0], 5, generator=g)
    with pytest.raises(InvalidInputError, match="rain"):
        simulate_ber("qpsk", "rain", [0.0], 100, generator=g)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="snr_db"):
        simulate_ber("qpsk", "awgn", [], 100, generator=g)
    with pytest.raises(InvalidInputError, match="bpsk"):
        ber_qam_approx("bpsk", 0.0)
