"""Large-scale link budget: log-distance path loss, transmit power, noise → SNR and rate.

Path loss ``PL(d) = a + b · log10(d / 1 m)`` dB; MEG (PAPERS.md §1) uses ``a = 35.3``,
``b = 37.6``, i.e. a channel gain of ``−(35.3 + 37.6 log10 d)`` dB, with 30 dBm transmit
power, 1 MHz bandwidth and −94 dBm noise, giving ≈ +2.2 dB SNR at 200 m and −4.4 dB at
300 m. Received SNR (dB) = ``P_tx − PL(d) − N``, where the noise power ``N`` over the band
is given either in total (``noise_dbm``) or as a power spectral density
(``noise_dbm_hz``, then ``N = N0 + 10 log10 B``; −94 dBm over 1 MHz ≈ −154 dBm/Hz).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import overload

import torch
from torch import Tensor

from meg.channel.capacity import shannon_rate_bps
from meg.errors import InvalidInputError

__all__ = ["MEG_LINK_BUDGET", "LinkBudget", "log_distance_path_loss_db"]


@overload
def log_distance_path_loss_db(distance_m: float, a_db: float, b_db: float) -> float: ...
@overload
def log_distance_path_loss_db(distance_m: Tensor, a_db: float, b_db: float) -> Tensor: ...
def log_distance_path_loss_db(distance_m: float | Tensor, a_db: float, b_db: float) -> float | Tensor:
    """Path loss ``a + b log10(d)`` in dB (a positive loss) for distance ``d`` in metres (``> 0``)."""
    if isinstance(distance_m, Tensor):
        if not bool(torch.isfinite(distance_m).all()) or bool((distance_m <= 0).any()):
            raise InvalidInputError(f"distance_m must be finite and > 0, got {distance_m}", field="distance_m")
        return a_db + b_db * torch.log10(distance_m)
    d = float(distance_m)
    if not (math.isfinite(d) and d > 0):
        raise InvalidInputError(f"distance_m must be finite and > 0, got {distance_m!r}", field="distance_m")
    return a_db + b_db * math.log10(d)


@dataclass(frozen=True)
class LinkBudget:
    """Transmit power, bandwidth, noise and path-loss constants of a link.

    Attributes:
        tx_power_dbm: transmit power (dBm).
        bandwidth_hz: bandwidth ``B`` (Hz).
        noise_dbm: total noise power over the band (dBm); used when ``noise_dbm_hz`` is None.
        pl_a_db: path-loss intercept ``a`` (dB at 1 m).
        pl_b_db: path-loss slope ``b`` (dB per decade of distance; 10 × the exponent).
        noise_dbm_hz: noise power spectral density ``N0`` (dBm/Hz); overrides ``noise_dbm``.
    """

    tx_power_dbm: float = 30.0
    bandwidth_hz: float = 1e6
    noise_dbm: float = -94.0
    pl_a_db: float = 35.3
    pl_b_db: float = 37.6
    noise_dbm_hz: float | None = None

    def __post_init__(self) -> None:
        for name in ("tx_power_dbm", "bandwidth_hz", "noise_dbm", "pl_a_db", "pl_b_db"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise InvalidInputError(f"{name} must be finite, got {value!r}", field=name)
        if self.bandwidth_hz <= 0:
            raise InvalidInputError(f"bandwidth_hz must be > 0, got {self.bandwidth_hz!r}", field="bandwidth_hz")
        if self.noise_dbm_hz is not None and not math.isfinite(self.noise_dbm_hz):
            raise InvalidInputError(f"noise_dbm_hz must be finite, got {self.noise_dbm_hz!r}", field="noise_dbm_hz")

    @classmethod
    def from_noise_psd(cls, noise_dbm_hz: float, **fields: float) -> LinkBudget:
        """A budget whose noise is given as a spectral density ``N0`` (dBm/Hz)."""
        return cls(noise_dbm_hz=noise_dbm_hz, **fields)

    @property
    def noise_power_dbm(self) -> float:
        """Total noise power over the band (dBm): ``noise_dbm``, or ``N0 + 10 log10 B``."""
        if self.noise_dbm_hz is None:
            return self.noise_dbm
        return self.noise_dbm_hz + 10.0 * math.log10(self.bandwidth_hz)

    @overload
    def path_loss_db(self, distance_m: float) -> float: ...
    @overload
    def path_loss_db(self, distance_m: Tensor) -> Tensor: ...
    def path_loss_db(self, distance_m: float | Tensor) -> float | Tensor:
        """Path loss (positive dB) at ``distance_m`` metres; float or tensor in, same out."""
        return log_distance_path_loss_db(distance_m, self.pl_a_db, self.pl_b_db)

    @overload
    def snr_db(self, distance_m: float) -> float: ...
    @overload
    def snr_db(self, distance_m: Tensor) -> Tensor: ...
    def snr_db(self, distance_m: float | Tensor) -> float | Tensor:
        """Mean received SNR (dB) at ``distance_m``: ``P_tx − PL(d) − N``."""
        return self.tx_power_dbm - self.path_loss_db(distance_m) - self.noise_power_dbm

    def rate_bps(self, distance_m: float) -> float:
        """Shannon rate ``B log2(1 + SNR(d))`` (bit/s) at ``distance_m``."""
        return shannon_rate_bps(self.snr_db(float(distance_m)), self.bandwidth_hz)

    def with_tx_power(self, tx_power_dbm: float) -> LinkBudget:
        """A copy with another transmit power."""
        return replace(self, tx_power_dbm=tx_power_dbm)


MEG_LINK_BUDGET = LinkBudget()
