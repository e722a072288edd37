"""Linear equalisation of flat fading with known gains: zero-forcing and MMSE.

For ``y = h x + n`` with ``E|x|^2 = Es`` and ``n ~ CN(0, N0)`` (per symbol):

- zero-forcing: ``x̂ = y / h``; unbiased; error variance ``N0 / |h|^2`` (it blows up in deep fades);
- MMSE: ``x̂ = Es h^* y / (Es |h|^2 + N0)``; biased towards 0 by ``β = Es|h|^2/(Es|h|^2 + N0)``,
  error variance ``Es N0 / (Es |h|^2 + N0)``, never more than ``Es``.

For one stream per gain (flat fading) the unbiased MMSE estimate ``x̂ / β`` equals
zero-forcing, so hard decisions are the same; MMSE is the one to use when the estimate
itself is the output (analog feature transport), because it minimises the mean squared error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from meg.channel.awgn import as_complex, check_noise_var
from meg.errors import InvalidInputError

__all__ = ["Equalizer", "equalize", "mmse_equalize", "zf_equalize"]

Equalizer = Literal["zf", "mmse"]


def zf_equalize(y: Tensor, h: Tensor, noise_var: float | Tensor) -> tuple[Tensor, Tensor]:
    """Zero-forcing equalisation.

    Args:
        y: ``[..., N]`` complex received symbols.
        h: complex gains broadcastable to ``y``.
        noise_var: noise power per symbol ``N0`` (float or tensor broadcastable to ``y``).

    Returns:
        ``(x_hat, noise_var_eff)``: ``[..., N]`` complex estimates and the per-symbol error
        variance ``N0 / |h|^2`` (real, broadcast to ``y``'s shape).
    """
    noise_var = check_noise_var(noise_var)
    y, h = as_complex(y), as_complex(h)
    power = h.real.square() + h.imag.square()
    x_hat = y / h
    return x_hat, torch.broadcast_to(noise_var / power, x_hat.shape)


def mmse_equalize(
    y: Tensor, h: Tensor, noise_var: float | Tensor, *, signal_energy: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Linear MMSE equalisation (biased: the minimum-mean-squared-error estimate).

    Args:
        y: ``[..., N]`` complex received symbols.
        h: complex gains broadcastable to ``y``.
        noise_var: noise power per symbol ``N0`` (float or tensor broadcastable to ``y``).
        signal_energy: ``Es = E|x|^2`` (1 for the modems' unit-energy symbols).

    Returns:
        ``(x_hat, mse)``: ``[..., N]`` complex estimates and the per-symbol error variance
        ``Es N0 / (Es |h|^2 + N0)``.
    """
    noise_var = check_noise_var(noise_var)
    if not signal_energy > 0:
        raise InvalidInputError(f"signal_energy must be > 0, got {signal_energy!r}")
    y, h = as_complex(y), as_complex(h)
    power = h.real.square() + h.imag.square()
    denominator = power * signal_energy + noise_var
    x_hat = y * h.conj() * (signal_energy / denominator)
    return x_hat, torch.broadcast_to(signal_energy * noise_var / denominator, x_hat.shape)


def equalize(
    y: Tensor, h: Tensor, noise_var: float | Tensor, method: Equalizer = "zf"
) -> tuple[Tensor, Tensor]:
    """Equalise with ``method`` (``"zf"`` or ``"mmse"``); see ``zf_equalize`` / ``mmse_equalize``."""
    if method == "zf":
        return zf_equalize(y, h, noise_var)
    if method == "mmse":
        return mmse_equalize(y, h, noise_var)
    raise InvalidInputError(f"unknown equalizer {method!r}; expected 'zf' or 'mmse'", field="equalizer")
