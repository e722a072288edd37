"""Accounting for encoded tensors: bits per element, compression ratios, distortion."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from meg.codecs.chain import CodecChain, EncodedTensor, decode, encode
from meg.errors import InvalidInputError

__all__ = ["CodecReport", "bits_per_element", "evaluate_chain", "mse", "psnr_db", "ratio_vs"]


def bits_per_element(encoded: EncodedTensor) -> float:
    """Bits on the wire (payload + side information) per element of the decoded tensor."""
    return encoded.bits_on_wire / encoded.numel if encoded.numel else 0.0


def ratio_vs(encoded: EncodedTensor, reference_bits: int) -> float:
    """How many times fewer bits than ``reference_bits`` per element (32: fp32, 16: fp16)."""
    return reference_bits * encoded.numel / encoded.bits_on_wire if encoded.bits_on_wire else math.inf


def _check_pair(reference: Tensor, decoded: Tensor) -> None:
    if reference.shape != decoded.shape:
        raise InvalidInputError(f"shapes differ: reference {tuple(reference.shape)}, decoded {tuple(decoded.shape)}")


def mse(reference: Tensor, decoded: Tensor) -> float:
    """Mean squared error, computed in float64."""
    _check_pair(reference, decoded)
    if reference.numel() == 0:
        return 0.0
    return float((reference.double() - decoded.double()).square().mean())


def psnr_db(reference: Tensor, decoded: Tensor) -> float:
    """PSNR in dB over the reference's range: 10·log10((max − min)² / MSE); inf when exact.

    A constant reference has range 0; its PSNR is inf when exact and −inf otherwise.
    """
    error = mse(reference, decoded)
    if error == 0.0:
        return math.inf
    ref = reference.double()
    peak = float(ref.max() - ref.min()) if ref.numel() else 0.0
    if peak == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak * peak / error)


@dataclass(frozen=True)
class CodecReport:
    """One chain on one tensor.

    Attributes:
        chain: canonical spec.
        payload_bytes: encoded payload.
        params_bytes: side information.
        bits_per_element: all bits on the wire / elements.
        ratio_vs_fp32: 32 / bits_per_element.
        ratio_vs_fp16: 16 / bits_per_element.
        mse: mean squared error of the decoded tensor.
        psnr_db: PSNR over the tensor's range.
        max_abs_error: largest absolute error.
    """

    chain: str
    payload_bytes: int
    params_bytes: int
    bits_per_element: float
    ratio_vs_fp32: float
    ratio_vs_fp16: float
    mse: float
    psnr_db: float
    max_abs_error: float


def evaluate_chain(
    tensor: Tensor, chain: str | CodecChain, *, generator: torch.Generator | None = None
) -> CodecReport:
    """Encode, decode and account one tensor (float tensors for the distortion figures)."""
    encoded = encode(tensor, chain, generator=generator)
    decoded = decode(encoded)
    assert isinstance(decoded, Tensor)
    error = (tensor.double() - decoded.double()).abs()
    return CodecReport(
        chain=encoded.chain,
        payload_bytes=len(encoded.payload),
        params_bytes=len(encoded.params),
        bits_per_element=bits_per_element(encoded),
        ratio_vs_fp32=ratio_vs(encoded, 32),
        ratio_vs_fp16=ratio_vs(encoded, 16),
        mse=mse(tensor, decoded),
        psnr_db=psnr_db(tensor, decoded),
        max_abs_error=float(error.max()) if error.numel() else 0.0,
    )
