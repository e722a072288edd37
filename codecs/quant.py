"""Uniform k-bit quantisation (k = 2…8), per-channel affine, with bit-packing.

Channel c of a tensor ``[B, C, ...]`` (dim 1; a tensor of rank < 2 is one channel) maps
``[lo_c, hi_c]`` onto the integers ``0 … 2^k − 1``:

    q = round((x − lo_c) / scale_c),  scale_c = (hi_c − lo_c) / (2^k − 1)
    x̂ = lo_c + q · scale_c                      so |x − x̂| ≤ scale_c / 2

``scale`` is rounded up to float32, so the largest value still maps inside the range.
Stochastic rounding replaces round(v) by floor(v + u), u ~ U[0, 1) from an explicit
generator (unbiased: E[x̂] = x). lo and scale travel as float32 side information (8 bytes
per channel); the codes are packed LSB-first, 8 codes into k bytes, so exactly
ceil(n·k / 8) bytes are sent.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from meg.errors import CodecError, CorruptPayloadError

__all__ = [
    "QuantParams",
    "channel_count",
    "dequantize",
    "pack_bits",
    "packed_bytes",
    "quantize",
    "unpack_bits",
]

MIN_BITS, MAX_BITS = 2, 8
_FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class QuantParams:
    """Per-channel affine parameters.

    Attributes:
        lo: ``[C]`` float32, the value of code 0.
        scale: ``[C]`` float32 ≥ 0, the step between codes (0 for a constant channel).
    """

    lo: Tensor
    scale: Tensor

    def to_bytes(self) -> bytes:
        """lo[0..C) then scale[0..C), float32 little-endian: 8·C bytes."""
        return np.concatenate([self.lo.numpy(), self.scale.numpy()]).astype("<f4").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, channels: int, *, levels: int = 0, max_abs: float = np.inf) -> QuantParams:
        """Read 8·C bytes, checking that every lo is finite and every scale finite and ≥ 0,
        and that ``lo`` and ``lo + levels·scale`` stay within ±``max_abs`` (the decoded dtype).

        Raises:
            CorruptPayloadError: wrong length or an impossible value.
        """
        if len(data) != 8 * channels:
            raise CorruptPayloadError(
                f"quantisation parameters are {len(data)} bytes, expected {8 * channels} "
                f"for {channels} channels",
                field="codec_params",
            )
        values = np.frombuffer(data, dtype="<f4").astype(np.float32)
        lo, scale = values[:channels], values[channels:]
        if not (np.isfinite(values).all() and (scale >= 0).all()):
            raise CorruptPayloadError(
                "quantisation parameters hold a non-finite value or a negative scale",
                field="codec_params",
            )
        top = lo.astype(np.float64) + levels * scale.astype(np.float64)
        reach = float(max(np.abs(top).max(initial=0.0), np.abs(lo).max(initial=0.0)))
        if reach > max_abs:
            raise CorruptPayloadError(
                f"quantisation parameters reach {reach:g}, beyond the decoded range ±{max_abs:g}",
                field="codec_params",
            )
        return cls(lo=torch.from_numpy(lo.copy()), scale=torch.from_numpy(scale.copy()))


def _check_bits(bits: int) -> None:
    if not MIN_BITS <= bits <= MAX_BITS:
        raise CodecError(f"quantisation bits {bits} outside {MIN_BITS}..{MAX_BITS}", field="codec_chain")


def channel_count(shape: tuple[int, ...]) -> int:
    """C = shape[1] for rank ≥ 2, else 1."""
    return int(shape[1]) if len(shape) >= 2 else 1


def _by_channel(tensor: Tensor) -> Tensor:
    """``[B, C, rest]`` view (``[1, 1, n]`` below rank 2)."""
    if tensor.dim() < 2:
        return tensor.reshape(1, 1, -1)
    rest = 1
    for d in tensor.shape[2:]:
        rest *= d
    return tensor.reshape(tensor.shape[0], tensor.shape[1], rest)


def quantize(tensor: Tensor, bits: int, *, generator: torch.Generator | None = None) -> tuple[Tensor, QuantParams]:
    """Quantise a finite float tensor to ``bits``-bit codes per channel.

    Args:
        tensor: float tensor ``[B, C, ...]`` (any rank), finite values.
        bits: k in 2..8.
        generator: if given, stochastic rounding with this generator; else round to nearest.
    Returns:
        (codes, params): ``codes`` uint8 with the tensor's shape, values in 0..2^k − 1.
    Raises:
        CodecError: bits out of range, a non-float tensor, or a channel whose range
            exceeds float32.
    """
    _check_bits(bits)
    if not tensor.is_floating_point():
        raise CodecError(f"quantisation needs a floating-point tensor, got {tensor.dtype}")
    levels = (1 << bits) - 1
    x = _by_channel(tensor.detach().to(torch.float32))
    channels = x.shape[1]
    if x.numel() == 0:
        empty = torch.zeros(channels, dtype=torch.float32)
        return torch.zeros(tensor.shape, dtype=torch.uint8), QuantParams(lo=empty, scale=empty.clone())
    lo = x.amin(dim=(0, 2))
    hi = x.amax(dim=(0, 2))
    span = hi.double() - lo.double()
    if float(span.max()) > _FLOAT32_MAX:
        raise CodecError(
            f"channel value range {float(span.max()):g} exceeds float32; cannot quantise to {bits} bits"
        )
    scale64 = span / levels
    scale = scale64.float()
    # round the step up so that (hi − lo) / scale ≤ levels in float32 too
    scale = torch.where(scale.double() < scale64, torch.nextafter(scale, torch.full_like(scale, np.inf)), scale)
    step = torch.where(scale > 0, scale, torch.ones_like(scale)).view(1, -1, 1)
    v = x.sub(lo.view(1, -1, 1)).div_(step)
    if generator is None:
        v.round_()
    else:
        v.add_(torch.rand(v.shape, generator=generator, dtype=torch.float32)).floor_()
    codes = v.clamp_(0, levels).to(torch.uint8).reshape(tensor.shape)
    return codes, QuantParams(lo=lo.contiguous(), scale=scale.contiguous())


def dequantize(codes: Tensor, params: QuantParams, dtype: torch.dtype = torch.float32) -> Tensor:
    """x̂ = lo_c + q · scale_c, computed in float32, returned as ``dtype`` with the codes' shape."""
    q = _by_channel(codes).to(torch.float32)
    out = q.mul_(params.scale.view(1, -1, 1)).add_(params.lo.view(1, -1, 1)).reshape(codes.shape)
    return out if dtype == torch.float32 else out.to(dtype)


