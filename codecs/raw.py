"""Raw tensor bytes: the supported dtypes and their little-endian row-major layout."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
from torch import Tensor

from meg.errors import CorruptPayloadError

__all__ = ["SUPPORTED_DTYPES", "all_finite", "numel", "tensor_from_bytes", "tensor_to_bytes"]

SUPPORTED_DTYPES: tuple[torch.dtype, ...] = (
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.uint8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.bool,
)

# The wire is little-endian; torch stores tensors in host order.
if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
    raise ImportError("meg.codecs needs a little-endian host")


def numel(shape: tuple[int, ...]) -> int:
    """Number of elements of ``shape`` (1 for a scalar)."""
    return math.prod(shape)


def all_finite(tensor: Tensor) -> bool:
    """True if a float tensor holds no NaN/±Inf (empty: True).

    min and max propagate NaN and expose infinities, and two reductions cost far less than
    materialising an elementwise ``isfinite`` mask.
    """
    if tensor.numel() == 0:
        return True
    return bool(torch.isfinite(tensor.amin())) and bool(torch.isfinite(tensor.amax()))


def tensor_to_bytes(tensor: Tensor) -> bytes:
    """Row-major little-endian bytes of ``tensor`` (any supported dtype, any shape)."""
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def tensor_from_bytes(data: bytes | bytearray | memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`tensor_to_bytes`; returns a tensor that owns its memory.

    Raises:
        CorruptPayloadError: the byte count does not match ``shape`` × itemsize, or a bool
            tensor holds a byte other than 0 or 1.
    """
    itemsize = torch.empty(0, dtype=dtype).element_size()
    expected = numel(shape) * itemsize
    if len(data) != expected:
        raise CorruptPayloadError(
            f"payload is {len(data)} bytes, expected {expected} for {dtype} {tuple(shape)}",
            field="encoded_bytes",
        )
    if expected == 0:
        return torch.empty(shape, dtype=dtype)
    raw = np.frombuffer(data, dtype=np.uint8)
    if dtype == torch.bool and raw.max() > 1:
        raise CorruptPayloadError(f"bool payload holds byte value {int(raw.max())}", field="encoded_bytes")
    return torch.from_numpy(raw.copy()).view(dtype).reshape(shape)
