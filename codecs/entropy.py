"""Entropy coding: zstd, with an optional byte-plane shuffle for multi-byte elements.

Shuffle splits n elements of w bytes into w planes (plane j holds byte j of every
element) and compresses each plane as its own zstd frame: the high bytes of fp16/bf16
data are highly repetitive while the low bytes are near-random, and one frame over the
interleaved bytes cannot exploit that. The compressed lengths of the first w − 1 frames
travel as uint32 side information (the last frame takes the rest of the payload).

Every frame records its content size; the decoder checks it against the size the header
implies before decompressing, so a lying frame cannot make it allocate more.
"""

from __future__ import annotations

import numpy as np
import zstandard

from meg.errors import CodecError, CorruptPayloadError

__all__ = ["MAX_LEVEL", "MIN_LEVEL", "zstd_compress", "zstd_decompress", "zstd_params_bytes"]

MIN_LEVEL, MAX_LEVEL = 1, 22


def _check_level(level: int) -> None:
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise CodecError(f"zstd level {level} outside {MIN_LEVEL}..{MAX_LEVEL}", field="codec_chain")


def zstd_params_bytes(itemsize: int, shuffle: bool) -> int:
    """Side-information bytes: 4 per plane but the last when shuffling, else 0."""
    return 4 * (itemsize - 1) if shuffle and itemsize > 1 else 0


def zstd_compress(data: bytes, *, level: int, itemsize: int = 1, shuffle: bool = False) -> tuple[bytes, bytes]:
    """Compress ``data`` (elements of ``itemsize`` bytes) → (payload, side information)."""
    _check_level(level)
    compressor = zstandard.ZstdCompressor(level=level, write_content_size=True)
    if not shuffle or itemsize == 1:
        return compressor.compress(data), b""
    planes = np.frombuffer(data, dtype=np.uint8).reshape(-1, itemsize).T
    frames = [compressor.compress(np.ascontiguousarray(plane).tobytes()) for plane in planes]
    lengths = np.array([len(f) for f in frames[:-1]], dtype="<u4").tobytes()
    return b"".join(frames), lengths


def _decompress_frame(frame: bytes, expected: int) -> bytes:
    try:
        content = zstandard.frame_content_size(frame)
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"zstd frame header unreadable: {exc}", field="encoded_bytes") from exc
    if content != expected:
        raise CorruptPayloadError(
            f"zstd frame announces {content} bytes, expected {expected}", field="encoded_bytes"
        )
    reader = zstandard.ZstdDecompressor().decompressobj()
    try:
        out = reader.decompress(frame)
    except zstandard.ZstdError as exc:
        raise CorruptPayloadError(f"zstd frame corrupt: {exc}", field="encoded_bytes") from exc
    if not reader.eof or reader.unused_data or len(out) != expected:
        raise CorruptPayloadError(
            f"zstd frame is truncated or followed by extra bytes ({len(out)} of {expected} bytes decoded)",
            field="encoded_bytes",
        )
    return out


def zstd_decompress(payload: bytes, params: bytes, *, raw_bytes: int, itemsize: int = 1, shuffle: bool = False) -> bytes:
    """Inverse of :func:`zstd_compress`; returns exactly ``raw_bytes`` bytes.

    Raises:
        CorruptPayloadError: wrong side information, an unreadable/truncated frame, extra
            bytes, or a content size other than the header implies.
    """
    expected_params = zstd_params_bytes(itemsize, shuffle)
    if len(params) != expected_params:
        raise CorruptPayloadError(
            f"zstd side information is {len(params)} bytes, expected {expected_params}", field="codec_params"
        )
    if not shuffle or itemsize == 1:
        return _decompress_frame(payload, raw_bytes)
    if raw_bytes % itemsize:
        raise CorruptPayloadError(f"{raw_bytes} bytes is not a whole number of {itemsize}-byte elements")
    lengths = np.frombuffer(params, dtype="<u4").astype(np.int64)
    if int(lengths.sum()) > len(payload):
        raise CorruptPayloadError(
            f"zstd plane lengths sum to {int(lengths.sum())} bytes, payload has {len(payload)}",
            field="codec_params",
        )
    bounds = np.concatenate([[0], np.cumsum(lengths), [len(payload)]])
    plane_bytes = raw_bytes // itemsize
    planes = np.empty((itemsize, plane_bytes), dtype=np.uint8)
    for j in range(itemsize):
        frame = payload[int(bounds[j]) : int(bounds[j + 1])]
        planes[j] = np.frombuffer(_decompress_frame(frame, plane_bytes), dtype=np.uint8)
    return np.ascontiguousarray(planes.T).tobytes()
