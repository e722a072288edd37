"""Flat fading with known gains: ``y = h ⊙ x + n`` (one complex gain per symbol).

The shared shape of the flat-fading models (Rayleigh, Rician, time-correlated): a model
only says how gains are drawn (``_draw``); this base class lays them out in coherence
blocks along the last axis, applies them and adds noise. Generating and applying are kept
apart, so a realisation can be drawn on its own (``sample_gains``) or returned with the
output (``return_gains=True``) and tested against theory.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Literal, overload

import torch
from torch import Tensor

from meg.channel.awgn import AWGN, as_complex
from meg.errors import InvalidInputError

__all__ = ["FlatFading", "expand_blocks"]


def expand_blocks(block_gains: Tensor, num_symbols: int, block_length: int | None) -> Tensor:
    """Lay out per-block gains over ``num_symbols`` symbols.

    Args:
        block_gains: ``[..., num_blocks]`` complex gains, ``num_blocks = ceil(N / L)``
            (``1`` when ``block_length`` is ``None``).
        num_symbols: ``N``, the length of the last axis of the signal.
        block_length: ``L`` symbols per gain; ``None``: one gain for the whole last axis.

    Returns:
        ``[..., N]`` gains (a broadcast view for ``None`` and ``L == 1``, no copy).
    """
    if block_length is None:
        return block_gains.expand(*block_gains.shape[:-1], num_symbols)
    if block_length == 1:
        return block_gains
    return block_gains.repeat_interleave(block_length, dim=-1)[..., :num_symbols]


class FlatFading(ABC):
    """Base of the flat-fading channels: gains in coherence blocks, then AWGN.

    Args:
        block_length: symbols per independent gain along the last axis: ``1`` is fast
            fading (one gain per symbol), ``L > 1`` block fading, ``None`` one gain per
            example (the whole last axis is one block).
    """

    def __init__(self, block_length: int | None = 1) -> None:
        if block_length is not None and (isinstance(block_length, bool) or int(block_length) != block_length or block_length < 1):
            raise InvalidInputError(f"block_length must be a positive integer or None, got {block_length!r}")
        self.block_length = None if block_length is None else int(block_length)
        self._awgn = AWGN()

    @abstractmethod
    def _draw(
        self, shape: tuple[int, ...], *, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device | str | None
    ) -> Tensor:
        """Draw independent gains of ``shape`` (one per block); subclasses define the law."""

    def sample_gains(
        self,
        shape: tuple[int, ...] | torch.Size,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.complex64,
        device: torch.device | str | None = None,
    ) -> Tensor:
        """Draw a gain realisation for a signal of ``shape`` (``[..., N]``), laid out in blocks.

        Returns:
            ``[..., N]`` complex gains with ``E|h|^2 = 1``.
        """
        shape = tuple(shape)
        if not shape:
            return self._draw((), generator=generator, dtype=dtype, device=device)
        n = shape[-1]
        blocks = 1 if self.block_length is None else math.ceil(n / self.block_length)
        drawn = self._draw((*shape[:-1], blocks), generator=generator, dtype=dtype, device=device)
        return expand_blocks(drawn, n, self.block_length)

    @overload
    def __call__(
        self, x: Tensor, noise_var: float | Tensor, *, generator: torch.Generator | None = ...,
        return_gains: Literal[False] = ...,
    ) -> Tensor: ...

    @overload
    def __call__(
        self, x: Tensor, noise_var: float | Tensor, *, generator: torch.Generator | None = ...,
        return_gains: Literal[True],
    ) -> tuple[Tensor, Tensor]: ...

    def __call__(
        self,
        x: Tensor,
        noise_var: float | Tensor,
        *,
        generator: torch.Generator | None = None,
        return_gains: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Send ``x`` through the channel: ``y = h ⊙ x + n``.

        Args:
            x: ``[..., N]`` complex symbols (real tensors are taken as ``x + 0j``).
            noise_var: noise power per complex symbol, a float or a tensor broadcastable to
                ``x`` (per example: shape ``[B, 1]``).
            generator: the random source for gains and noise.
            return_gains: also return the gains ``h`` (``[..., N]``), e.g. for equalisation.

        Returns:
            ``y`` (``[..., N]`` complex), or ``(y, h)`` when ``return_gains``.
        """
        x = as_complex(x)
        h = self.sample_gains(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        y = self._awgn(h * x, noise_var, generator=generator)
        return (y, h) if return_gains else y
