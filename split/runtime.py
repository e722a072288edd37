"""One interface for the device partition in torch and in ONNX Runtime.

`TorchRuntime` runs the diffusers modules eagerly; `OnnxRuntime` runs the graphs that
`meg.split.onnx_export` wrote. Both compute the same maths (the exported graph *is*
`DecoderGraph` / `UNetGraph`), so a split run gives the same image on either, up to
float rounding.

Execution providers are explicit: ``CPUExecutionProvider`` by default; CUDA or TensorRT
only when asked for. A requested provider that this onnxruntime build lacks, or that the
session did not actually enable (onnxruntime falls back to CPU silently when, e.g., CUDA
fails to initialise), raises `UnavailableError` — unless the caller passes
``allow_fallback=True``, in which case the fallback is logged as a warning. `providers`
reports what the sessions actually use.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from meg.codecs.merge import TOKEN_GROUPING
from meg.errors import InvalidInputError, ModelNotFoundError, UnavailableError
from meg.split.onnx_export import MANIFEST_NAME, DecoderGraph, UNetGraph

__all__ = ["DeviceRuntime", "OnnxRuntime", "TorchRuntime", "check_decoder_inputs", "resolve_providers"]

log = logging.getLogger(__name__)


@runtime_checkable
class DeviceRuntime(Protocol):
    """What the device partition needs from a runtime."""

    name: str
    """``"torch"`` or ``"onnxruntime"``."""
    providers: tuple[str, ...]
    """Providers actually in use (``("torch-cpu",)`` for torch on CPU)."""
    @property
    def grouping(self) -> int:
        """Latent row elements per token that `decode_latent`'s unmerge expects."""
        ...

    def decode_latent(
        self, tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int]
    ) -> torch.Tensor:
        """tokens [B, M, D] (scaled UNet latent space), gather_index [B, N] → image [B, 3, 8H, 8W] in [0, 1].

        A latent that was not merged is passed as ``tokens = latent_to_tokens(latent)``,
        ``gather_index = arange(N)`` per batch row.
        """
        ...

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """Noise prediction [B, C, h, w] for sample [B, C, h, w], timestep (scalar or [B]), text [B, L, E]."""
        ...


def check_decoder_inputs(
    tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int], grouping: int
) -> None:
    """Validate decode inputs before they reach a kernel (which would crash or read out of bounds).

    Raises:
        InvalidInputError: naming the tensor whose shape, dtype or values are wrong.
    """
    if len(latent_shape) != 4 or any(int(s) <= 0 for s in latent_shape):
        raise InvalidInputError(f"latent_shape must be 4 positive ints (B, C, H, W), got {latent_shape!r}")
    batch, channels, height, width = (int(s) for s in latent_shape)
    if width % grouping:
        raise InvalidInputError(f"latent width {width} is not divisible by grouping={grouping}")
    num_tokens, token_dim = height * width // grouping, channels * grouping
    if tokens.ndim != 3 or tokens.shape[0] != batch or tokens.shape[2] != token_dim or tokens.shape[1] < 1:
        raise InvalidInputError(f"tokens must have shape [{batch}, M, {token_dim}], got {list(tokens.shape)}")
    if not tokens.is_floating_point():
        raise InvalidInputError(f"tokens must be floating point, got {tokens.dtype}")
    if tuple(gather_index.shape) != (batch, num_tokens):
        raise InvalidInputError(f"gather_index must have shape [{batch}, {num_tokens}], got {list(gather_index.shape)}")
    if gather_index.dtype != torch.int64:
        raise InvalidInputError(f"gather_index must be int64, got {gather_index.dtype}")
    low, high = int(gather_index.min()), int(gather_index.max())
    if low < 0 or high >= tokens.shape[1]:
        raise InvalidInputError(f"gather_index values must lie in [0, {tokens.shape[1]}), got [{low}, {high}]")
    if not bool(torch.isfinite(tokens).all()):
        raise InvalidInputError("tokens hold NaN or Inf")


def _batched_timestep(timestep: torch.Tensor | float | int, batch: int) -> torch.Tensor:
    t = torch.as_tensor(timestep, dtype=torch.float32).reshape(-1)
    if t.numel() == 1:
        return t.expand(batch).contiguous()
    if t.numel() != batch:
        raise InvalidInputError(f"timestep must be a scalar or have {batch} entries, got shape {list(t.shape)}")
    return t


