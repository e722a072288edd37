"""Export the device partitions to ONNX, cached by a content hash of weights and options.

Two partitions run on the user device:

- ``decoder`` (MEG, PAPERS.md §1): token unmerge (a gather, folded into the graph) →
  ``/ scaling_factor`` → ``post_quant_conv`` → VAE decoder → ``(x / 2 + 0.5).clamp(0, 1)``.
  Inputs ``tokens`` [B, M, D] float32 and ``gather_index`` [B, N] int64; output ``image``
  [B, 3, 8H, 8W]. Dynamic axes: B and M. The latent height and width are fixed at export
  (the reshape from the token grid back to [B, C, H, W] needs both, and N = H·W/grouping
  alone does not determine them), so a decoder is exported per resolution; the cache
  makes a second export of the same resolution free.
- ``unet`` (the device's remaining steps of a ``step:K`` split): the UNet forward
  ``(sample [B, C, h, w], timestep [B] float32, encoder_hidden_states [B, L, E]) →
  noise_pred [B, C, h, w]``. Dynamic axes: B, h, w and L (h and w must stay divisible by
  the UNet's total downsampling factor, as in torch).

The exporter is chosen by ``ExportOptions.exporter``: ``"auto"`` tries the dynamo
exporter (``torch.export`` + onnxscript) and falls back to the TorchScript exporter if it
fails; the manifest records which one produced each file and how long it took. Both work
on diffusers' UNet2DConditionModel and AutoencoderKL with torch 2.13; the TorchScript
exporter is 5-20× faster to export, the dynamo exporter is the maintained path.

Weights above 2 GB (protobuf's limit) are written as external data (``NAME.onnx.data``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

from meg.codecs.merge import TOKEN_GROUPING
from meg.errors import InvalidInputError, SplitError

__all__ = [
    "EXPORTERS",
    "EXPORT_FORMAT_VERSION",
    "DecoderGraph",
    "ExportOptions",
    "ExportRecord",
    "UNetGraph",
    "export_device_partitions",
    "export_partitions",
    "read_manifest",
    "vae_scale_factor",
    "weights_digest",
]

log = logging.getLogger(__name__)

EXPORT_FORMAT_VERSION = 1
"""Bumped whenever the exported graphs change meaning; part of every cache key."""
MANIFEST_NAME = "manifest.json"
EXTERNAL_DATA_THRESHOLD_BYTES = 2 * 1024**3
PARTS = ("decoder", "unet")
IO_NAMES: dict[str, tuple[list[str], list[str]]] = {
    "decoder": (["tokens", "gather_index"], ["image"]),
    "unet": (["sample", "timestep", "encoder_hidden_states"], ["noise_pred"]),
}

Part = Literal["decoder", "unet"]
Exporter = Literal["auto", "dynamo", "torchscript"]
EXPORTERS: tuple[Exporter, ...] = ("auto", "dynamo", "torchscript")


@dataclass(frozen=True)
class ExportOptions:
    """Options of one export. Every field is part of the cache key."""

    exporter: Exporter = "auto"
    """``auto``: dynamo, falling back to TorchScript if dynamo fails on the model."""
    opset: int = 18
    """ONNX opset of the exported graphs."""
    grouping: int = TOKEN_GROUPING
    """Latent row elements per token (MEG: 4 → D = 4·C = 16)."""
    text_tokens: int = 77
    """Length of the example text embeddings used to trace the UNet (the axis is dynamic)."""

    def __post_init__(self) -> None:
        if self.exporter not in EXPORTERS:
            raise InvalidInputError(f"exporter must be one of {EXPORTERS}, got {self.exporter!r}")
        if self.opset < 17:
            raise InvalidInputError(f"opset must be >= 17 (LayerNormalization), got {self.opset}")
        if self.grouping < 1 or self.text_tokens < 1:
            raise InvalidInputError(f"grouping and text_tokens must be >= 1, got {self.grouping}, {self.text_tokens}")


@dataclass(frozen=True)
class ExportRecord:
    """What `export_partitions` did for one partition."""

    part: str
    path: Path
    key: str
    cached: bool
    exporter: str
    export_s: float
    external_data: bool


def _unmerge_latent(
    tokens: torch.Tensor, gather_index: torch.Tensor, latent_shape: tuple[int, int, int, int], grouping: int
) -> torch.Tensor:
    from meg.codecs.merge import unmerge_latent

    return unmerge_latent(tokens, gather_index, latent_shape, grouping)


class DecoderGraph(nn.Module):
    """The device's decode partition: tokens + gather index → image in [0, 1].

    The same module runs in `TorchRuntime` and is what gets exported, so torch and ONNX
    compute the same maths.

    Args:
        vae: a diffusers ``AutoencoderKL`` (its ``decoder``, ``post_quant_conv`` and
            ``scaling_factor``/``shift_factor`` are used; weights are shared, not copied).
        latent_hw: latent (H, W).
        grouping: latent row elements per token.
    """

    def __init__(self, vae: Any, latent_hw: tuple[int, int], grouping: int = TOKEN_GROUPING) -> None:
        super().__init__()
        height, width = latent_hw
        if height <= 0 or width <= 0 or width % grouping:
            raise InvalidInputError(
                f"latent (H, W) = {latent_hw!r} must be positive with W divisible by grouping={grouping}"
            )
        config = vae.config
        self.decoder = vae.decoder
        self.post_quant_conv = getattr(vae, "post_quant_conv", None)
        self.latent_channels = int(config.latent_channels)
        self.latent_hw = (int(height), int(width))
        self.grouping = int(grouping)
        self.scaling_factor = float(config.scaling_factor)
        shift = getattr(config, "shift_factor", None)
        self.shift_factor = float(shift) if shift is not None else 0.0

    @property
    def token_dim(self) -> int:
        """D = grouping × latent channels."""
        return self.grouping * self.latent_channels

    @property
    def num_tokens(self) -> int:
        """N = H × W / grouping."""
        return self.latent_hw[0] * self.latent_hw[1] // self.grouping

    def forward(self, tokens: torch.Tensor, gather_index: torch.Tensor) -> torch.Tensor:
        """tokens [B, M, D] float, gather_index [B, N] int64 → image [B, 3, 8H, 8W] in [0, 1]."""
        height, width = self.latent_hw
        latent_shape = (tokens.shape[0], self.latent_channels, height, width)
        latent = _unmerge_latent(tokens, gather_index, latent_shape, self.grouping)
        latent = latent / self.scaling_factor + self.shift_factor
        if self.post_quant_conv is not None:
            latent = self.post_quant_conv(latent)
        image = self.decoder(latent)
        return (image / 2 + 0.5).clamp(0, 1)


class UNetGraph(nn.Module):
    """The UNet forward as a plain function of three tensors (one denoising evaluation)."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        addition = getattr(unet.config, "addition_embed_type", None)
        if addition is not None:
            raise SplitError(
                f"a UNet with addition_embed_type={addition!r} (e.g. SDXL) needs added conditioning "
                "that the `unet` device partition does not take"
            )
        self.unet: Any = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """sample [B, C, h, w], timestep [B] float32, encoder_hidden_states [B, L, E] → noise [B, C, h, w]."""
        return self.unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)[0]


