"""Split points: where the stage sequence text-encode → steps 1…N → decode is cut.

=========  =====================================================  =======================
text       edge (ES) runs                                         device (UE) runs
=========  =====================================================  =======================
device     nothing                                                everything
step:K     text-encode, denoising steps 1…K                       steps K+1…N, decode
decoder    text-encode, all steps                                 decode (MEG)
image      everything                                             nothing (shows image)
unet:B     text-encode, UNet blocks 0…B-1 of step 1               rest of step 1, steps
                                                                  2…N, decode
=========  =====================================================  =======================

``step:K`` needs 1 ≤ K < N. ``unet:B`` needs 1 ≤ B < the UNet's block count (see
`meg.split.unet_stages.unet_block_names`); both are checked by `SplitPoint.validate`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from meg.errors import SplitError

__all__ = ["SPLIT_KINDS", "SplitPoint"]

SplitKind = Literal["device", "step", "decoder", "image", "unet"]
SPLIT_KINDS: tuple[SplitKind, ...] = ("device", "step", "decoder", "image", "unet")
_INDEXED = ("step", "unet")
_PATTERN = re.compile(r"^(device|decoder|image)$|^(step|unet):([0-9]+)$")


@dataclass(frozen=True)
class SplitPoint:
    """One cut of the pipeline. ``index`` is K for ``step``, B for ``unet``, else 0."""

    kind: SplitKind
    index: int = 0

    def __post_init__(self) -> None:
        if self.kind not in SPLIT_KINDS:
            raise SplitError(f"unknown split kind {self.kind!r}; expected one of {SPLIT_KINDS}")
        if self.kind in _INDEXED and self.index < 1:
            raise SplitError(f"split {self.kind}:{self.index} needs an index >= 1")
        if self.kind not in _INDEXED and self.index != 0:
            raise SplitError(f"split {self.kind!r} takes no index (got {self.index})")

    @classmethod
    def parse(cls, text: str) -> SplitPoint:
        """Parse ``device``, ``step:K``, ``decoder``, ``image`` or ``unet:B``."""
        match = _PATTERN.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            raise SplitError(
                f"unknown split point {text!r}; expected device, step:K, decoder, image or unet:B",
                field="split",
            )
        if match.group(1):
            return cls(match.group(1))  # type: ignore[arg-type]
        try:
            return cls(match.group(2), int(match.group(3)))  # type: ignore[arg-type]
        except SplitError as exc:
            raise SplitError(f"bad split point {text!r}: {exc.message}", field="split") from exc

    def __str__(self) -> str:
        return f"{self.kind}:{self.index}" if self.kind in _INDEXED else self.kind

    def validate(self, *, steps: int, unet_blocks: int) -> None:
        """Raise `SplitError` if this point does not exist for ``steps`` and a UNet of
        ``unet_blocks`` blocks (`step:K` needs K < steps, `unet:B` needs B < unet_blocks)."""
        if self.kind == "step" and not 1 <= self.index < steps:
            raise SplitError(f"split {self} needs 1 <= K < steps={steps}", field="split")
        if self.kind == "unet" and not 1 <= self.index < unet_blocks:
            raise SplitError(
                f"split {self} needs 1 <= B < {unet_blocks} (UNet block count)", field="split"
            )

    @property
    def edge_runs_steps(self) -> bool:
        """Whether the edge runs at least part of a denoising step."""
        return self.kind in ("step", "decoder", "image", "unet")
