"""Bit-packing, quantisation parameters and the accounting helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from meg.codecs import bits_per_element, encode, evaluate_chain, mse, psnr_db, ratio_vs
from meg.codecs.quant import QuantParams, dequantize, pack_bits, packed_bytes, quantize, unpack_bits
from meg.errors import CodecError, CorruptPayloadError, InvalidInputError


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), data=st.data())
def test_pack_unpack_round_trip_uses_exactly_k_bits(bits: int, data: st.DataObject) -> None:
    codes = np.array(data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=70)), dtype=np.uint8)
    packed = pack_bits(codes, bits)
    assert len(packed) == packed_bytes(codes.size, bits) == math.ceil(codes.size * bits / 8)
    assert np.array_equal(unpack_bits(packed, bits, codes.size), codes)


def test_packing_is_lsb_first() -> None:
    assert pack_bits(np.array([1, 2, 3, 0], dtype=np.uint8), 2) == bytes([0b00111001])
    assert pack_bits(np.array([5, 1], dtype=np.uint8), 3) == bytes([0b00001101])


def test_unpack_rejects_wrong_sizes_and_padding() -> None:
    with pytest.raises(CorruptPayloadError, match="3 bytes, expected 2 for 5 3-bit codes"):
        unpack_bits(bytes(3), 3, 5)
    with pytest.raises(CorruptPayloadError, match="padding"):
        unpack_bits(bytes([0xFF, 0xFF]), 3, 5)
    with pytest.raises(CodecError, match="bits 9 outside"):
        pack_bits(np.zeros(3, dtype=np.uint8), 9)


def test_quant_params_reject_impossible_values() -> None:
    good = QuantParams(lo=torch.tensor([0.0, 1.0]), scale=torch.tensor([0.5, 0.0]))
    assert QuantParams.from_bytes(good.to_bytes(), 2).scale.equal(good.scale)
    for lo, scale in ((float("nan"), 1.0), (0.0, -1.0), (0.0, float("inf"))):
        raw = QuantParams(lo=torch.tensor([lo]), scale=torch.tensor([scale])).to_bytes()
        with pytest.raises(CorruptPayloadError, match="non-finite value or a negative scale"):
            QuantParams.from_bytes(raw, 1)
    with pytest.raises(CorruptPayloadError, match="7 bytes, expected 8"):
        QuantParams.from_bytes(bytes(7), 1)


def test_top_of_the_range_maps_inside_the_codes() -> None:
    # a range whose step is not exact in float32: the maximum must still reach code 255
    x = torch.tensor([0.0, 0.1, 0.7, 1.0 / 3.0]).reshape(1, 1, 4)
    codes, params = quantize(x, 8)
    assert int(codes.max()) == 255 and int(codes.min()) == 0
    assert float(params.lo[0] + 255 * params.scale[0]) >= float(x.max())
    assert (dequantize(codes, params) - x).abs().max() <= params.scale[0] / 2 + 1e-7


def test_quantize_rejects_a_range_beyond_float32() -> None:
    with pytest.raises(CodecError, match="exceeds float32"):
        quantize(torch.tensor([-3e38, 3e38]), 8)


def test_accounting_helpers() -> None:
    tensor = torch.linspace(-1, 1, 256).reshape(1, 4, 8, 8)
    encoded = encode(tensor, "int8")
    # 8 bits per element plus 8 bytes of (lo, scale) per channel
    assert bits_per_element(encoded) == (8 * 256 + 64 * 4) / 256
    assert ratio_vs(encoded, 16) == pytest.approx(16 / bits_per_element(encoded))
    assert ratio_vs(encoded, 32) == pytest.approx(2 * ratio_vs(encoded, 16))
    report = evaluate_chain(tensor, "int8")
    assert report.chain == "int8" and report.params_bytes == 32 and report.payload_bytes == 256
    assert report.max_abs_error <= (2 / 255) / 2 + 1e-6
    assert report.psnr_db > 48  # uniform error of step/2 over a range of 255 steps: ≈ 59 dB
    exact = evaluate_chain(tensor, "zstd")
    assert exact.mse == 0.0 and exact.psnr_db == math.inf


def test_psnr_over_the_reference_range() -> None:
    reference = torch.tensor([-1.0, 1.0, 0.0, 0.0])
    decoded = reference + torch.tensor([0.1, -0.1, 0.1, -0.1])
    assert mse(reference, decoded) == pytest.approx(0.01)
    assert psnr_db(reference, decoded) == pytest.approx(10 * math.log10(4 / 0.01))
    assert psnr_db(torch.ones(3), torch.zeros(3)) == -math.inf
    with pytest.raises(InvalidInputError, match=r"reference \(4,\), decoded \(2,\)"):
        mse(reference, reference[:2])