def vae_scale_factor(vae: Any) -> int:
    """Pixels per latent element along each axis: 2 ** (VAE levels − 1)."""
    return int(2 ** (len(vae.config.block_out_channels) - 1))


def weights_digest(module: nn.Module) -> str:
    """BLAKE2b digest of a module's state dict: names, dtypes, shapes and bytes, in name order."""
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _param_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


def _example_inputs(
    part: Part, graph: nn.Module, *, height: int, width: int, options: ExportOptions
) -> tuple[tuple[torch.Tensor, ...], list[str], list[str]]:
    gen = torch.Generator().manual_seed(0)
    dtype = next(graph.parameters()).dtype
    if part == "decoder":
        assert isinstance(graph, DecoderGraph)
        n = graph.num_tokens
        # A merged example (M < N) with batch 2, so no axis is specialised to 1 or to N.
        m = max(n // 2, 2)
        tokens = torch.randn(2, m, graph.token_dim, generator=gen, dtype=torch.float32).to(dtype)
        gather_index = torch.randint(0, m, (2, n), generator=gen)
        gather_index[:, :m] = torch.arange(m)
        return (tokens, gather_index), *IO_NAMES["decoder"]
    unet: Any = graph.unet
    sample = torch.randn(2, int(unet.config.in_channels), height, width, generator=gen).to(dtype)
    timestep = torch.tensor([500.0, 500.0])
    text = torch.randn(2, options.text_tokens, int(unet.config.cross_attention_dim), generator=gen).to(dtype)
    return (sample, timestep, text), *IO_NAMES["unet"]


def _dynamic_axes(part: Part) -> dict[str, dict[int, str]]:
    if part == "decoder":
        return {"tokens": {0: "batch", 1: "kept_tokens"}, "gather_index": {0: "batch"}, "image": {0: "batch"}}
    return {
        "sample": {0: "batch", 2: "latent_height", 3: "latent_width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch", 1: "text_tokens"},
        "noise_pred": {0: "batch", 2: "latent_height", 3: "latent_width"},
    }


def _export_dynamo(
    graph: nn.Module, args: tuple[torch.Tensor, ...], path: Path, part: Part,
    input_names: list[str], output_names: list[str], opset: int, external_data: bool,
) -> None:
    from torch.export import Dim

    auto = Dim.AUTO
    shapes: dict[str, dict[int, Any]] = {
        name: dict.fromkeys(axes, auto) for name, axes in _dynamic_axes(part).items() if name in input_names
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            graph, args, dynamo=True, input_names=input_names, output_names=output_names,
            dynamic_shapes=shapes, opset_version=opset, external_data=external_data, verbose=False,
        )
    if program is None:
        raise RuntimeError("the dynamo exporter returned no program")
    _rename_dynamic_dims(program.model, part)
    program.save(str(path), external_data=external_data)


def _rename_dynamic_dims(model: Any, part: Part) -> None:
    """Give the symbolic dims the names of `_dynamic_axes` (dynamo names them s0, s1 …)."""
    from onnxscript import ir

    axes = _dynamic_axes(part)
    for value in [*model.graph.inputs, *model.graph.outputs]:
        if value.name not in axes or value.shape is None:
            continue
        dims = list(value.shape)
        for axis, label in axes[value.name].items():
            if not isinstance(dims[axis], int):
                dims[axis] = label
        value.shape = ir.Shape(dims)


def _export_torchscript(
    graph: nn.Module, args: tuple[torch.Tensor, ...], path: Path, part: Part,
    input_names: list[str], output_names: list[str], opset: int, external_data: bool,
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph, args, str(path), dynamo=False, input_names=input_names, output_names=output_names,
            dynamic_axes=_dynamic_axes(part), opset_version=opset, do_constant_folding=True,
        )
    data_path = path.with_name(path.name + ".data")
    if external_data and not data_path.is_file():
        # Above 2 GB the exporter itself writes external files; below, move the weights
        # out here so the layout only depends on the threshold.
        import onnx

        model = onnx.load(str(path))
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_path.name, size_threshold=1024)