def packed_bytes(count: int, bits: int) -> int:
    """Bytes that hold ``count`` codes of ``bits`` bits: ceil(count·bits / 8)."""
    return (count * bits + 7) // 8


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Pack uint8 codes (< 2^bits) LSB-first: every 8 codes become ``bits`` bytes.

    Args:
        codes: 1-D uint8 array.
    Returns:
        exactly ``packed_bytes(len(codes), bits)`` bytes.
    """
    _check_bits(bits)
    count = codes.size
    if bits == 8:
        return codes.tobytes()
    groups = -(-count // 8)
    padded = np.zeros(groups * 8, dtype=np.uint64)
    padded[:count] = codes
    lanes = padded.reshape(groups, 8)
    word = lanes[:, 0].copy()
    for i in range(1, 8):
        word |= lanes[:, i] << np.uint64(bits * i)
    out = word.astype("<u8").view(np.uint8).reshape(groups, 8)[:, :bits]
    return out.tobytes()[: packed_bytes(count, bits)]


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits` → 1-D uint8 array of ``count`` codes.

    Raises:
        CorruptPayloadError: wrong byte count or non-zero padding bits.
    """
    _check_bits(bits)
    expected = packed_bytes(count, bits)
    if len(data) != expected:
        raise CorruptPayloadError(
            f"packed payload is {len(data)} bytes, expected {expected} for {count} {bits}-bit codes",
            field="encoded_bytes",
        )
    raw = np.frombuffer(data, dtype=np.uint8)
    if bits == 8:
        return raw.copy()
    groups = -(-count // 8)
    lanes = np.zeros((groups, 8), dtype=np.uint8)
    flat = np.zeros(groups * bits, dtype=np.uint8)
    flat[: raw.size] = raw
    lanes[:, :bits] = flat.reshape(groups, bits)
    word = lanes.view("<u8").reshape(groups)
    mask = np.uint64((1 << bits) - 1)
    lanes_out = np.empty((groups, 8), dtype=np.uint8)
    for i in range(8):
        lanes_out[:, i] = (word >> np.uint64(bits * i)) & mask
    codes = lanes_out.reshape(-1)
    if codes[count:].any():
        raise CorruptPayloadError("packed payload has non-zero padding bits", field="encoded_bytes")
    return codes[:count]
