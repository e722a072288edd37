"""Codec chains: parsing, round trips, error bounds, bad input and corrupted payloads."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meg.codecs import CodecChain, EncodedTensor, MergedLatent, decode, encode, parse_chain
from meg.codecs.chain import CastStage, MergeStage, QuantStage, ZstdStage
from meg.codecs.quant import QuantParams
from meg.codecs.raw import tensor_to_bytes
from meg.errors import CodecError, InvalidInputError, NonFiniteError

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _latent(shape: tuple[int, ...] = (1, 4, 16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --- parsing --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "canonical", "stages"),
    [
        ("none", "none", ()),
        ("zstd", "zstd:3", (ZstdStage(3),)),
        ("fp16,zstd", "fp16,zstd:3", (CastStage("fp16"), ZstdStage(3))),
        ("bf16,zstd:19:shuffle", "bf16,zstd:19:shuffle", (CastStage("bf16"), ZstdStage(19, shuffle=True))),
        ("zstd:shuffle", "zstd:3:shuffle", (ZstdStage(3, shuffle=True),)),
        ("merge:0.5,int8,zstd:3", "merge:0.5,int8,zstd:3", (MergeStage(0.5), QuantStage(8), ZstdStage(3))),
        ("merge:.25:g2,int4:sr", "merge:0.25:g2,int4:sr", (MergeStage(0.25, 2), QuantStage(4, stochastic=True))),
        (" merge:0.75 , int2 ", "merge:0.75,int2", (MergeStage(0.75), QuantStage(2))),
        ("merge:0", "merge:0.0", (MergeStage(0.0),)),
    ],
)
def test_parse_valid_chains(spec: str, canonical: str, stages: tuple) -> None:
    chain = parse_chain(spec)
    assert chain.stages == stages
    assert chain.spec == canonical
    assert parse_chain(chain.spec) == chain
    assert chain.lossless == all(isinstance(s, ZstdStage) for s in stages)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty stage"),
        ("int8,,zstd", "empty stage"),
        ("gzip", "unknown codec stage 'gzip'"),
        ("int9", "bits 9 outside 2..8"),
        ("int1", "bits 1 outside 2..8"),
        ("int8:rr", "expected int8 or int8:sr"),
        ("merge", "expected merge:RATIO"),
        ("merge:0.8", "merge ratio 0.8 outside"),
        ("merge:-0.1", "expected merge:RATIO"),
        ("merge:nan", "expected merge:RATIO"),
        ("merge:0.5:x", "grouping"),
        ("zstd:0", "level 0 outside 1..22"),
        ("zstd:23", "level 23 outside 1..22"),
        ("zstd:fast", "expected zstd"),
        ("fp16:2", "fp16 takes no arguments"),
        ("zstd,int8", "'int8' is out of order"),
        ("int8,fp16", "'fp16' is out of order"),
        ("zstd,zstd", "out of order or repeated"),
        ("int8,merge:0.5", "'merge:0.5' is out of order"),
        ("none,zstd", "'none' cannot be combined"),
    ],
)
def test_parse_rejects_malformed_chains(spec: str, message: str) -> None:
    with pytest.raises(CodecError, match=message) as info:
        parse_chain(spec)
    assert info.value.field == "codec_chain"


def test_chain_object_is_accepted_and_non_strings_rejected() -> None:
    chain = parse_chain("int8")
    assert parse_chain(chain) is chain
    assert encode(_latent(), chain).chain == "int8"
    with pytest.raises(CodecError, match="must be a string"):
        parse_chain(8)  # type: ignore[arg-type]


# --- lossless chains ------------------------------------------------------------------


@st.composite
def float_tensors(draw: st.DrawFn, dtype: torch.dtype | None = None, rank_min: int = 0) -> torch.Tensor:
    dtype = dtype or draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=rank_min, max_size=4)))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@SETTINGS
@given(
    tensor=float_tensors() | st.builds(lambda n: torch.arange(n, dtype=torch.int64) - 7, st.integers(0, 50)),
    chain=st.sampled_from(["none", "zstd:1", "zstd:3:shuffle", "zstd:9"]),
)
def test_lossless_chains_are_bit_exact(tensor: torch.Tensor, chain: str) -> None:
    encoded = encode(tensor, chain)
    assert parse_chain(encoded.chain).lossless
    out = decode(encoded)
    assert out.dtype == tensor.dtype and out.shape == tensor.shape
    assert tensor_to_bytes(out) == tensor_to_bytes(tensor)


def test_shuffle_sends_one_frame_per_byte_plane_and_helps_fp16() -> None:
    # a smooth fp16 field: high bytes repeat, low bytes vary
    grid = torch.linspace(0, 6, 128)
    smooth = (torch.sin(grid)[:, None] * torch.cos(grid)[None, :]).expand(1, 4, 128, 128).half().contiguous()
    plain, shuffled = encode(smooth, "zstd:3"), encode(smooth, "zstd:3:shuffle")
    assert len(shuffled.params) == 4  # the first plane's length; the second takes the rest
    assert shuffled.bits_on_wire < plain.bits_on_wire
    assert decode(shuffled).equal(smooth)


# --- lossy chains: stated error bounds ---------------------------------------------------


@SETTINGS
@given(tensor=float_tensors(dtype=torch.float32, rank_min=2), bits=st.integers(2, 8), zstd=st.booleans())
def test_int_k_error_is_at_most_half_a_step_per_channel(tensor: torch.Tensor, bits: int, zstd: bool) -> None:
    encoded = encode(tensor, f"int{bits}" + (",zstd" if zstd else ""))
    channels = tensor.shape[1]
    params = QuantParams.from_bytes(encoded.params[: 8 * channels], channels)
    out = decode(encoded)
    error = (out - tensor).abs().transpose(0, 1).reshape(channels, -1).amax(dim=1)
    # half a step, plus float32 rounding of lo + q·scale
    bound = params.scale / 2 + 4 * torch.finfo(torch.float32).eps * tensor.abs().amax()
    assert torch.all(error <= bound), (error, bound)
    if not zstd:  # exactly k bits per element are sent, plus 8 bytes per channel
        assert len(encoded.payload) == math.ceil(tensor.numel() * bits / 8)
        assert encoded.bits_on_wire == 8 * math.ceil(tensor.numel() * bits / 8) + 64 * channels


def test_int8_example_and_constant_channel() -> None:
    tensor = torch.stack([torch.linspace(-1, 1, 64), torch.full((64,), 3.5)]).reshape(1, 2, 8, 8)
    out = decode(encode(tensor, "int8"))
    assert (out[0, 0] - tensor[0, 0]).abs().max() <= (2 / 255) / 2 + 1e-6
    assert out[0, 1].equal(tensor[0, 1])  # a constant channel is exact


def test_stochastic_rounding_is_unbiased_and_needs_a_generator() -> None:
    # 0.3 of a step above a code: nearest rounding always rounds down, stochastic is unbiased
    tensor = torch.cat([torch.zeros(1), torch.full((20000,), 0.3 / 3), torch.ones(1)]).reshape(1, 1, -1)
    nearest = decode(encode(tensor, "int2"))
    sr = decode(encode(tensor, "int2:sr", generator=torch.Generator().manual_seed(0)))
    assert nearest[0, 0, 1:-1].eq(0).all()
    assert abs(float(sr[0, 0, 1:-1].mean()) - 0.1) < 0.01
    again = decode(encode(tensor, "int2:sr", generator=torch.Generator().manual_seed(0)))
    assert again.equal(sr)
    with pytest.raises(CodecError, match="int2:sr needs an explicit generator"):
        encode(tensor, "int2:sr")


@pytest.mark.parametrize("cast", ["fp16", "bf16"])
def test_cast_error_is_within_half_an_ulp(cast: str) -> None:
    tensor = _latent((2, 4, 8, 8)) * 10
    out = decode(encode(tensor, f"{cast},zstd"))
    assert out.dtype == torch.float32
    target = torch.float16 if cast == "fp16" else torch.bfloat16
    relative = ((out - tensor).abs() / tensor.abs().clamp_min(1e-3)).max()
    assert relative <= torch.finfo(target).eps / 2 + 1e-7
    assert encode(tensor, cast).bits_on_wire == 16 * tensor.numel()


def test_fp16_overflow_is_rejected() -> None:
    with pytest.raises(CodecError, match="value 70000 exceeds the fp16 range"):
        encode(torch.tensor([1.0, 70000.0]), "fp16")


# --- bad input --------------------------------------------------------------------------


def test_non_finite_values_follow_the_nan_policy() -> None:
    tensor = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0]])
    with pytest.raises(NonFiniteError, match="2 non-finite values"):
        encode(tensor, "int8")
    out = decode(encode(tensor, "none", nan_policy="zero"))
    assert out.equal(torch.tensor([[1.0, 0.0], [0.0, -2.0]]))
    kept = decode(encode(tensor.half(), "fp16,zstd:3:shuffle", nan_policy="keep"))
    assert tensor_to_bytes(kept) == tensor_to_bytes(tensor.half())
    kept32 = decode(encode(tensor, "bf16", nan_policy="keep"))
    assert kept32[0, 1].isnan() and kept32[1, 0] == float("inf")
    with pytest.raises(NonFiniteError, match="chain 'int8' cannot carry them"):
        encode(tensor, "int8", nan_policy="keep")
    with pytest.raises(NonFiniteError, match="cannot carry them"):
        encode(tensor.reshape(1, 1, 1, 4), "merge:0.5", nan_policy="keep")
    with pytest.raises(InvalidInputError, match="nan_policy 'drop'") as info:
        encode(tensor, "none", nan_policy="drop")  # type: ignore[arg-type]
    assert info.value.field == "nan_policy"


def test_chain_that_cannot_carry_the_tensor() -> None:
    with pytest.raises(CodecError, match="needs a floating-point tensor, got torch.int32"):
        encode(torch.arange(8, dtype=torch.int32), "int8")
    with pytest.raises(CodecError, match=r"latent \[B, C, H, W\], got shape \(4, 16\)"):
        encode(torch.zeros(4, 16), "merge:0.5")
    with pytest.raises(CodecError, match="width 6 .* not a multiple of grouping 4"):
        encode(torch.zeros(1, 4, 8, 6), "merge:0.5")
    with pytest.raises(CodecError, match="complex64"):
        encode(torch.zeros(2, dtype=torch.complex64), "none")


# --- merge inside chains ------------------------------------------------------------------


def test_merge_chain_decodes_to_latent_or_merged_tokens() -> None:
    latent = _latent((2, 4, 16, 16))
    encoded = encode(latent, "merge:0.5,fp16", generator=torch.Generator().manual_seed(1))
    merged = decode(encoded, unmerge=False)
    assert isinstance(merged, MergedLatent)
    assert merged.tokens.shape == (2, 32, 16) and merged.gather_index.shape == (2, 64)
    assert merged.latent_shape == (2, 4, 16, 16) and merged.grouping == 4
    full = decode(encoded)
    assert isinstance(full, torch.Tensor) and full.shape == latent.shape
    from meg.codecs import unmerge_latent

    assert full.equal(unmerge_latent(merged.tokens, merged.gather_index, merged.latent_shape))
    # without a merge stage, unmerge=False still returns a plain tensor
    assert isinstance(decode(encode(latent, "int8"), unmerge=False), torch.Tensor)


def test_merge_ratio_zero_chain_is_exact() -> None:
    latent = _latent()
    assert decode(encode(latent, "merge:0", generator=torch.Generator().manual_seed(0))).equal(latent)


def test_merge_int8_zstd_beats_fp16_by_3_5x_with_indices_counted() -> None:
    """4×32×32 latent, MEG ratio 0.5: every byte counted, side information included."""
    latent = _latent((1, 4, 32, 32), seed=3)
    encoded = encode(latent, "merge:0.5,int8,zstd", generator=torch.Generator().manual_seed(0))
    fp16_bits = 16 * latent.numel()
    assert encoded.bits_on_wire == 8 * (len(encoded.payload) + len(encoded.params))
    # 1 mode byte + 2 bits per cell + 192-bit merge mask + 128 × 6-bit destinations,
    # then 4 channels × (lo, scale) float32
    assert len(encoded.params) == 1 + (64 * 2 + 192 + 128 * 6) // 8 + 32
    assert fp16_bits / encoded.bits_on_wire >= 3.5
    out = decode(encoded)
    assert out.shape == latent.shape


# --- corrupted payloads never crash a decoder ------------------------------------------

CHAINS = [
    "none", "zstd", "zstd:1:shuffle", "fp16", "bf16,zstd:3:shuffle", "int8", "int3", "int5,zstd",
    "int8,zstd:3", "merge:0.5", "merge:0.5,int8,zstd", "merge:0.75,int4", "merge:0.25,fp16,zstd:3:shuffle",
]


@SETTINGS
@given(chain=st.sampled_from(CHAINS), data=st.data())
def test_corrupted_payloads_and_params_raise_codec_errors_or_decode(chain: str, data: st.DataObject) -> None:
    latent = _latent((1, 4, 8, 8), seed=data.draw(st.integers(0, 5)))
    encoded = encode(latent, chain, generator=torch.Generator().manual_seed(0))

    def mutate(raw: bytes) -> bytes:
        kind = data.draw(st.sampled_from(["flip", "truncate", "extend", "replace"]))
        if kind == "flip" and raw:
            pos = data.draw(st.integers(0, len(raw) - 1))
            return raw[:pos] + bytes([raw[pos] ^ data.draw(st.integers(1, 255))]) + raw[pos + 1 :]
        if kind == "truncate":
            return raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]
        if kind == "extend":
            return raw + data.draw(st.binary(min_size=1, max_size=8))
        return data.draw(st.binary(max_size=len(raw) + 4))

    target = data.draw(st.sampled_from(["payload", "params", "both"]))
    corrupted = dataclasses.replace(
        encoded,
        payload=mutate(encoded.payload) if target != "params" else encoded.payload,
        params=mutate(encoded.params) if target != "payload" else encoded.params,
    )
    try:
        out = decode(corrupted)
    except CodecError:
        return
    assert isinstance(out, torch.Tensor) and out.shape == latent.shape and out.dtype == latent.dtype
    merged = decode(corrupted, unmerge=False)
    if isinstance(merged, MergedLatent):
        n_kept = merged.tokens.shape[1]
        assert int(merged.gather_index.min()) >= 0 and int(merged.gather_index.max()) < n_kept


@SETTINGS
@given(
    chain=st.sampled_from(CHAINS),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=5),
    payload=st.binary(max_size=64),
    params=st.binary(max_size=64),
)
def test_arbitrary_bytes_never_crash_a_decoder(chain: str, shape: list[int], payload: bytes, params: bytes) -> None:
    encoded = EncodedTensor(chain=chain, dtype=torch.float32, shape=tuple(shape), payload=payload, params=params)
    try:
        out = decode(encoded)
    except CodecError:
        return
    assert tuple(out.shape) == tuple(shape)


def test_chain_dataclass_defaults() -> None:
    assert CodecChain().spec == "none" and CodecChain().lossless


@pytest.mark.parametrize("shape", [(0,), (0, 0), (2, 0, 3), (0, 4, 8, 8), ()])
@pytest.mark.parametrize("chain", ["none", "zstd", "fp16,zstd:3:shuffle", "int3", "int8,zstd"])
def test_empty_and_scalar_tensors(shape: tuple[int, ...], chain: str) -> None:
    tensor = torch.full(shape, 1.5)
    out = decode(encode(tensor, chain))
    assert out.shape == tensor.shape and out.equal(tensor)
