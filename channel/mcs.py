"""A modulation-and-coding-scheme (MCS) table with packet error rates for adaptive transmission.

The six convolutionally coded modes and their packet-error-rate fits are those of Liu,
Zhou and Giannakis, "Cross-layer combining of adaptive modulation and coding with
truncated ARQ over wireless links", IEEE Trans. Wireless Commun. 3(5), 2004, Table I
(802.11a/HIPERLAN/2-like codes, packets of 1080 bits over AWGN):

    PER(γ) ≈ 1                 for γ < γ_p
    PER(γ) ≈ a · exp(−g γ)     for γ ≥ γ_p         (γ: SNR per symbol, linear)

For packets of other lengths the per-bit success probability is kept:
``PER_L = 1 − (1 − PER_1080)^(L / 1080)``. The symbol rate is taken as the bandwidth
(Nyquist signalling), so a mode with ``η`` information bits per symbol runs at ``η B`` bit/s.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from meg.channel.modem import Modulation
from meg.errors import InvalidInputError

__all__ = ["MCS_TABLE", "REFERENCE_PACKET_BITS", "McsEntry", "select_mcs"]

REFERENCE_PACKET_BITS = 1080


@dataclass(frozen=True)
class McsEntry:
    """One transmission mode.

    Attributes:
        index: position in the table (0 = most robust).
        modulation: the constellation.
        code_rate: convolutional code rate.
        per_a: fit coefficient ``a``.
        per_g: fit exponent ``g``.
        threshold_snr_db: ``γ_p`` in dB, below which every packet is taken as lost.
    """

    index: int
    modulation: Modulation
    code_rate: float
    per_a: float
    per_g: float
    threshold_snr_db: float

    @property
    def bits_per_symbol(self) -> float:
        """Information bits per channel symbol ``η = log2(M) · code_rate``."""
        return {"bpsk": 1, "qpsk": 2, "16qam": 4, "64qam": 6}[self.modulation] * self.code_rate

    def rate_bps(self, bandwidth_hz: float) -> float:
        """Information rate ``η B`` (bit/s) at one symbol per second per hertz."""
        return self.bits_per_symbol * bandwidth_hz

    def packet_error_rate(self, snr_db: float, packet_bits: int) -> float:
        """PER of a ``packet_bits``-bit packet at SNR ``snr_db`` (per symbol, dB)."""
        if packet_bits <= 0:
            raise InvalidInputError(f"packet_bits must be > 0, got {packet_bits!r}")
        if snr_db < self.threshold_snr_db:
            return 1.0
        per_ref = min(1.0, self.per_a * math.exp(-self.per_g * 10.0 ** (snr_db / 10.0)))
        if per_ref >= 1.0:
            return 1.0
        return -math.expm1(packet_bits / REFERENCE_PACKET_BITS * math.log1p(-per_ref))


MCS_TABLE: tuple[McsEntry, ...] = (
    McsEntry(0, "bpsk", 1 / 2, 274.7229, 7.9932, -1.5331),
    McsEntry(1, "qpsk", 1 / 2, 90.2514, 3.4998, 1.0942),
    McsEntry(2, "qpsk", 3 / 4, 67.6181, 1.6883, 3.9722),
    McsEntry(3, "16qam", 9 / 16, 50.1222, 0.6644, 7.7021),
    McsEntry(4, "16qam", 3 / 4, 53.3987, 0.3756, 10.2488),
    McsEntry(5, "64qam", 3 / 4, 35.3508, 0.0900, 15.9784),
)


def select_mcs(snr_db: float, *, target_per: float = 0.1, packet_bits: int = REFERENCE_PACKET_BITS) -> McsEntry:
    """The fastest mode whose PER at ``snr_db`` stays at or below ``target_per`` (else mode 0).

    Args:
        snr_db: SNR per symbol (dB) the transmitter expects.
        target_per: largest acceptable packet error rate, in ``(0, 1)``.
        packet_bits: packet length the PER refers to.
    """
    if not math.isfinite(snr_db):
        raise InvalidInputError(f"snr_db must be finite, got {snr_db!r}", field="snr_db")
    if not 0.0 < target_per < 1.0:
        raise InvalidInputError(f"target_per must lie in (0, 1), got {target_per!r}")
    best = MCS_TABLE[0]
    for entry in MCS_TABLE:
        if entry.packet_error_rate(snr_db, packet_bits) <= target_per:
            best = entry
    return best
