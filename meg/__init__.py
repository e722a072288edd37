"""MEG: mobile edge generation.

Latent diffusion split between an edge server and a user device, with compressed
features carried over gRPC through an emulated wireless channel. Sub-packages:
``meg.codecs`` (tensor codecs and framing), ``meg.channel`` (wireless channel emulator),
``meg.split`` (pipelines, split points, ONNX runtime), ``meg.devices`` (cost models),
``meg.v1`` (generated wire types).
"""

from meg.errors import MegError

__all__ = ["MegError", "__version__"]
__version__ = "0.1.0"
