"""Radio energy of a transmission: transmit power × airtime."""

from __future__ import annotations

import math

from meg.errors import InvalidInputError

__all__ = ["dbm_to_w", "radio_energy_j"]


def dbm_to_w(power_dbm: float) -> float:
    """Convert a power in dBm to watts: ``10 ** ((dBm - 30) / 10)`` (30 dBm = 1 W)."""
    if not math.isfinite(power_dbm):
        raise InvalidInputError(f"power_dbm must be finite, got {power_dbm!r}")
    return 10.0 ** ((power_dbm - 30.0) / 10.0)


def radio_energy_j(tx_power_dbm: float, airtime_s: float) -> float:
    """Energy (J) the transmitter spends radiating at ``tx_power_dbm`` for ``airtime_s``.

    Only the radiated power is counted (no PA efficiency, no receive power), as in the
    MEG paper's energy term ``P · T_tx`` (PAPERS.md §1, "Costs").
    """
    if not (math.isfinite(airtime_s) and airtime_s >= 0.0):
        raise InvalidInputError(f"airtime_s must be finite and >= 0, got {airtime_s!r}")
    return dbm_to_w(tx_power_dbm) * airtime_s
