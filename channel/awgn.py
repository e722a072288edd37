"""Additive white Gaussian noise: ``y = x + n``, ``n ~ CN(0, noise_var)``.

Structure (nothing) in the constructor, conditions (the noise variance) in the call, as in
Sionna's ``AWGN``: ``AWGN()(x, noise_var, generator=g)``. The noise variance is the total
power of the complex noise per symbol (``N0`` for unit-energy symbols, so ``Es/N0 =
1/noise_var``); each of the real and imaginary parts carries half of it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from meg.errors import InvalidInputError

__all__ = ["AWGN", "as_complex", "check_noise_var", "sample_complex_normal"]


def sample_complex_normal(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None,
    dtype: torch.dtype = torch.complex64,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw i.i.d. ``CN(0, 1)`` samples (``E|z|^2 = 1``, real and imaginary parts ``N(0, 1/2)``).

    Returns: complex tensor of ``shape`` and ``dtype``.
    """
    # torch draws complex normals with unit total variance directly: one call, no stacking.
    return torch.randn(tuple(shape), dtype=dtype, generator=generator, device=device)


def as_complex(x: Tensor) -> Tensor:
    """Return ``x`` as a complex tensor (real inputs become ``x + 0j``; complex64 for float32)."""
    if x.is_complex():
        return x
    if not x.is_floating_point():
        raise InvalidInputError(f"channel input must be a float or complex tensor, got dtype {x.dtype}")
    return torch.complex(x, torch.zeros_like(x))


def check_noise_var(noise_var: float | Tensor) -> float | Tensor:
    """Validate a noise variance: finite and non-negative (a Python float stays a float)."""
    if isinstance(noise_var, Tensor):
        if noise_var.is_complex() or not bool(torch.isfinite(noise_var).all()) or bool((noise_var < 0).any()):
            raise InvalidInputError(f"noise_var must be finite and >= 0, got {noise_var}")
        return noise_var
    value = float(noise_var)
    if not math.isfinite(value) or value < 0:
        raise InvalidInputError(f"noise_var must be finite and >= 0, got {noise_var!r}")
    return value


class AWGN:
    """Complex additive white Gaussian noise channel."""

    def __call__(
        self, x: Tensor, noise_var: float | Tensor, *, generator: torch.Generator | None = None
    ) -> Tensor:
        """Add ``CN(0, noise_var)`` noise to ``x``.

        Args:
            x: ``[..., N]`` complex symbols (real tensors are taken as ``x + 0j``).
            noise_var: noise power per complex symbol; a float or a tensor broadcastable to
                ``x`` (one value per example, e.g. shape ``[B, 1]``).
            generator: the random source; ``None`` uses torch's global generator.

        Returns:
            ``[..., N]`` complex noisy symbols, same dtype as the complex input.
        """
        x = as_complex(x)
        noise_var = check_noise_var(noise_var)
        noise = sample_complex_normal(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        # in place on the fresh noise tensor: one allocation for the whole call
        if isinstance(noise_var, Tensor):
            try:
                shape: torch.Size | None = torch.broadcast_shapes(noise_var.shape, x.shape)
            except RuntimeError:
                shape = None
            if shape != x.shape:
                raise InvalidInputError(
                    f"noise_var of shape {tuple(noise_var.shape)} does not broadcast to the signal shape {tuple(x.shape)}"
                )
            return noise.mul_(noise_var.to(x.real.dtype).sqrt()).add_(x)
        return noise.mul_(math.sqrt(noise_var)).add_(x)
