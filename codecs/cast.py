"""Cast codec: float32 ⇄ float16 / bfloat16."""

from __future__ import annotations

import torch
from torch import Tensor

from meg.codecs.raw import all_finite
from meg.errors import CodecError

__all__ = ["CAST_DTYPES", "cast_down", "cast_up"]

CAST_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16}


def cast_down(tensor: Tensor, name: str) -> Tensor:
    """Round a float tensor to ``name`` ("fp16" or "bf16"), same shape.

    Raises:
        CodecError: a value beyond the target's range (it would arrive as infinity).
    """
    target = CAST_DTYPES[name]
    if not tensor.is_floating_point():
        raise CodecError(f"cast to {name} needs a floating-point tensor, got {tensor.dtype}")
    out = tensor.to(target)
    if tensor.dtype != target and not all_finite(out):
        # a finite value that became infinite overflowed (non-finite inputs stay as they are)
        overflow = out.isinf() & tensor.isfinite()
        if bool(overflow.any()):
            peak = float(tensor[overflow].abs().max())
            limit = float(torch.finfo(target).max)
            raise CodecError(f"value {peak:g} exceeds the {name} range ±{limit:g}")
    return out


def cast_up(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    """Back to the decoded dtype (exact: every fp16/bf16 value is representable in fp32)."""
    return tensor.to(dtype)