def _exported_dtype(entry: dict[str, Any]) -> torch.dtype:
    """The float dtype a partition was exported in (the manifest stores e.g. "torch.float16")."""
    dtype = getattr(torch, str(entry.get("dtype", "torch.float32")).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"manifest dtype {entry.get('dtype')!r} is not a torch dtype")
    return dtype


class TorchRuntime:
    """The device partition in eager torch (the reference for `OnnxRuntime`).

    Args:
        unet: the device's UNet (``step:K`` splits), or None for decode-only devices.
        vae: the device's VAE (its decoder is used).
        grouping: latent row elements per token.
    """

    name = "torch"

    def __init__(self, unet: nn.Module | None, vae: nn.Module, *, grouping: int = TOKEN_GROUPING) -> None:
        # Built on first use: a decode-only device may hold a UNet (e.g. SDXL's) that the
        # three-tensor `unet` call cannot drive.
        self._unet_module = unet
        self._unet: UNetGraph | None = None
        self._vae = vae
        self.grouping = grouping
        device = next(vae.parameters()).device
        self.providers: tuple[str, ...] = (f"torch-{device.type}",)

    def decode_latent(
        self, tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int]
    ) -> torch.Tensor:
        check_decoder_inputs(tokens, gather_index, latent_shape, self.grouping)
        graph = DecoderGraph(self._vae, (int(latent_shape[2]), int(latent_shape[3])), self.grouping).eval()
        if int(latent_shape[1]) != graph.latent_channels:
            raise InvalidInputError(f"latent_shape {tuple(latent_shape)!r} has {latent_shape[1]} channels; the VAE has {graph.latent_channels}")
        weight = next(self._vae.parameters())
        # no_grad, not inference_mode: callers may update the results in place.
        with torch.no_grad():
            image = graph(tokens.to(weight.device, weight.dtype), gather_index.to(weight.device))
        return image.float().cpu()

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if self._unet_module is None:
            raise UnavailableError("this TorchRuntime has no UNet (it was built with unet=None)")
        if self._unet is None:
            self._unet = UNetGraph(self._unet_module).eval()
        # no_grad, not inference_mode: callers may update the results in place.
        with torch.no_grad():
            weight = next(self._unet_module.parameters())
            noise = self._unet(
                sample.to(weight.device, weight.dtype),
                torch.as_tensor(timestep).to(weight.device),
                encoder_hidden_states.to(weight.device, weight.dtype),
            )
        return noise.to(sample.device, sample.dtype)


def resolve_providers(requested: Sequence[str], *, allow_fallback: bool = False) -> list[str]:
    """Check requested execution providers against this onnxruntime build.

    Returns the providers to open sessions with (a missing one is dropped, with a logged
    warning, only when ``allow_fallback``; ``CPUExecutionProvider`` is appended then if
    nothing is left).

    Raises:
        InvalidInputError: an empty request.
        UnavailableError: a requested provider is missing and ``allow_fallback`` is False.
    """
    import onnxruntime as ort

    if not requested:
        raise InvalidInputError("providers must name at least one execution provider")
    available = ort.get_available_providers()
    chosen: list[str] = []
    for provider in requested:
        if provider in available:
            chosen.append(provider)
            continue
        message = f"execution provider {provider!r} is not available in this onnxruntime build (available: {', '.join(available)})"
        if not allow_fallback:
            raise UnavailableError(message)
        log.warning("%s; continuing without it", message)
    if not chosen:
        log.warning("no requested execution provider is available; falling back to CPUExecutionProvider")
        chosen = ["CPUExecutionProvider"]
    return chosen


