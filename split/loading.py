"""Load a text-to-image pipeline by name or local folder, offline.

Three kinds of model argument:

- ``"tiny-random"``: built from configs in code (`meg.split.tiny`), seeded weights;
  ``"tiny-random-xl"``: the same at the SDXL layout (two text encoders).
- any other name: loaded by the registered model source that serves it
  (`meg.split.sources`); importing `meg.models` registers the project's own family, so
  ``"meg-tiny"`` loads wherever `meg.models` has been imported (the CLI and the services
  import it).
- a path to a local diffusers pipeline folder (``model_index.json`` at its root), e.g. an
  SD 1.5, SD-Turbo or SDXL snapshot. Loading never touches a hub: ``HF_HUB_OFFLINE`` is
  set when unset, ``local_files_only=True`` is always passed, and only safetensors
  weights are read (nothing is unpickled).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from diffusers import DiffusionPipeline

from meg.errors import ModelNotFoundError
from meg.split.sources import model_source_for, model_sources

__all__ = ["TINY_RANDOM", "TINY_RANDOM_XL", "load_pipeline", "native_size_px"]

TINY_RANDOM = "tiny-random"
TINY_RANDOM_XL = "tiny-random-xl"


def load_pipeline(model: str = TINY_RANDOM, *, torch_dtype: torch.dtype = torch.float32) -> Any:
    """Load a diffusers text-to-image pipeline (components in eval mode, on CPU).

    Args:
        model: ``"tiny-random"``, ``"tiny-random-xl"``, a local folder, or a name that a
            registered model source serves, such as ``"meg-tiny"``.
        torch_dtype: dtype of the weights.

    Returns:
        The pipeline (``StableDiffusionPipeline`` for SD-1.x/2.x layouts,
        ``StableDiffusionXLPipeline`` for SDXL folders).

    Raises:
        ModelNotFoundError: no source serves the name, the folder is missing or
            incomplete, or the source cannot load the name.
    """
    if model in (TINY_RANDOM, TINY_RANDOM_XL):
        from meg.split.tiny import build_tiny_random_pipeline, build_tiny_random_xl_pipeline

        pipeline = build_tiny_random_pipeline() if model == TINY_RANDOM else build_tiny_random_xl_pipeline()
        return pipeline if torch_dtype == torch.float32 else pipeline.to(dtype=torch_dtype)  # type: ignore[union-attr]  # DiffusionPipeline.to
    path = Path(model).expanduser()
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    source = model_source_for(model)
    if source is not None:
        # The source raises its own ModelNotFoundError (e.g. weights not trained yet).
        pipeline = source.load_pipeline(model)
        return pipeline if torch_dtype == torch.float32 else pipeline.to(dtype=torch_dtype)  # type: ignore[union-attr]  # DiffusionPipeline.to
    sources = ", ".join(s.name for s in model_sources()) or "none; importing meg.models registers meg-tiny"
    raise ModelNotFoundError(
        f"unknown model {model!r}: not {TINY_RANDOM!r}, not a local diffusers folder, "
        f"and no registered model source serves it (sources: {sources})"
    )


def native_size_px(pipeline: Any) -> int:
    """Image side length (pixels) the pipeline's UNet was built for: sample_size × VAE factor."""
    vae_scale = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    return int(pipeline.unet.config.sample_size) * vae_scale


def _load_folder(path: Path, torch_dtype: torch.dtype) -> Any:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(f"{str(path)!r} is not a diffusers pipeline folder (no model_index.json)")
    index = json.loads(index_file.read_text())
    # The hub library reads this once at import; local_files_only below is what guarantees
    # no network access whatever the import order was.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs: dict[str, Any] = {"local_files_only": True, "use_safetensors": True, "dtype": torch_dtype}
    if "safety_checker" in index:
        # The safety checker (a 1.2 GB CLIP vision model) and its image processor are not
        # part of any split.
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    if torch_dtype == torch.float16 and _only_fp16_variant(path / "unet"):
        kwargs["variant"] = "fp16"
    try:
        pipeline = DiffusionPipeline.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(f"cannot load pipeline folder {str(path)!r} offline: {exc}") from exc
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipeline, name, None)
        if module is not None:
            module.eval().requires_grad_(False)
    return pipeline


def _only_fp16_variant(component: Path) -> bool:
    """True when a component folder holds ``*.fp16.safetensors`` but no plain weights."""
    if not component.is_dir():
        return False
    names = [p.name for p in component.glob("*.safetensors")]
    return bool(names) and all(".fp16." in name for name in names)
