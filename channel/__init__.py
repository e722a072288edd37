"""Wireless channel emulator: fading models, modems, link budget, airtime and energy.

One concept per module; the public names are re-exported here::

    from meg.channel import Modem, RayleighFastFading, zf_equalize
    g = torch.Generator().manual_seed(0)
    x = Modem("16qam").modulate(bits)                           # [..., N] complex64, E|x|^2 = 1
    y, h = RayleighFastFading()(x, noise_var, generator=g, return_gains=True)
    x_hat, _ = zf_equalize(y, h, noise_var)
"""

from meg.channel.awgn import AWGN, sample_complex_normal
from meg.channel.ber import BerPoint, ebn0_to_noise_var, simulate_ber
from meg.channel.capacity import (
    rayleigh_ergodic_capacity_bps_hz,
    rayleigh_outage_probability,
    shannon_capacity_bps_hz,
    shannon_rate_bps,
)
from meg.channel.correlated import GaussMarkovFading, jakes_correlation
from meg.channel.equalization import equalize, mmse_equalize, zf_equalize
from meg.channel.flat import FlatFading
from meg.channel.link import (
    AnalogReport,
    DigitalReport,
    LinkConfig,
    LinkEmulator,
    config_from_channel_state,
)
from meg.channel.mcs import MCS_TABLE, McsEntry, select_mcs
from meg.channel.modem import BITS_PER_SYMBOL, Modem
from meg.channel.pathloss import MEG_LINK_BUDGET, LinkBudget, log_distance_path_loss_db
from meg.channel.rayleigh import RayleighBlockFading, RayleighFading, RayleighFastFading
from meg.channel.rician import RicianFading, rician_gain_moments
from meg.channel.theory import (
    average_q,
    ber_bpsk_awgn,
    ber_bpsk_rayleigh,
    ber_qam_approx,
    ber_theory,
    q_function,
)

__all__ = [
    "AWGN",
    "BITS_PER_SYMBOL",
    "MCS_TABLE",
    "MEG_LINK_BUDGET",
    "AnalogReport",
    "BerPoint",
    "DigitalReport",
    "FlatFading",
    "GaussMarkovFading",
    "LinkBudget",
    "LinkConfig",
    "LinkEmulator",
    "McsEntry",
    "Modem",
    "RayleighBlockFading",
    "RayleighFading",
    "RayleighFastFading",
    "RicianFading",
    "average_q",
    "ber_bpsk_awgn",
    "ber_bpsk_rayleigh",
    "ber_qam_approx",
    "ber_theory",
    "config_from_channel_state",
    "ebn0_to_noise_var",
    "equalize",
    "jakes_correlation",
    "log_distance_path_loss_db",
    "mmse_equalize",
    "q_function",
    "rayleigh_ergodic_capacity_bps_hz",
    "rayleigh_outage_probability",
    "rician_gain_moments",
    "sample_complex_normal",
    "select_mcs",
    "shannon_capacity_bps_hz",
    "shannon_rate_bps",
    "simulate_ber",
    "zf_equalize",
]