class OnnxRuntime:
    """The device partition in ONNX Runtime, from a folder written by `export_device_partitions`.

    Args:
        export_dir: folder holding ``manifest.json`` and ``decoder.onnx`` / ``unet.onnx``.
        providers: execution providers in priority order.
        allow_fallback: drop (with a logged warning) requested providers that are missing
            instead of raising `UnavailableError`.
        intra_op_threads: threads per operator; default torch's thread count, so torch and
            onnxruntime are compared with the same threads.
    """

    name = "onnxruntime"

    def __init__(
        self,
        export_dir: Path,
        *,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        allow_fallback: bool = False,
        intra_op_threads: int | None = None,
    ) -> None:
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        manifest_path = self.export_dir / MANIFEST_NAME
        if not manifest_path.is_file():
            raise ModelNotFoundError(f"no ONNX export in {str(self.export_dir)!r} (missing {MANIFEST_NAME})")
        self.manifest: dict[str, Any] = json.loads(manifest_path.read_text())
        if intra_op_threads is not None and intra_op_threads < 1:
            raise InvalidInputError(f"intra_op_threads must be >= 1, got {intra_op_threads}")
        chosen = resolve_providers(providers, allow_fallback=allow_fallback)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads if intra_op_threads is not None else torch.get_num_threads()
        # One request decodes at a time on a device: parallelism inside operators only.
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3
        self._sessions: dict[str, Any] = {}
        in_use: list[str] = []
        for part, entry in self.manifest.get("parts", {}).items():
            path = self.export_dir / entry["file"]
            if not path.is_file():
                raise ModelNotFoundError(f"ONNX file {str(path)!r} named in the manifest is missing")
            session = ort.InferenceSession(str(path), sess_options=options, providers=chosen)
            actual = session.get_providers()
            dropped = [p for p in chosen if p not in actual]
            if dropped:
                message = f"onnxruntime did not enable {dropped} for {part!r} (session uses {actual})"
                if not allow_fallback:
                    raise UnavailableError(message)
                log.warning("%s", message)
            self._sessions[part] = session
            in_use += [p for p in actual if p not in in_use]
        if not self._sessions:
            raise ModelNotFoundError(f"the ONNX export in {str(self.export_dir)!r} holds no partition")
        self.providers: tuple[str, ...] = tuple(in_use)

    @property
    def parts(self) -> tuple[str, ...]:
        """The partitions this runtime can run."""
        return tuple(self._sessions)

    @property
    def grouping(self) -> int:
        """Token grouping of the exported decoder graph."""
        return int(self.manifest["parts"]["decoder"]["grouping"]) if "decoder" in self.manifest.get("parts", {}) else 4

    def _session(self, part: str) -> Any:
        if part not in self._sessions:
            raise UnavailableError(f"the ONNX export in {str(self.export_dir)!r} has no {part!r} partition")
        return self._sessions[part]

    def decode_latent(
        self, tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int]
    ) -> torch.Tensor:
        session = self._session("decoder")
        entry = self.manifest["parts"]["decoder"]
        grouping = int(entry["grouping"])
        check_decoder_inputs(tokens, gather_index, latent_shape, grouping)
        exported = (int(entry["latent_channels"]), *entry["latent_hw"])
        if tuple(int(s) for s in latent_shape[1:]) != exported:
            raise InvalidInputError(
                f"latent_shape {tuple(latent_shape)!r} does not match the exported decoder's (C, H, W) = {exported}; "
                "export the decoder for this resolution"
            )
        feeds = {
            "tokens": tokens.detach().to("cpu", _exported_dtype(entry)).contiguous().numpy(),
            "gather_index": gather_index.detach().to("cpu").contiguous().numpy(),
        }
        (image,) = session.run(None, feeds)
        return torch.from_numpy(np.asarray(image, dtype=np.float32))

    def unet(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        session = self._session("unet")
        dtype = _exported_dtype(self.manifest["parts"]["unet"])
        if sample.ndim != 4 or encoder_hidden_states.ndim != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise InvalidInputError(
                f"sample must be [B, C, h, w] and encoder_hidden_states [B, L, E], got {list(sample.shape)} and "
                f"{list(encoder_hidden_states.shape)}"
            )
        feeds = {
            "sample": sample.detach().to("cpu", dtype).contiguous().numpy(),
            "timestep": _batched_timestep(timestep, sample.shape[0]).numpy(),
            "encoder_hidden_states": encoder_hidden_states.detach().to("cpu", dtype).contiguous().numpy(),
        }
        (noise,) = session.run(None, feeds)
        return torch.from_numpy(np.asarray(noise)).to(sample.dtype)
