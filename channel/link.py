"""The link between edge server and user device: airtime, energy and errors of a transmission.

``LinkEmulator(config, generator=g)`` carries data in one of three modes:

- ``ideal``: bytes arrive as sent, no airtime, no energy (the wire contract's IDEAL mode).
- ``digital`` (``send_packets``): each packet (payload + ``packet_overhead_bytes``) is sent
  at the link rate; it is lost with the packet error rate (PER) that the instantaneous SNR
  implies and retransmitted (stop-and-wait ARQ) up to ``max_retries`` times; every attempt
  costs airtime. ``rate_model`` sets rate and PER together:

  * ``shannon``: rate ``B log2(1 + γ̄)`` of the mean SNR with an ideal (capacity-achieving)
    code: a packet is lost exactly when the channel is in outage, ``B log2(1 + γ|h|^2) <
    rate``. Over AWGN nothing is lost; over Rayleigh the loss probability is the outage
    probability ``1 − exp(−(2^R − 1)/γ̄)``.
  * ``uncoded``: ``modulation`` without coding at ``B log2 M`` bit/s;
    ``PER = 1 − (1 − BER(γ))^bits`` from the modem's exact BER and the packet length.
  * ``mcs``: the fastest mode of the coded MCS table (``meg.channel.mcs``) whose PER at
    the mean SNR stays below ``target_per``, with that mode's rate and PER.

  ``rate_bps > 0`` overrides the rate (the PER model stays that of ``rate_model``).
- ``analog`` (``send_analog``): feature values are power-normalised, paired into complex
  symbols (two reals per symbol, one symbol per second per hertz), sent through fading and
  AWGN at the mean SNR, equalised with the known gain and de-normalised: the received
  tensor carries channel noise; the report gives the effective SNR on the features.

Fading: ``awgn`` (gain 1), ``rayleigh`` or ``rician`` (K-factor ``rician_k``). One gain is
drawn per packet attempt (digital) or per transmission (analog, unless
``coherence_symbols`` asks for block fading inside it); successive draws follow a
Gauss–Markov process with correlation ``fading_correlation`` (``0``: independent), so the
link has memory across packets and requests. Energy is transmit power × airtime.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from meg.channel.awgn import AWGN
from meg.channel.capacity import shannon_rate_bps
from meg.channel.correlated import GaussMarkovFading
from meg.channel.equalization import Equalizer, equalize
from meg.channel.flat import FlatFading
from meg.channel.mcs import McsEntry, select_mcs
from meg.channel.modem import BITS_PER_SYMBOL, Modulation
from meg.channel.rayleigh import RayleighFading
from meg.channel.rician import RicianFading
from meg.channel.theory import Fading, ber_theory
from meg.errors import ChannelError, InvalidInputError, NonFiniteError

__all__ = [
    "AnalogReport",
    "DigitalReport",
    "LinkConfig",
    "LinkEmulator",
    "config_from_channel_state",
    "shannon_rate_bps",
]

LinkMode = Literal["ideal", "digital", "analog"]
RateModel = Literal["shannon", "uncoded", "mcs"]
OnLoss = Literal["raise", "report"]


def _require(ok: bool, message: str, field: str) -> None:
    if not ok:
        raise InvalidInputError(message, field=field)


@dataclass(frozen=True)
class LinkConfig:
    """How the link behaves; every default of the channel emulator lives here."""

    mode: LinkMode = "ideal"
    """``ideal`` (no errors, no airtime), ``digital`` (packets, PER, ARQ) or ``analog`` (noisy features)."""
    snr_db: float = 20.0
    """Mean received SNR per symbol (dB)."""
    bandwidth_hz: float = 1e6
    """Bandwidth ``B`` (Hz); the symbol rate is ``B`` symbols/s."""
    fading: Fading = "awgn"
    """Small-scale fading: ``awgn``, ``rayleigh`` or ``rician``."""
    rician_k: float = 3.0
    """Rician K-factor (linear), used when ``fading == "rician"``."""
    tx_power_dbm: float = 30.0
    """Transmit power (dBm); energy = power × airtime."""
    rate_bps: float = 0.0
    """Fixed link rate (bit/s); 0 derives it from ``rate_model``."""
    modulation: Modulation = "qpsk"
    """Modem of the ``uncoded`` rate model (its BER gives the PER, ``log2 M`` bits per symbol)."""
    packet_overhead_bytes: int = 40
    """Header bytes added to every packet (and to every retransmission)."""
    max_packet_bytes: int = 1 << 20
    """Largest payload per packet in ``send_bytes`` (the wire's chunk size, 1 MiB)."""
    max_retries: int = 8
    """Retransmissions allowed per packet before it counts as lost."""
    realtime: bool = False
    """Sleep for the airtime instead of only accounting it."""
    rate_model: RateModel = "shannon"
    """Rate and PER: ``shannon`` (ideal code, loss = outage), ``uncoded`` (modem BER) or ``mcs`` (coded table)."""
    target_per: float = 0.1
    """Largest PER at the mean SNR the MCS selection accepts."""
    fading_correlation: float = 0.0
    """Correlation ``ρ`` of successive gain draws (Gauss–Markov); 0: independent draws."""
    coherence_symbols: int | None = None
    """Analog mode: symbols per independent gain; ``None``: one gain per transmission."""
    equalizer: Equalizer = "zf"
    """Analog mode: ``zf`` (unbiased, features + noise) or ``mmse`` (least mean squared error)."""
    on_loss: OnLoss = "raise"
    """A packet that exhausts its retries: ``raise`` ChannelError or ``report`` delivered=False."""

    def __post_init__(self) -> None:
        _require(self.mode in get_args(LinkMode), f"unknown link mode {self.mode!r}; expected ideal, digital or analog", "mode")
        _require(self.fading in get_args(Fading), f"unknown fading {self.fading!r}; expected awgn, rayleigh or rician", "fading")
        _require(self.modulation in BITS_PER_SYMBOL, f"unknown modulation {self.modulation!r}; expected bpsk, qpsk, 16qam or 64qam", "modulation")
        _require(self.rate_model in get_args(RateModel), f"unknown rate_model {self.rate_model!r}; expected shannon, uncoded or mcs", "rate_model")
        _require(self.equalizer in get_args(Equalizer), f"unknown equalizer {self.equalizer!r}; expected zf or mmse", "equalizer")
        _require(self.on_loss in get_args(OnLoss), f"unknown on_loss {self.on_loss!r}; expected raise or report", "on_loss")
        _require(math.isfinite(self.snr_db), f"snr_db must be finite, got {self.snr_db!r}", "snr_db")
        _require(math.isfinite(self.bandwidth_hz) and self.bandwidth_hz > 0, f"bandwidth_hz must be > 0, got {self.bandwidth_hz!r}", "bandwidth_hz")
        _require(math.isfinite(self.rician_k) and self.rician_k >= 0, f"rician_k must be >= 0, got {self.rician_k!r}", "rician_k")
        _require(math.isfinite(self.tx_power_dbm), f"tx_power_dbm must be finite, got {self.tx_power_dbm!r}", "tx_power_dbm")
        _require(math.isfinite(self.rate_bps) and self.rate_bps >= 0, f"rate_bps must be >= 0, got {self.rate_bps!r}", "rate_bps")
        _require(self.packet_overhead_bytes >= 0, f"packet_overhead_bytes must be >= 0, got {self.packet_overhead_bytes!r}", "packet_overhead_bytes")
        _require(self.max_packet_bytes >= 1, f"max_packet_bytes must be >= 1, got {self.max_packet_bytes!r}", "max_packet_bytes")
        _require(self.max_retries >= 0, f"max_retries must be >= 0, got {self.max_retries!r}", "max_retries")
        _require(0.0 < self.target_per < 1.0, f"target_per must lie in (0, 1), got {self.target_per!r}", "target_per")
        _require(-1.0 <= self.fading_correlation <= 1.0, f"fading_correlation must lie in [-1, 1], got {self.fading_correlation!r}", "fading_correlation")
        _require(
            self.coherence_symbols is None or self.coherence_symbols >= 1,
            f"coherence_symbols must be >= 1 or None, got {self.coherence_symbols!r}",
            "coherence_symbols",
        )

    @property
    def tx_power_w(self) -> float:
        """Transmit power in watts."""
        return 10.0 ** ((self.tx_power_dbm - 30.0) / 10.0)


@dataclass(frozen=True)
class DigitalReport:
    """What sending packets cost.

    Attributes:
        payload_bytes: payload bytes offered (overhead excluded).
        airtime_s: time on air, overhead and retransmissions included (s).
        energy_j: transmit energy, power × airtime (J).
        packets: packets offered.
        retransmissions: extra attempts over all packets.
        delivered: every packet got through.
    """

    payload_bytes: int
    airtime_s: float
    energy_j: float
    packets: int
    retransmissions: int
    delivered: bool


@dataclass(frozen=True)
class AnalogReport:
    """What an analog transmission cost and how noisy the features arrived.

    Attributes:
        symbols: complex channel symbols sent (two feature values each).
        airtime_s: ``symbols / bandwidth_hz`` (s).
        energy_j: transmit energy (J).
        feature_snr_db: ``10 log10(Σ x² / Σ (x̂ − x)²)`` measured on the features (dB);
            ``inf`` when they arrived exactly.
    """

    symbols: int
    airtime_s: float
    energy_j: float
    feature_snr_db: float


class LinkEmulator:
    """Emulates one link; keeps the fading state between calls (a channel with memory).

    Args:
        config: the link.
        generator: random source for gains, noise and packet losses; ``None`` makes a
            fresh generator seeded with 0, so runs are reproducible by default.
    """

    def __init__(self, config: LinkConfig, *, generator: torch.Generator | None = None) -> None:
        self.config = config
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        k_factor = config.rician_k if config.fading == "rician" else 0.0
        self._process = GaussMarkovFading(config.fading_correlation, k_factor)
        self._state: Tensor | None = None
        self._awgn = AWGN()

    # -- fading --------------------------------------------------------------------------

    def next_gain(self) -> complex:
        """Advance the fading process by one draw and return the gain (``1`` for AWGN)."""
        if self.config.fading == "awgn":
            return 1.0 + 0.0j
        if self._state is None:
            self._state = self._process.initial((), generator=self.generator, dtype=torch.complex128)
        else:
            self._state = self._process.step(self._state, generator=self.generator)
        return complex(self._process.gain(self._state).item())

    def _block_fading(self) -> FlatFading:
        config = self.config
        if config.fading == "rician":
            return RicianFading(config.rician_k, config.coherence_symbols)
        return RayleighFading(config.coherence_symbols)

    # -- digital -------------------------------------------------------------------------

    def mcs(self, packet_bits: int) -> McsEntry:
        """The MCS mode chosen for packets of ``packet_bits`` at the mean SNR."""
        return select_mcs(self.config.snr_db, target_per=self.config.target_per, packet_bits=packet_bits)

    def rate_bps(self, packet_bits: int | None = None) -> float:
        """Link rate (bit/s): ``rate_bps`` if set, else that of ``rate_model`` at the mean SNR."""
        config = self.config
        if config.rate_bps > 0:
            return config.rate_bps
        if config.rate_model == "mcs":
            return self.mcs(packet_bits or 8 * (1500 + config.packet_overhead_bytes)).rate_bps(config.bandwidth_hz)
        if config.rate_model == "uncoded":
            return BITS_PER_SYMBOL[config.modulation] * config.bandwidth_hz
        return shannon_rate_bps(config.snr_db, config.bandwidth_hz)

    def packet_error_rate(self, snr_db: float, packet_bits: int) -> float:
        """PER of one ``packet_bits`` packet at instantaneous SNR ``snr_db`` (per symbol, dB)."""
        config = self.config
        if not snr_db > -math.inf:  # a gain of exactly 0: nothing gets through
            return 1.0
        if config.rate_model == "mcs":
            return self.mcs(packet_bits).packet_error_rate(snr_db, packet_bits)
        if config.rate_model == "uncoded":
            bits_per_symbol = BITS_PER_SYMBOL[config.modulation]
            ber = float(ber_theory(config.modulation, snr_db - 10.0 * math.log10(bits_per_symbol)))
            return -math.expm1(packet_bits * math.log1p(-min(ber, 0.5)))
        # ideal code: decodable exactly when the instantaneous capacity carries the rate (the
        # tolerance keeps a rate set at exactly the capacity of the mean SNR decodable over AWGN)
        capacity_bps = config.bandwidth_hz * math.log2(1.0 + 10.0 ** (snr_db / 10.0))
        return 0.0 if capacity_bps >= self.rate_bps(packet_bits) * (1.0 - 1e-12) else 1.0

    def send_packets(self, sizes_bytes: Sequence[int]) -> DigitalReport:
        """Send packets of ``sizes_bytes`` payload bytes each (e.g. the wire chunks).

        Returns:
            the cost of the transmission. In ``analog`` mode the bytes are still sent as
            packets (side information travels digitally). With ``on_loss="report"`` the
            transmission stops at the first lost packet and ``delivered`` is False.

        Raises:
            ChannelError: a packet was lost ``max_retries + 1`` times (``on_loss="raise"``).
            InvalidInputError: a negative size.
        """
        config = self.config
        sizes = [int(size) for size in sizes_bytes]
        for index, size in enumerate(sizes):
            if size < 0:
                raise InvalidInputError(f"packet {index} has negative size {size}", field="sizes_bytes")
        payload_bytes = sum(sizes)
        if config.mode == "ideal":
            return DigitalReport(payload_bytes, 0.0, 0.0, len(sizes), 0, True)
        airtime_s = 0.0
        retransmissions = 0
        delivered = True
        lost: tuple[int, int] | None = None
        for index, size in enumerate(sizes):
            packet_bits = 8 * (size + config.packet_overhead_bytes)
            if packet_bits == 0:
                continue
            attempt_s = packet_bits / self.rate_bps(packet_bits)
            for attempt in range(config.max_retries + 1):
                airtime_s += attempt_s
                retransmissions += attempt > 0
                gain = self.next_gain()
                snr_db = config.snr_db + 10.0 * math.log10(abs(gain) ** 2) if gain != 0 else -math.inf
                per = self.packet_error_rate(snr_db, packet_bits)
                if per <= 0.0 or float(torch.rand((), generator=self.generator, dtype=torch.float64)) >= per:
                    break
            else:
                delivered = False
                lost = (index, size)
                break
        report = DigitalReport(payload_bytes, airtime_s, airtime_s * config.tx_power_w, len(sizes), retransmissions, delivered)
        if config.realtime:
            time.sleep(airtime_s)
        if lost is not None and config.on_loss == "raise":
            raise ChannelError(
                f"packet {lost[0]} ({lost[1]} bytes) lost after {config.max_retries + 1} attempts "
                f"at snr_db={config.snr_db} ({config.fading}); airtime spent {airtime_s:.6g} s",
                field="snr_db",
            )
        return report

    def send_bytes(self, payload_bytes: int) -> DigitalReport:
        """Send ``payload_bytes`` bytes as packets of at most ``max_packet_bytes`` (see ``send_packets``)."""
        if payload_bytes < 0:
            raise InvalidInputError(f"payload_bytes must be >= 0, got {payload_bytes!r}", field="payload_bytes")
        full, rest = divmod(int(payload_bytes), self.config.max_packet_bytes)
        return self.send_packets([self.config.max_packet_bytes] * full + ([rest] if rest else []))

    # -- analog --------------------------------------------------------------------------

    def send_analog(self, features: Tensor) -> tuple[Tensor, AnalogReport]:
        """Send real feature values as complex symbols and return what arrives.

        Args:
            features: any-shape real float tensor (e.g. merged latent tokens ``[B, M, 16]``),
                on any device (the channel itself runs on the CPU).

        Returns:
            ``(received, report)``: the received features (same shape and dtype) and the cost.
            In ``ideal`` mode the features arrive unchanged (``feature_snr_db = inf``, no airtime).

        Raises:
            InvalidInputError: in ``digital`` mode, or for a non-float tensor.
            NonFiniteError: features hold NaN or Inf.
        """
        config = self.config
        if config.mode == "digital":
            raise InvalidInputError("send_analog needs mode 'analog' or 'ideal', got mode 'digital'", field="mode")
        if not features.is_floating_point():
            raise InvalidInputError(f"features must be a real float tensor, got dtype {features.dtype}", field="features")
        if not bool(torch.isfinite(features).all()):
            raise NonFiniteError("features hold NaN or Inf values", field="features")
        count = features.numel()
        symbols = (count + 1) // 2
        if config.mode == "ideal":
            return features.clone(), AnalogReport(symbols, 0.0, 0.0, math.inf)
        airtime_s = symbols / config.bandwidth_hz
        energy_j = airtime_s * config.tx_power_w
        # the emulator's generator lives on the CPU, so the channel runs there
        flat = features.detach().reshape(-1).to("cpu", torch.float32)
        if count % 2:
            flat = torch.cat([flat, flat.new_zeros(1)])
        power = float(flat.square().mean()) if count else 0.0
        if power == 0.0:
            # nothing but zeros: the (error-free) scale side information says so
            received = features.clone()
            snr = math.inf
        else:
            # unit average symbol energy: E|s|^2 = 2 · mean(x²) / (2 P) = 1
            amplitude = math.sqrt(2.0 * power)
            pairs = flat.reshape(-1, 2) / amplitude
            tx = torch.complex(pairs[:, 0], pairs[:, 1])
            noise_var = 10.0 ** (-config.snr_db / 10.0)
            gains = self._transmission_gains(tx.shape[0])
            rx = self._awgn(gains * tx, noise_var, generator=self.generator)
            estimate, _ = equalize(rx, gains, noise_var, config.equalizer)
            restored = torch.stack([estimate.real, estimate.imag], dim=-1).reshape(-1)[:count] * amplitude
            received = restored.reshape(features.shape).to(features.device, features.dtype)
            error = float((restored - flat[:count]).square().sum())
            snr = math.inf if error == 0.0 else 10.0 * math.log10(float(flat.square().sum()) / error)
        if config.realtime:
            time.sleep(airtime_s)
        return received, AnalogReport(symbols, airtime_s, energy_j, snr)

    def _transmission_gains(self, num_symbols: int) -> Tensor:
        """``[num_symbols]`` complex64 gains for one analog transmission."""
        if self.config.fading == "awgn":
            return torch.ones(num_symbols, dtype=torch.complex64)
        if self.config.coherence_symbols is None:
            return torch.full((num_symbols,), self.next_gain(), dtype=torch.complex64)
        return self._block_fading().sample_gains((num_symbols,), generator=self.generator)


_FADING_FROM_PROTO: dict[int, Fading] = {1: "awgn", 2: "rayleigh", 3: "rician"}
_MODE_FROM_PROTO: dict[int, LinkMode] = {1: "ideal", 2: "digital", 3: "analog"}


def config_from_channel_state(state: object, **overrides: object) -> LinkConfig:
    """A ``LinkConfig`` from a wire ``meg.v1.generation_pb2.ChannelState``.

    ``snr_db`` is always taken; other fields left at 0 / UNSPECIFIED keep the ``LinkConfig``
    defaults; ``overrides`` win.
    """
    # snr_db is always taken (0 dB is a valid SNR); the other numbers use 0 for "unset"
    fields: dict[str, object] = {"snr_db": float(getattr(state, "snr_db", 0.0))}
    for name in ("bandwidth_hz", "rate_bps", "rician_k", "tx_power_dbm"):
        value = float(getattr(state, name, 0.0))
        if value != 0.0:
            fields[name] = value
    fading = int(getattr(state, "fading", 0))
    if fading:
        if fading not in _FADING_FROM_PROTO:
            raise InvalidInputError(f"unknown fading model {fading}", field="channel.fading")
        fields["fading"] = _FADING_FROM_PROTO[fading]
    mode = int(getattr(state, "mode", 0))
    if mode:
        if mode not in _MODE_FROM_PROTO:
            raise InvalidInputError(f"unknown transport mode {mode}", field="channel.mode")
        fields["mode"] = _MODE_FROM_PROTO[mode]
    fields.update(overrides)
    return LinkConfig(**fields)  # type: ignore[arg-type]
