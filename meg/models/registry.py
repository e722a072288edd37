"""Load the embedded model families by name, offline, from package data.

A family lives in `meg/models/NAME/` as diffusers folders: `text_encoder`, `tokenizer`,
`vae` (stock), `vae_merge` (merge-aware decoder), `teacher_unet` + `teacher_scheduler`,
`unet` + `scheduler` (few-step student), `small_unet` (device). Weights are fp16
safetensors; they are loaded as float32 unless asked otherwise.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Literal

import torch

from meg.errors import InvalidInputError, ModelNotFoundError

__all__ = ["MODELS_ROOT", "available", "default_guidance", "default_steps", "load_pipeline", "load_small_unet", "model_dir"]

MODELS_ROOT = Path(__file__).resolve().parent
_REQUIRED = ("text_encoder", "tokenizer", "vae", "unet", "scheduler")


def _has_weights(folder: Path) -> bool:
    return all(any((folder / part).glob("*.safetensors")) or (folder / part / "tokenizer.json").exists() or (folder / part / "scheduler_config.json").exists() for part in _REQUIRED)


def available() -> list[str]:
    """Names of the families whose weights are present, e.g. ["meg-tiny"]."""
    return sorted(p.name for p in MODELS_ROOT.iterdir() if p.is_dir() and (p / "model_index.json").exists() and _has_weights(p))


def model_dir(name: str = "meg-tiny") -> Path:
    """The folder of family `name` (a name under MODELS_ROOT, or a folder path holding a
    family trained with `meg train --model-dir`); ModelNotFoundError naming it if absent."""
    folder = Path(name) if ("/" in name or name.startswith(".")) else MODELS_ROOT / name
    if not (folder / "model_index.json").exists() or not _has_weights(folder):
        raise ModelNotFoundError(f"model family {name!r} is not available (have: {available()})")
    return folder


def load_vae(model: str, folder: str, *, torch_dtype: torch.dtype = torch.float32):  # -> AutoencoderKL
    """The AutoencoderKL in FOLDER ("vae", "vae_merge", "vae_merge_paper", …) of a family
    name or of any diffusers model folder; InvalidInputError naming it if absent."""
    from diffusers import AutoencoderKL

    root = Path(model).expanduser()
    if not root.is_dir():
        root = model_dir(model)
    path = root / folder
    if not (path / "config.json").is_file():
        raise InvalidInputError(f"model {model!r} has no VAE folder {folder!r} (looked in {str(path)!r})", field="decoder")
    return AutoencoderKL.from_pretrained(path, torch_dtype=torch_dtype).eval()


def _training(name: str) -> dict:
    """The family's training.json (configs, stage records, tuned settings); {} if absent."""
    path = model_dir(name) / "training.json"
    return json.loads(path.read_text()) if path.exists() else {}


def default_steps(name: str = "meg-tiny") -> int:
    """Default number of student steps of family `name`."""
    return int(_training(name).get("family", {}).get("student_steps", 4))


def default_guidance(name: str = "meg-tiny", unet: Literal["student", "teacher"] = "student") -> float:
    """The guidance scale the student (or teacher) was distilled for, or the one chosen on
    the validation prompts by `meg eval tune` (recorded under "tuned" in training.json)."""
    key = f"{unet}_guidance"
    training = _training(name)
    tuned = training.get("tuned", {}).get(key)
    if tuned is not None:
        return float(tuned["value"])
    return float(training.get("family", {}).get(key, 2.5 if unet == "student" else 4.0))


def load_pipeline(
    name: str = "meg-tiny",
    *,
    unet: Literal["student", "teacher"] = "student",
    merge_decoder: bool = True,
    torch_dtype: torch.dtype = torch.float32,
):  # -> StableDiffusionPipeline (diffusers imported lazily)
    """A StableDiffusionPipeline of family `name`.

    Args:
        unet: "student" (few-step, LCMScheduler) or "teacher" (DDIM, tens of steps).
        merge_decoder: use the merge-aware decoder (`vae_merge`) instead of the stock VAE decoder.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        LCMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, PreTrainedTokenizerFast

    if unet not in ("student", "teacher"):
        raise InvalidInputError(f"unet must be 'student' or 'teacher', got {unet!r}")
    folder = model_dir(name)
    if unet == "teacher":
        unet_dir, scheduler = folder / "teacher_unet", DDIMScheduler.from_pretrained(folder / "teacher_scheduler")
    else:
        unet_dir, scheduler = folder / "unet", LCMScheduler.from_pretrained(folder / "scheduler")
    if not unet_dir.exists():
        raise ModelNotFoundError(f"model family {name!r} has no {unet} UNet at {unet_dir}")
    vae_dir = folder / "vae_merge" if merge_decoder and (folder / "vae_merge").exists() else folder / "vae"
    if merge_decoder and vae_dir.name != "vae_merge":
        warnings.warn(f"model family {name!r} has no merge-aware decoder; using the stock VAE decoder", stacklevel=2)
    pipe: Any = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch_dtype),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", torch_dtype=torch_dtype),
        tokenizer=PreTrainedTokenizerFast.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=torch_dtype),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_small_unet(name: str = "meg-tiny", *, torch_dtype: torch.dtype = torch.float32):  # -> UNet2DConditionModel
    """The device UNet of family `name` (same latent space, text encoder and scheduler as the student)."""
    from diffusers import UNet2DConditionModel

    folder = model_dir(name) / "small_unet"
    if not folder.exists():
        raise ModelNotFoundError(f"model family {name!r} has no small UNet at {folder}")
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch_dtype)