def read_manifest(export_dir: Path) -> dict[str, Any]:
    """The manifest of an export folder (``{"format": …, "parts": {part: {...}}}``)."""
    path = Path(export_dir) / MANIFEST_NAME
    if not path.is_file():
        return {"format": EXPORT_FORMAT_VERSION, "parts": {}}
    return json.loads(path.read_text())


def _cache_key(part: Part, digest: str, meta: dict[str, Any], options: ExportOptions) -> str:
    import onnx
    import onnxscript

    payload = {
        "format": EXPORT_FORMAT_VERSION,
        # The exporters' output changes between versions: a new one re-exports.
        "versions": [torch.__version__, onnx.__version__, onnxscript.__version__],
        "part": part,
        "weights": digest,
        "meta": meta,
        "options": asdict(options),
    }
    return hashlib.blake2b(json.dumps(payload, sort_keys=True).encode(), digest_size=16).hexdigest()


def _files_present(out_dir: Path, entry: dict[str, Any]) -> bool:
    files = [entry["file"], *([entry["file"] + ".data"] if entry.get("external_data") else [])]
    return all((out_dir / f).is_file() for f in files)


def export_partitions(
    *,
    out_dir: Path,
    height: int,
    width: int,
    unet: nn.Module | None = None,
    vae: nn.Module | None = None,
    parts: Sequence[str] = PARTS,
    options: ExportOptions = ExportOptions(),
    on_part: Callable[[ExportRecord], None] | None = None,
) -> dict[str, ExportRecord]:
    """Export (or reuse) the device partitions; the detailed form of `export_device_partitions`.

    Args:
        out_dir: folder for ``decoder.onnx``, ``unet.onnx`` and ``manifest.json``.
        height, width: image size in pixels; the latent is smaller by the VAE's scale
            factor (2 ** (levels − 1): 8 for SD-family VAEs).
        unet, vae: the device's models (needed for the ``unet`` / ``decoder`` parts).
        parts: which partitions to export.
        options: exporter, opset, token grouping.
        on_part: called with each partition's record (progress display).

    Returns:
        ``{part: ExportRecord}``; ``record.cached`` is True where the existing file had
        the same key (content hash of the weights and every option) and was reused.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise InvalidInputError(f"parts must be a non-empty subset of {PARTS}, got {tuple(parts)!r}")
    scale = vae_scale_factor(vae) if vae is not None else 8
    if height <= 0 or width <= 0 or height % scale or width % scale:
        raise InvalidInputError(f"height and width must be positive multiples of {scale}, got {height}x{width}")
    latent_hw = (height // scale, width // scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(out_dir)
    records: dict[str, ExportRecord] = {}
    for part_name in parts:
        part = cast(Part, part_name)
        model: Any = vae if part == "decoder" else unet
        if model is None:
            raise InvalidInputError(f"exporting the {part!r} partition needs the {'vae' if part == 'decoder' else 'unet'}")
        was_training = model.training
        model.eval()
        graph: nn.Module = DecoderGraph(model, latent_hw, options.grouping) if part == "decoder" else UNetGraph(model)
        meta: dict[str, Any] = {"latent_hw": list(latent_hw), "dtype": str(next(model.parameters()).dtype)}
        if isinstance(graph, DecoderGraph):
            meta |= {
                "latent_channels": graph.latent_channels,
                "grouping": graph.grouping,
                "token_dim": graph.token_dim,
                "num_tokens": graph.num_tokens,
                "scaling_factor": graph.scaling_factor,
                "shift_factor": graph.shift_factor,
            }
        else:
            meta |= {"in_channels": int(model.config.in_channels), "cross_attention_dim": int(model.config.cross_attention_dim)}
        key = _cache_key(part, weights_digest(model), meta, options)
        entry = manifest["parts"].get(part)
        if entry is not None and entry.get("key") == key and _files_present(out_dir, entry):
            record = ExportRecord(part, out_dir / entry["file"], key, True, entry["exporter"], entry["export_s"], entry["external_data"])
        else:
            record = _export_one(part, graph, out_dir, latent_hw, key, options, meta)
            manifest["parts"][part] = {
                "file": record.path.name,
                "key": key,
                "exporter": record.exporter,
                "export_s": record.export_s,
                "external_data": record.external_data,
                "inputs": IO_NAMES[part][0],
                "outputs": IO_NAMES[part][1],
                "dynamic_axes": {k: {str(a): n for a, n in v.items()} for k, v in _dynamic_axes(part).items()},
                **meta,
            }
            # Written after each part, so a failure later keeps the parts already done; via a
            # rename, so a reader never sees half a manifest.
            staging = out_dir / f".{MANIFEST_NAME}.tmp"
            staging.write_text(json.dumps(manifest, indent=2, sort_keys=True))
            staging.replace(out_dir / MANIFEST_NAME)
        model.train(was_training)
        records[part] = record
        if on_part is not None:
            on_part(record)
    return records


def _export_one(
    part: Part, graph: nn.Module, out_dir: Path, latent_hw: tuple[int, int], key: str,
    options: ExportOptions, meta: dict[str, Any],
) -> ExportRecord:
    path = out_dir / f"{part}.onnx"
    for stale in (path, path.with_name(path.name + ".data")):
        stale.unlink(missing_ok=True)
    args, input_names, output_names = _example_inputs(part, graph, height=latent_hw[0], width=latent_hw[1], options=options)
    external = _param_bytes(graph) > EXTERNAL_DATA_THRESHOLD_BYTES
    start = time.perf_counter()
    exporter = options.exporter
    with torch.no_grad():
        if exporter in ("auto", "dynamo"):
            try:
                _export_dynamo(graph, args, path, part, input_names, output_names, options.opset, external)
                exporter = "dynamo"
            except Exception as exc:
                if options.exporter == "dynamo":
                    raise
                log.warning("dynamo ONNX export of %r failed (%s: %s); using the TorchScript exporter",
                            part, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
                exporter = "torchscript"
                start = time.perf_counter()
        if exporter == "torchscript":
            _export_torchscript(graph, args, path, part, input_names, output_names, options.opset, external)
    export_s = time.perf_counter() - start
    external = path.with_name(path.name + ".data").is_file()
    log.info("exported %s partition with %s in %.1f s → %s", part, exporter, export_s, path)
    return ExportRecord(part, path, key, False, exporter, export_s, external)


def export_device_partitions(
    pipeline: Any,
    *,
    out_dir: Path,
    height: int,
    width: int,
    parts: Sequence[str] = PARTS,
    unet: nn.Module | None = None,
    vae: nn.Module | None = None,
    options: ExportOptions = ExportOptions(),
) -> dict[str, Path]:
    """Export the device partitions of ``pipeline`` (or of the given unet/vae) to ``out_dir``.

    ``unet``/``vae`` default to the pipeline's own (pass the device's models when they
    differ, e.g. MEG's merging decoder). Cached: a second call with the same weights and
    options re-uses the files. Returns ``{part: path of PART.onnx}``.
    """
    unet = unet if unet is not None else getattr(pipeline, "unet", None)
    vae = vae if vae is not None else getattr(pipeline, "vae", None)
    records = export_partitions(out_dir=out_dir, height=height, width=width, unet=unet, vae=vae, parts=parts, options=options)
    return {part: record.path for part, record in records.items()}
