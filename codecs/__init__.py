"""Tensor codecs and wire framing: pure tensor functions, no I/O.

``encode(tensor, "merge:0.5,int8,zstd:3")`` → :class:`EncodedTensor` (payload + side
information, exact ``bits_on_wire``); ``decode`` inverts it; ``frame_tensor`` /
:class:`TensorAssembler` carry it as ``meg.v1`` header + chunks.
"""

from meg.codecs.chain import CodecChain, EncodedTensor, decode, encode, parse_chain
from meg.codecs.framing import (
    MAX_CHUNK_BYTES,
    FramingLimits,
    TensorAssembler,
    assemble,
    dtype_from_proto,
    dtype_to_proto,
    frame_tensor,
)
from meg.codecs.merge import (
    MergedLatent,
    latent_to_tokens,
    merge_latent,
    tokens_to_latent,
    unmerge_latent,
)
from meg.codecs.metrics import CodecReport, bits_per_element, evaluate_chain, mse, psnr_db, ratio_vs

__all__ = [
    "MAX_CHUNK_BYTES",
    "CodecChain",
    "CodecReport",
    "EncodedTensor",
    "FramingLimits",
    "MergedLatent",
    "TensorAssembler",
    "assemble",
    "bits_per_element",
    "decode",
    "dtype_from_proto",
    "dtype_to_proto",
    "encode",
    "evaluate_chain",
    "frame_tensor",
    "latent_to_tokens",
    "merge_latent",
    "mse",
    "parse_chain",
    "psnr_db",
    "ratio_vs",
    "tokens_to_latent",
    "unmerge_latent",
]
