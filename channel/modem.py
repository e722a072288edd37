"""Gray-mapped BPSK, QPSK, 16-QAM and 64-QAM with unit average symbol energy and hard decisions.

Square M-QAM is two independent Gray-coded √M-PAM streams, one on the in-phase and one on
the quadrature axis; each symbol carries ``log2 M`` bits, the first half on I, the second
half on Q, most significant bit first. Neighbouring points (on either axis) differ in
exactly one bit. BPSK puts one bit on the real axis (bit 0 → −1, bit 1 → +1).

Hard decisions slice each axis to the nearest PAM level, which is maximum-likelihood
detection for equalised symbols with circular Gaussian noise.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor

from meg.errors import InvalidInputError

__all__ = ["BITS_PER_SYMBOL", "Modem", "Modulation", "check_modulation"]

Modulation = Literal["bpsk", "qpsk", "16qam", "64qam"]
BITS_PER_SYMBOL: dict[str, int] = {"bpsk": 1, "qpsk": 2, "16qam": 4, "64qam": 6}


def check_modulation(modulation: str) -> Modulation:
    """Validate a modulation name (one of ``bpsk``, ``qpsk``, ``16qam``, ``64qam``)."""
    if modulation not in get_args(Modulation):
        raise InvalidInputError(
            f"unknown modulation {modulation!r}; expected one of {', '.join(get_args(Modulation))}",
            field="modulation",
        )
    return modulation  # type: ignore[return-value]


class Modem:
    """Maps bits to unit-energy complex symbols and back (hard decisions).

    Args:
        modulation: ``"bpsk"``, ``"qpsk"``, ``"16qam"`` or ``"64qam"``.
    """

    def __init__(self, modulation: Modulation) -> None:
        self.modulation: Modulation = check_modulation(modulation)
        self.bits_per_symbol = BITS_PER_SYMBOL[modulation]
        # bits per real axis and the number of PAM levels on it
        self._axes = 1 if modulation == "bpsk" else 2
        self._bits_per_axis = self.bits_per_symbol // self._axes
        self._levels = 1 << self._bits_per_axis
        levels = self._levels
        # unit average symbol energy: an L-PAM axis with levels ±1, ±3, … has energy (L²−1)/3
        self.scale = math.sqrt(self._axes * (levels * levels - 1) / 3.0) ** -1
        self._shifts = torch.arange(self._bits_per_axis - 1, -1, -1, dtype=torch.uint8)

    def modulate(self, bits: Tensor) -> Tensor:
        """Map bits to symbols.

        Args:
            bits: ``[..., n]`` integer or bool tensor of 0/1, ``n`` a multiple of
                ``bits_per_symbol``.

        Returns:
            ``[..., n / bits_per_symbol]`` complex64 symbols, ``E|s|^2 = 1`` for uniform bits.
        """
        if bits.is_floating_point() or bits.is_complex():
            raise InvalidInputError(f"bits must be an integer or bool tensor, got dtype {bits.dtype}")
        n = bits.shape[-1] if bits.dim() else 0
        if bits.dim() == 0 or n % self.bits_per_symbol:
            raise InvalidInputError(
                f"number of bits ({n}) must be a positive multiple of {self.bits_per_symbol} for {self.modulation}"
            )
        grouped = bits.reshape(*bits.shape[:-1], n // self.bits_per_symbol, self._axes, self._bits_per_axis)
        # Gray → level: the binary digits of the level index are the prefix XORs of the Gray
        # bits, and level index i sits at 2i − (L − 1) = Σ_j 2^(m−1−j) (2 c_j − 1)
        prefix = grouped[..., 0]
        amplitude = prefix.to(torch.float32) * 2.0 - 1.0
        for position in range(1, self._bits_per_axis):
            prefix = prefix ^ grouped[..., position]
            amplitude = amplitude * 2.0 + (prefix.to(torch.float32) * 2.0 - 1.0)
        amplitude = amplitude * self.scale  # [..., S, axes]
        if self._axes == 1:
            return torch.complex(amplitude[..., 0], torch.zeros_like(amplitude[..., 0]))
        return torch.complex(amplitude[..., 0], amplitude[..., 1])

    def demodulate(self, symbols: Tensor) -> Tensor:
        """Hard-decide equalised symbols back to bits.

        Args:
            symbols: ``[..., S]`` complex (or real) equalised symbols.

        Returns:
            ``[..., S * bits_per_symbol]`` uint8 bits.
        """
        if symbols.is_complex():
            axes = [symbols.real] if self._axes == 1 else [symbols.real, symbols.imag]
        else:
            axes = [symbols] if self._axes == 1 else [symbols, torch.zeros_like(symbols)]
        labels = []
        for axis in axes:
            # nearest level: undo the scale, shift levels ±1, ±3, … onto 0 … L−1, round, clip
            index = torch.round((axis / self.scale + (self._levels - 1)) * 0.5).clamp_(0, self._levels - 1)
            index = index.to(torch.uint8)
            labels.append(index ^ (index >> 1))  # the Gray label of that level
        stacked = torch.stack(labels, dim=-1)  # [..., S, axes]
        bits = (stacked.unsqueeze(-1) >> self._shifts.to(stacked.device)) & 1  # [..., S, axes, bits_per_axis]
        return bits.reshape(*symbols.shape[:-1], symbols.shape[-1] * self.bits_per_symbol)

    def constellation(self) -> tuple[Tensor, Tensor]:
        """All ``M`` points and their labels.

        Returns:
            ``(points, bits)``: ``[M]`` complex64 points and ``[M, bits_per_symbol]`` uint8
            labels, in label order (point ``i`` carries the bits of integer ``i``).
        """
        m = 1 << self.bits_per_symbol
        shifts = torch.arange(self.bits_per_symbol - 1, -1, -1)
        labels = ((torch.arange(m)[:, None] >> shifts) & 1).to(torch.uint8)
        return self.modulate(labels.reshape(-1)).reshape(m), labels
