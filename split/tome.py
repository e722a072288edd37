"""Token merging (ToMe for SD, Bolya & Hoffman 2023) on the edge UNet, per request.

`tomesd` patches a UNet in place: it swaps the class of every ``BasicTransformerBlock``
and stores the merge ratio in one dict shared by all blocks. Two requests with different
ratios on one UNet would therefore see each other's ratio. `ToMeAdapter.applied` makes
the patch a per-call context instead: it takes a lock owned by the UNet (shared by every
adapter and every other user of that UNet through `unet_lock`), patches with this call's
ratio and generator, runs the caller's block, and removes the patch again, all under the
lock. Requests interleave at the granularity of one context (one UNet call per step in
`meg.split.engine`). Ratio 0 does not patch at all, so it is bit-identical to the
unpatched model; removal restores the original classes, removes the hooks and deletes
tomesd's attributes.

``max_downsample`` decides which resolution levels are merged (1: only the full-latent
level). tomesd's default of 1 suits SD 1.x/2.x, whose first level has attention; SDXL and
`tiny-random` have no attention at full resolution, so a default of 1 would patch blocks
that never merge. `default_max_downsample` picks the first level that has attention.

tomesd's size hook reads ``args[0]`` of the UNet call: call the UNet positionally
(``unet(sample, t, text)``), or pass ``latent_hw`` to `ToMeAdapter.applied`.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import tomesd
import torch

from meg.errors import InvalidInputError

__all__ = ["ToMeAdapter", "ToMeConfig", "default_max_downsample", "is_patched", "object_lock", "unet_lock"]

_LOCKS: weakref.WeakKeyDictionary[Any, threading.RLock] = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def object_lock(obj: Any) -> threading.RLock:
    """The one re-entrant lock of a shared object, whoever holds a reference to it: a UNet
    (patched and unpatched use), or a fast tokenizer (it keeps padding and truncation
    settings as state per call, so two threads calling it at once can swap them)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(obj)
        if lock is None:
            lock = threading.RLock()
            _LOCKS[obj] = lock
        return lock


def unet_lock(unet: torch.nn.Module) -> threading.RLock:
    """The re-entrant lock that serialises patched and unpatched use of ``unet``."""
    return object_lock(unet)


def default_max_downsample(unet: torch.nn.Module) -> int:
    """Downsampling factor (1, 2, 4, …) of the highest-resolution level with attention.

    SD 1.5 → 1, SDXL → 2 (its first level is attention-free), `tiny-random` → 2.
    """
    for level, block in enumerate(getattr(unet, "down_blocks", ())):
        if getattr(block, "has_cross_attention", False) or getattr(block, "attentions", None):
            return 2**level
    return 1


def is_patched(unet: torch.nn.Module) -> bool:
    """Whether any module of ``unet`` is currently a tomesd ``ToMeBlock``."""
    return any(type(m).__name__ == "ToMeBlock" for m in unet.modules())


@dataclass(frozen=True)
class ToMeConfig:
    """ToMe options other than the ratio (the ratio comes with each request)."""

    max_downsample: int | None = None
    """Merge in levels downsampled at most this much; None: `default_max_downsample`."""
    sx: int = 2
    """Horizontal stride of the destination-token grid."""
    sy: int = 2
    """Vertical stride of the destination-token grid."""
    use_rand: bool = True
    """Random destination token in each stride window (drawn from the call's generator)."""
    merge_attn: bool = True
    """Merge tokens before self-attention (the setting ToMe for SD recommends)."""
    merge_crossattn: bool = False
    """Merge before cross-attention."""
    merge_mlp: bool = False
    """Merge before the feed-forward layer."""

    @property
    def max_ratio(self) -> float:
        """Largest mergeable fraction: all but one token per sx×sy window."""
        return 1.0 - 1.0 / (self.sx * self.sy)


class ToMeAdapter:
    """Per-call ToMe on one UNet; safe to share between threads."""

    def __init__(self, unet: torch.nn.Module, config: ToMeConfig = ToMeConfig()) -> None:
        self.unet = unet
        self.config = config
        self.max_downsample = (
            config.max_downsample if config.max_downsample is not None else default_max_downsample(unet)
        )
        self._lock = unet_lock(unet)

    def check_ratio(self, ratio: float) -> float:
        """Return ``ratio`` as float; raise `InvalidInputError` unless 0 ≤ ratio < max."""
        value = float(ratio)
        if not 0.0 <= value < self.config.max_ratio:
            raise InvalidInputError(
                f"tome_ratio {ratio!r} outside [0, {self.config.max_ratio})", field="tome_ratio"
            )
        return value

    @contextmanager
    def applied(
        self,
        ratio: float,
        *,
        generator: Any = None,
        latent_hw: tuple[int, int] | None = None,
    ) -> Iterator[torch.nn.Module]:
        """Hold the UNet, patched with ``ratio`` (unpatched when 0), for one block of work.

        Args:
            ratio: fraction of tokens merged in each patched transformer block.
            generator: draws the random destination tokens (CPU generator, or a
                `meg.split.batching.RowGenerators` for a batched call); None forks the
                global RNG (tomesd's behaviour), so pass one for reproducible output.
            latent_hw: latent (h, w) of the work; needed when the UNet is not called
                through its ``forward`` (block-level execution skips tomesd's size hook).
        """
        ratio = self.check_ratio(ratio)
        with self._lock:
            if ratio == 0.0:
                yield self.unet
                return
            c = self.config
            tomesd.apply_patch(
                self.unet,
                ratio=ratio,
                max_downsample=self.max_downsample,
                sx=c.sx,
                sy=c.sy,
                use_rand=c.use_rand,
                merge_attn=c.merge_attn,
                merge_crossattn=c.merge_crossattn,
                merge_mlp=c.merge_mlp,
            )
            try:
                info: dict[str, Any] = self.unet._tome_info  # type: ignore[assignment]
                if generator is not None:
                    info["args"]["generator"] = generator
                if latent_hw is not None:
                    info["size"] = tuple(latent_hw)
                yield self.unet
            finally:
                remove(self.unet)


def remove(unet: torch.nn.Module) -> None:
    """Undo a tomesd patch completely: classes, hooks and the ``_tome_info`` attributes."""
    tomesd.remove_patch(unet)
    for module in unet.modules():
        if "_tome_info" in module.__dict__:
            del module.__dict__["_tome_info"]
