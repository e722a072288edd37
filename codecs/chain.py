"""Codec chains: a string spec of stages, encoding to payload + side information.

Grammar (stages separated by commas, in this order, each at most once)::

    none
    [merge:RATIO[:gG]] [fp16 | bf16 | intK[:sr]] [zstd[:LEVEL][:shuffle]]

- ``merge:RATIO`` MEG token merging of a ``[B, C, H, W]`` latent (0 ≤ RATIO ≤ 0.75,
  grouping G row elements per token, default 4). The kept tokens continue as a
  channel-first ``[B, C, M, G]`` tensor so that later stages see the latent's channels.
- ``fp16`` / ``bf16`` cast; ``intK`` uniform per-channel K-bit quantisation (K = 2…8),
  ``:sr`` with stochastic rounding (needs an explicit generator).
- ``zstd`` entropy coding (level 1…22, default 3), ``:shuffle`` one frame per byte plane.

Side information (``EncodedTensor.params``, the header's ``codec_params``) is the
concatenation, in chain order, of the merge plan, the quantisation parameters and the zstd
plane lengths; each part's length follows from the chain, the shape and the merge plan's
mode byte, so the decoder checks every length exactly.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from meg.codecs.cast import CAST_DTYPES, cast_down
from meg.codecs.entropy import zstd_compress, zstd_decompress, zstd_params_bytes
from meg.codecs.merge import (
    MAX_MERGE_RATIO,
    TOKEN_GROUPING,
    MergedLatent,
    TokenGrid,
    gather_index_from_plan,
    merge_count,
    merge_latent_with_plan,
    pack_plan,
    plan_params_bytes,
    unmerge_latent,
    unpack_plan,
)
from meg.codecs.quant import (
    QuantParams,
    channel_count,
    dequantize,
    pack_bits,
    packed_bytes,
    quantize,
    unpack_bits,
)
from meg.codecs.raw import SUPPORTED_DTYPES, all_finite, numel, tensor_from_bytes, tensor_to_bytes
from meg.errors import CodecError, CorruptPayloadError, InvalidInputError, NonFiniteError

__all__ = [
    "CastStage",
    "CodecChain",
    "EncodedTensor",
    "MergeStage",
    "QuantStage",
    "Stage",
    "ZstdStage",
    "decode",
    "encode",
    "parse_chain",
]

NanPolicy = Literal["reject", "zero", "keep"]


@dataclass(frozen=True)
class MergeStage:
    """MEG token merging at ``ratio`` with ``grouping`` row elements per token."""

    ratio: float
    grouping: int = TOKEN_GROUPING

    def __str__(self) -> str:
        suffix = "" if self.grouping == MergeStage.grouping else f":g{self.grouping}"
        return f"merge:{self.ratio!r}{suffix}"


@dataclass(frozen=True)
class CastStage:
    """Cast to a 16-bit float format."""

    name: Literal["fp16", "bf16"]

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class QuantStage:
    """Uniform per-channel quantisation to ``bits`` bits."""

    bits: int
    stochastic: bool = False

    def __str__(self) -> str:
        return f"int{self.bits}" + (":sr" if self.stochastic else "")


@dataclass(frozen=True)
class ZstdStage:
    """zstd at ``level``; ``shuffle`` compresses each byte plane as its own frame."""

    level: int = 3
    shuffle: bool = False

    def __str__(self) -> str:
        return f"zstd:{self.level}" + (":shuffle" if self.shuffle else "")


Stage = MergeStage | CastStage | QuantStage | ZstdStage
_ORDER = {MergeStage: 0, CastStage: 1, QuantStage: 1, ZstdStage: 2}


@dataclass(frozen=True)
class CodecChain:
    """A parsed chain. ``stages`` is empty for ``none``."""

    stages: tuple[Stage, ...] = field(default_factory=tuple)

    @property
    def spec(self) -> str:
        """Canonical text: ``parse_chain(chain.spec) == chain``."""
        return ",".join(str(s) for s in self.stages) or "none"

    @property
    def lossless(self) -> bool:
        """True when decoding returns the input bit-exactly (only zstd or nothing)."""
        return all(isinstance(s, ZstdStage) for s in self.stages)

    @property
    def merge(self) -> MergeStage | None:
        return next((s for s in self.stages if isinstance(s, MergeStage)), None)

    @property
    def value(self) -> CastStage | QuantStage | None:
        return next((s for s in self.stages if isinstance(s, CastStage | QuantStage)), None)

    @property
    def zstd(self) -> ZstdStage | None:
        return next((s for s in self.stages if isinstance(s, ZstdStage)), None)

    def __str__(self) -> str:
        return self.spec

    def check_applicable(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        """Raise CodecError if this chain cannot carry a ``dtype`` tensor of ``shape``."""
        if dtype not in SUPPORTED_DTYPES:
            raise CodecError(f"dtype {dtype} is not supported", field="dtype")
        if any(d < 0 for d in shape):
            raise CodecError(f"shape {tuple(shape)} has a negative dimension", field="shape")
        if (self.merge or self.value) and not dtype.is_floating_point:
            raise CodecError(f"chain {self.spec!r} needs a floating-point tensor, got {dtype}", field="codec_chain")
        if self.merge:
            merge_count(shape, self.merge.ratio, self.merge.grouping)

    def coded_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape of the tensor that the value stage sees (``[B, C, M, G]`` after merging)."""
        if self.merge is None:
            return tuple(shape)
        b, c, h, w = shape
        g = self.merge.grouping
        m = h * w // g - merge_count(shape, self.merge.ratio, g)
        return (b, c, m, g)

    def value_bytes(self, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Bytes after the value stage (before zstd)."""
        n = numel(self.coded_shape(shape))
        value = self.value
        if isinstance(value, QuantStage):
            return packed_bytes(n, value.bits)
        if isinstance(value, CastStage):
            return 2 * n
        return n * _itemsize(dtype)

    def max_payload_bytes(self, dtype: torch.dtype, shape: tuple[int, ...]) -> int:
        """Upper bound on the payload for this dtype and shape (exact without zstd).

        Raises:
            CodecError: the chain cannot carry this tensor.
        """
        self.check_applicable(dtype, shape)
        raw = self.value_bytes(dtype, shape)
        if self.zstd is None:
            return raw
        # zstd's worst case: incompressible blocks add 3 bytes per 128 KiB block plus a frame
        # header and checksum; 1/256 and 64 bytes per frame are generous bounds of that
        frames = _value_itemsize(self, dtype) if self.zstd.shuffle else 1
        return raw + raw // 256 + 64 * frames


def _itemsize(dtype: torch.dtype) -> int:
    return dtype.itemsize


def _value_itemsize(chain: CodecChain, dtype: torch.dtype) -> int:
    value = chain.value
    if isinstance(value, QuantStage):
        return 1
    if isinstance(value, CastStage):
        return 2
    return _itemsize(dtype)


_RATIO = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")
_INT = re.compile(r"\d+")


def _parse_stage(text: str) -> Stage:
    name, *args = text.split(":")
    if name == "merge":
        if not args or len(args) > 2 or not _RATIO.fullmatch(args[0]):
            raise CodecError(f"stage {text!r}: expected merge:RATIO[:gG], e.g. merge:0.5", field="codec_chain")
        ratio = float(args[0])
        if not 0.0 <= ratio <= MAX_MERGE_RATIO:
            raise CodecError(
                f"stage {text!r}: merge ratio {ratio!r} outside [0, {MAX_MERGE_RATIO}]", field="codec_chain"
            )
        grouping = MergeStage.grouping
        if len(args) == 2:
            if not (args[1].startswith("g") and _INT.fullmatch(args[1][1:]) and int(args[1][1:]) >= 1):
                raise CodecError(f"stage {text!r}: grouping must read gG with G >= 1, e.g. g4", field="codec_chain")
            grouping = int(args[1][1:])
        return MergeStage(ratio=ratio, grouping=grouping)
    if name in CAST_DTYPES:
        if args:
            raise CodecError(f"stage {text!r}: {name} takes no arguments", field="codec_chain")
        return CastStage(name=name)  # type: ignore[arg-type]
    if name.startswith("int") and _INT.fullmatch(name[3:]):
        bits = int(name[3:])
        if not 2 <= bits <= 8:
            raise CodecError(f"stage {text!r}: quantisation bits {bits} outside 2..8", field="codec_chain")
        if args not in ([], ["sr"]):
            raise CodecError(f"stage {text!r}: expected int{bits} or int{bits}:sr", field="codec_chain")
        return QuantStage(bits=bits, stochastic=bool(args))
    if name == "zstd":
        level, shuffle = ZstdStage.level, False
        rest = list(args)
        if rest and rest[-1] == "shuffle":
            shuffle = True
            rest.pop()
        if len(rest) > 1 or (rest and not _INT.fullmatch(rest[0])):
            raise CodecError(f"stage {text!r}: expected zstd[:LEVEL][:shuffle], e.g. zstd:3", field="codec_chain")
        if rest:
            level = int(rest[0])
            if not 1 <= level <= 22:
                raise CodecError(f"stage {text!r}: zstd level {level} outside 1..22", field="codec_chain")
        return ZstdStage(level=level, shuffle=shuffle)
    raise CodecError(
        f"unknown codec stage {text!r}; known: none, merge:R, fp16, bf16, int2..int8, zstd", field="codec_chain"
    )


def parse_chain(spec: str | CodecChain) -> CodecChain:
    """Parse a chain spec such as ``"merge:0.5,int8,zstd:3"``, ``"fp16,zstd"`` or ``"none"``.

    Raises:
        CodecError: an unknown or malformed stage, a stage out of order or repeated, or
            ``none`` combined with other stages; the message names the offending text.
    """
    if isinstance(spec, CodecChain):
        return spec
    if not isinstance(spec, str):
        raise CodecError(f"codec chain must be a string, got {type(spec).__name__}", field="codec_chain")
    return _parse_text(spec)


@functools.lru_cache(maxsize=512)
def _parse_text(spec: str) -> CodecChain:
    """Parsing is pure and chains repeat on every tensor, so parsed chains are memoised."""
    text = spec.strip()
    if text == "none":
        return CodecChain()
    stages: list[Stage] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            raise CodecError(f"codec chain {spec!r} has an empty stage", field="codec_chain")
        if part == "none":
            raise CodecError(f"codec chain {spec!r}: 'none' cannot be combined with other stages", field="codec_chain")
        stage = _parse_stage(part)
        if stages and _ORDER[type(stage)] <= _ORDER[type(stages[-1])]:
            raise CodecError(
                f"codec chain {spec!r}: stage {part!r} is out of order or repeated "
                "(order: merge, then fp16/bf16/intK, then zstd)",
                field="codec_chain",
            )
        stages.append(stage)
    return CodecChain(stages=tuple(stages))


@dataclass(frozen=True)
class EncodedTensor:
    """A tensor encoded by a chain: what the framing layer sends.

    Attributes:
        chain: canonical chain spec.
        dtype: dtype of the decoded tensor.
        shape: shape of the decoded tensor.
        payload: encoded bytes.
        params: side information (scales, zero points, merge indices); travels in
            ``TensorHeader.codec_params`` and counts in the bits on the wire.
    """

    chain: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: bytes
    params: bytes

    @property
    def bits_on_wire(self) -> int:
        """8 · (payload + side information) bytes."""
        return 8 * (len(self.payload) + len(self.params))

    @property
    def numel(self) -> int:
        return numel(self.shape)


def _apply_nan_policy(tensor: Tensor, nan_policy: str, chain: CodecChain) -> Tensor:
    if nan_policy not in ("reject", "zero", "keep"):
        raise InvalidInputError(
            f"nan_policy {nan_policy!r} is not 'reject', 'zero' or 'keep'", field="nan_policy"
        )
    if not tensor.is_floating_point() or all_finite(tensor):
        return tensor
    if nan_policy == "zero":
        return torch.where(tensor.isfinite(), tensor, torch.zeros((), dtype=tensor.dtype))
    if nan_policy == "keep" and chain.merge is None and not isinstance(chain.value, QuantStage):
        return tensor
    bad = int((~tensor.isfinite()).sum())
    hint = "" if nan_policy == "reject" else f"; chain {chain.spec!r} cannot carry them"
    raise NonFiniteError(
        f"tensor {tuple(tensor.shape)} holds {bad} non-finite values (NaN/Inf){hint}; "
        "pass nan_policy='zero' to replace them with 0"
    )


def _tokens_channel_first(tokens: Tensor, channels: int, grouping: int) -> Tensor:
    """``[B, M, G·C]`` → ``[B, C, M, G]``."""
    b, m, _ = tokens.shape
    return tokens.reshape(b, m, grouping, channels).permute(0, 3, 1, 2).contiguous()


def _tokens_from_channel_first(coded: Tensor) -> Tensor:
    """``[B, C, M, G]`` → ``[B, M, G·C]``."""
    b, c, m, g = coded.shape
    return coded.permute(0, 2, 3, 1).reshape(b, m, g * c)


def encode(
    tensor: Tensor,
    chain: str | CodecChain,
    *,
    generator: torch.Generator | None = None,
    nan_policy: NanPolicy = "reject",
    on_values: Callable[[Tensor], Tensor] | None = None,
) -> EncodedTensor:
    """Encode ``tensor`` with ``chain``.

    Args:
        tensor: any supported dtype and shape (merge: float ``[B, C, H, W]``; cast/quant:
            float). Moved to CPU.
        chain: spec string or parsed chain.
        generator: random destinations for merging and noise for ``:sr`` rounding.
        nan_policy: "reject" raises NonFiniteError on NaN/Inf in a float tensor; "zero"
            replaces them with 0 first; "keep" carries them bit-exactly through chains
            without merge or quantisation (which need finite values: NonFiniteError).
        on_values: applied to the values after the merge stage (the kept tokens as a
            channel-first ``[B, C, M, G]`` tensor, or the tensor itself without merging)
            and before the value stage; must keep shape and dtype. The analog feature
            path (`meg.split.features`) puts the channel here, so noise falls on what is
            actually transmitted: the merged tokens.
    Returns:
        :class:`EncodedTensor`; ``bits_on_wire`` counts payload and side information.
    Raises:
        CodecError, NonFiniteError, InvalidInputError naming the bad value.
    """
    parsed = parse_chain(chain)
    shape = tuple(int(d) for d in tensor.shape)
    parsed.check_applicable(tensor.dtype, shape)
    x = _apply_nan_policy(tensor.detach().cpu().contiguous(), nan_policy, parsed)
    params: list[bytes] = []

    if parsed.merge is not None:
        merged, plan = merge_latent_with_plan(x, parsed.merge.ratio, generator=generator, grouping=parsed.merge.grouping)
        params.append(pack_plan(plan, shape, parsed.merge.grouping))
        x = _tokens_channel_first(merged.tokens, shape[1], parsed.merge.grouping)
    if on_values is not None:
        transformed = on_values(x)
        if transformed.shape != x.shape or transformed.dtype != x.dtype:
            raise InvalidInputError(
                f"on_values changed {tuple(x.shape)} {x.dtype} into {tuple(transformed.shape)} {transformed.dtype}",
                field="on_values",
            )
        x = transformed.detach().cpu().contiguous()

    value = parsed.value
    if isinstance(value, CastStage):
        data = tensor_to_bytes(cast_down(x, value.name))
    elif isinstance(value, QuantStage):
        if value.stochastic and generator is None:
            raise CodecError(f"stage {value} needs an explicit generator", field="generator")
        codes, qparams = quantize(x, value.bits, generator=generator if value.stochastic else None)
        data = pack_bits(codes.reshape(-1).numpy(), value.bits)
        params.append(qparams.to_bytes())
    else:
        data = tensor_to_bytes(x)

    if parsed.zstd is not None:
        data, zparams = zstd_compress(
            data, level=parsed.zstd.level, itemsize=_value_itemsize(parsed, tensor.dtype), shuffle=parsed.zstd.shuffle
        )
        params.append(zparams)
    return EncodedTensor(chain=parsed.spec, dtype=tensor.dtype, shape=shape, payload=data, params=b"".join(params))


def decode(encoded: EncodedTensor, *, unmerge: bool = True) -> Tensor | MergedLatent:
    """Invert :func:`encode`.

    Args:
        encoded: the received tensor; every size is checked before any allocation that
            depends on it.
        unmerge: with a merge stage, False returns the :class:`MergedLatent` (tokens in
            ``encoded.dtype``, gather index) instead of the unmerged latent.
    Returns:
        tensor of ``encoded.dtype`` and ``encoded.shape`` (or a MergedLatent, see above).
    Raises:
        CodecError: an unknown chain, or a chain that cannot carry this dtype/shape.
        CorruptPayloadError: payload or side information that does not match.
    """
    parsed = parse_chain(encoded.chain)
    shape = tuple(int(d) for d in encoded.shape)
    dtype = encoded.dtype
    parsed.check_applicable(dtype, shape)
    coded_shape = parsed.coded_shape(shape)
    value = parsed.value
    itemsize = _value_itemsize(parsed, dtype)

    # split the side information: every part's length is known before reading it
    params = encoded.params
    merge_len = 0
    if parsed.merge is not None:
        random_dst = bool(params[:1]) and params[0] == 1
        merge_len = plan_params_bytes(shape, parsed.merge.ratio, parsed.merge.grouping, random_dst)
    quant_len = 8 * channel_count(coded_shape) if isinstance(value, QuantStage) else 0
    zstd_len = zstd_params_bytes(itemsize, parsed.zstd.shuffle) if parsed.zstd else 0
    if len(params) != merge_len + quant_len + zstd_len:
        raise CorruptPayloadError(
            f"side information is {len(params)} bytes, chain {parsed.spec!r} on {tuple(shape)} "
            f"needs {merge_len + quant_len + zstd_len}",
            field="codec_params",
        )
    merge_params = params[:merge_len]
    quant_params = params[merge_len : merge_len + quant_len]
    zstd_side = params[merge_len + quant_len :]

    value_bytes = parsed.value_bytes(dtype, shape)
    if parsed.zstd is not None:
        data = zstd_decompress(
            encoded.payload, zstd_side, raw_bytes=value_bytes, itemsize=itemsize, shuffle=parsed.zstd.shuffle
        )
    else:
        data = encoded.payload
        if len(data) != value_bytes:
            raise CorruptPayloadError(
                f"payload is {len(data)} bytes, chain {parsed.spec!r} on {dtype} {tuple(shape)} needs {value_bytes}",
                field="encoded_bytes",
            )

    if isinstance(value, CastStage):
        x = tensor_from_bytes(data, CAST_DTYPES[value.name], coded_shape).to(dtype)
    elif isinstance(value, QuantStage):
        qparams = QuantParams.from_bytes(
            quant_params, channel_count(coded_shape), levels=(1 << value.bits) - 1, max_abs=float(torch.finfo(dtype).max)
        )
        codes = torch.from_numpy(unpack_bits(data, value.bits, numel(coded_shape))).reshape(coded_shape)
        x = dequantize(codes, qparams, dtype)
    else:
        x = tensor_from_bytes(data, dtype, coded_shape)

    if parsed.merge is None:
        return x
    stage = parsed.merge
    plan = unpack_plan(merge_params, shape, stage.ratio, stage.grouping)
    gather_index = gather_index_from_plan(plan, TokenGrid.for_latent(shape, stage.grouping))
    tokens = _tokens_from_channel_first(x)
    latent_shape: tuple[int, int, int, int] = (shape[0], shape[1], shape[2], shape[3])
    if not unmerge:
        return MergedLatent(tokens=tokens.contiguous(), gather_index=gather_index, latent_shape=latent_shape, grouping=stage.grouping)
    return unmerge_latent(tokens, gather_index, latent_shape, stage.grouping).contiguous()
