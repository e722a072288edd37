"""Rayleigh flat fading: ``h ~ CN(0, 1)`` (no line of sight), ``|h|^2`` exponential with mean 1.

``RayleighFading(block_length=1)`` is fast fading (a new gain every symbol);
``RayleighBlockFading(block_length=L)`` holds each gain for ``L`` symbols (``None``: one
gain per example). Usage: ``y, h = RayleighFastFading()(x, noise_var, generator=g,
return_gains=True)``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from meg.channel.awgn import sample_complex_normal
from meg.channel.flat import FlatFading

__all__ = ["RayleighBlockFading", "RayleighFading", "RayleighFastFading"]


class RayleighFading(FlatFading):
    """Rayleigh flat fading with ``block_length`` symbols per independent gain (see ``FlatFading``)."""

    def _draw(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str | None
    ) -> Tensor:
        return sample_complex_normal(shape, generator=generator, dtype=dtype, device=device)


class RayleighBlockFading(RayleighFading):
    """Block fading: one gain per ``block_length`` symbols; ``None`` (default) one per example."""

    def __init__(self, block_length: int | None = None) -> None:
        super().__init__(block_length)


class RayleighFastFading(RayleighFading):
    """Fast fading: an independent gain for every symbol."""

    def __init__(self) -> None:
        super().__init__(1)
