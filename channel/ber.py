"""Monte-Carlo bit error rate of a modem over a channel, next to its closed form.

One point: random bits → ``Modem.modulate`` → fast fading (one independent gain per
symbol, known at the receiver) + AWGN at ``N0 = 1 / (bits_per_symbol · Eb/N0)`` →
zero-forcing → hard decisions → count bit errors. The theory column is ``ber_theory`` for
the same modem and fading.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from meg.channel.awgn import AWGN
from meg.channel.equalization import zf_equalize
from meg.channel.flat import FlatFading
from meg.channel.modem import Modem, Modulation, check_modulation
from meg.channel.rayleigh import RayleighFading
from meg.channel.rician import RicianFading
from meg.channel.theory import Fading, ber_theory
from meg.errors import InvalidInputError

__all__ = ["BerPoint", "BerSweep", "ebn0_to_noise_var", "make_fading", "simulate_ber"]

# bits per vectorised chunk: bounds memory (~100 MB at 64-QAM) without hurting throughput
_CHUNK_BITS = 1 << 21


@dataclass(frozen=True)
class BerSweep:
    """Defaults of a BER sweep (``meg channel ber``)."""

    modulations: tuple[Modulation, ...] = ("qpsk",)
    """Modems to measure."""
    fadings: tuple[Fading, ...] = ("awgn",)
    """Channels to measure (fast fading, known gains)."""
    snr_db: tuple[float, ...] = tuple(float(v) for v in range(0, 21, 2))
    """``Eb/N0`` points in dB."""
    bits: int = 1_000_000
    """Bits per point."""
    seed: int = 0
    """Seed of the one generator the whole sweep draws from."""
    rician_k: float = 3.0
    """K-factor for ``rician``."""
    threads: int = 1
    """torch intra-op threads: the chunks are small, more threads mostly spin."""


@dataclass(frozen=True)
class BerPoint:
    """One point of a BER curve.

    Attributes:
        snr_db: ``Eb/N0`` in dB (mean ``Eb/N0`` under fading).
        ber: measured bit error rate, ``errors / bits``.
        ber_theory: closed-form bit error rate for the same modem and fading.
        bits: bits simulated.
        errors: bit errors counted.
        modulation: the modem.
        fading: the channel.
    """

    snr_db: float
    ber: float
    ber_theory: float
    bits: int
    errors: int
    modulation: str
    fading: str

    def to_dict(self) -> dict[str, float | int | str]:
        """The row as a JSON-ready dict."""
        return asdict(self)


def ebn0_to_noise_var(ebn0_db: float, bits_per_symbol: int) -> float:
    """Noise power per complex symbol for unit-energy symbols: ``N0 = 1 / (k · Eb/N0)``."""
    return 1.0 / (bits_per_symbol * 10.0 ** (ebn0_db / 10.0))


def make_fading(fading: Fading, rician_k: float = 3.0, block_length: int | None = 1) -> FlatFading | None:
    """The channel model for a fading name (``None`` for AWGN, which has no gains)."""
    if fading == "awgn":
        return None
    if fading == "rayleigh":
        return RayleighFading(block_length)
    if fading == "rician":
        return RicianFading(rician_k, block_length)
    raise InvalidInputError(f"unknown fading {fading!r}; expected awgn, rayleigh or rician", field="fading")


def simulate_ber(
    modulation: Modulation,
    fading: Fading,
    snr_db: Sequence[float],
    bits: int,
    *,
    generator: torch.Generator,
    rician_k: float = 3.0,
    on_point: Callable[[BerPoint], None] | None = None,
) -> list[BerPoint]:
    """Measure BER at each ``Eb/N0`` in ``snr_db`` with ``bits`` bits per point.

    Args:
        modulation: ``bpsk``, ``qpsk``, ``16qam`` or ``64qam``.
        fading: ``awgn``, ``rayleigh`` or ``rician`` (fast fading, known gains).
        snr_db: ``Eb/N0`` values in dB.
        bits: bits per point (rounded down to whole symbols), ``> 0``.
        generator: the random source (bits, gains, noise).
        rician_k: K-factor for ``rician``.
        on_point: called after each point (progress display).

    Returns:
        one ``BerPoint`` per SNR value, in order.
    """
    modulation = check_modulation(modulation)
    points = [float(v) for v in snr_db]
    if not points or not all(math.isfinite(v) for v in points):
        raise InvalidInputError(f"snr_db must be non-empty finite numbers, got {list(snr_db)!r}", field="snr_db")
    modem = Modem(modulation)
    total_bits = int(bits) // modem.bits_per_symbol * modem.bits_per_symbol
    if total_bits <= 0:
        raise InvalidInputError(f"bits must be at least {modem.bits_per_symbol} for {modulation}, got {bits!r}", field="bits")
    channel = make_fading(fading, rician_k)
    awgn = AWGN()
    theory = ber_theory(modulation, points, fading, rician_k)
    chunk = _CHUNK_BITS // modem.bits_per_symbol * modem.bits_per_symbol
    rows: list[BerPoint] = []
    for ebn0_db, expected in zip(points, theory, strict=True):
        noise_var = ebn0_to_noise_var(ebn0_db, modem.bits_per_symbol)
        errors = 0
        for start in range(0, total_bits, chunk):
            n = min(chunk, total_bits - start)
            tx_bits = torch.randint(0, 2, (n,), generator=generator, dtype=torch.uint8)
            symbols = modem.modulate(tx_bits)
            if channel is None:
                equalised = awgn(symbols, noise_var, generator=generator)
            else:
                received, gains = channel(symbols, noise_var, generator=generator, return_gains=True)
                equalised, _ = zf_equalize(received, gains, noise_var)
            errors += int((modem.demodulate(equalised) != tx_bits).sum())
        row = BerPoint(ebn0_db, errors / total_bits, float(expected), total_bits, errors, modulation, fading)
        rows.append(row)
        if on_point is not None:
            on_point(row)
    return rows
