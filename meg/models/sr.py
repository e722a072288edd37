"""Super-resolution models of Hybrid SR: a light CNN for the device, a diffusion upscaler for the edge.

- **Light SR** (`SRVGGNetCompact`): Real-ESRGAN's compact VGG-style network (Wang et al.
  2021): a 3×3 conv body with PReLU, a last conv to 3·S² channels, pixel shuffle, plus
  the input upsampled (the network learns the residual). The module's state-dict layout is
  Real-ESRGAN's (`body.N.weight`), so `load_light_sr` reads both the family's weights and a
  Real-ESRGAN `realesr-*-x4v3.pth` (SRVGGNetCompact) file.
- **Diffusion SR** (`DiffusionUpscaler`): a conditional pixel-space diffusion model as in
  SR3 / the SD ×4 upscaler: the low-resolution image is upsampled (bicubic) to the
  target size and concatenated to the noisy input of a diffusers `UNet2DModel`; the model
  denoises the *residual* over the bicubic image (SRDiff), so a few DDIM steps suffice.
  The scale is a class label (one model serves ×2 and ×4). A diffusers folder:
  `unet/` (+ `upscaler.json`) and `scheduler/`; in the meg-tiny family, `sr_unet/` and
  `sr_scheduler/`.

Images are float RGB in [0, 1], [B, 3, H, W]. Training lives in `meg.models.sr_train`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from meg.errors import InvalidInputError, ModelNotFoundError

__all__ = [
    "SR_SCALES",
    "DiffusionUpscaler",
    "LightSRConfig",
    "SRVGGNetCompact",
    "UpscalerConfig",
    "build_sr_unet",
    "light_sr_flops",
    "load_diffusion_sr",
    "load_light_sr",
    "save_light_sr",
    "upsample_bicubic",
]

SR_SCALES = (2, 4)
"""Scales the family's SR models are trained for."""


@dataclass(frozen=True)
class LightSRConfig:
    """Shape of a light SR network (the family's defaults; Real-ESRGAN's x4v3 is 64 / 32)."""

    scale: int = 4
    num_feat: int = 32
    """Channels of the conv body."""
    num_conv: int = 8
    """3×3 convs after the first (each followed by PReLU)."""
    base: Literal["nearest", "bilinear", "bicubic"] = "bicubic"
    """How the input is upsampled before the learned residual is added (Real-ESRGAN:
    nearest). Bicubic: a zero residual is already the bicubic baseline, so training only
    has to find what improves on it."""
    in_channels: int = 3
    out_channels: int = 3


class SRVGGNetCompact(nn.Module):
    """Real-ESRGAN's compact SR network: [B, C, h, w] in [0, 1] → [B, C, S·h, S·w]."""

    def __init__(self, config: LightSRConfig = LightSRConfig()) -> None:
        super().__init__()
        if config.scale < 1:
            raise InvalidInputError(f"light SR scale must be >= 1, got {config.scale}", field="scale")
        self.config = config
        c = config.num_feat
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, c, 3, 1, 1), nn.PReLU(num_parameters=c)]
        for _ in range(config.num_conv):
            layers += [nn.Conv2d(c, c, 3, 1, 1), nn.PReLU(num_parameters=c)]
        layers.append(nn.Conv2d(c, config.out_channels * config.scale**2, 3, 1, 1))
        self.body = nn.ModuleList(layers)
        self.upsampler = nn.PixelShuffle(config.scale)

    @property
    def scale(self) -> int:
        return self.config.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x
        for layer in self.body:
            out = layer(out)
        out = self.upsampler(out)
        if self.config.base == "nearest":
            base = F.interpolate(x, scale_factor=self.scale, mode="nearest")
        else:
            base = F.interpolate(x, scale_factor=self.scale, mode=self.config.base, align_corners=False)
        return out + base


def _light_config_from_state(state: dict[str, torch.Tensor]) -> LightSRConfig:
    """Infer a Real-ESRGAN SRVGGNetCompact's shape from its state dict (as spandrel does)."""
    convs = sorted({int(k.split(".")[1]) for k in state if k.startswith("body.") and k.endswith(".weight") and state[k].ndim == 4})
    if len(convs) < 2 or "body.0.weight" not in state:
        raise InvalidInputError("the weights are not an SRVGGNetCompact (no body.N conv weights)", field="light_sr")
    first, last = state["body.0.weight"], state[f"body.{convs[-1]}.weight"]
    in_ch, num_feat = int(first.shape[1]), int(first.shape[0])
    # out_channels · S² output channels; Real-ESRGAN models keep out_channels = in_channels
    scale_sq = int(last.shape[0]) // in_ch
    scale = round(scale_sq**0.5)
    if scale * scale * in_ch != int(last.shape[0]):
        raise InvalidInputError(f"last conv has {int(last.shape[0])} channels: not {in_ch}·S² for an integer scale", field="light_sr")
    if any(state[k].ndim == 1 and k.startswith("body.") and state[k].numel() == 1 for k in state):
        raise InvalidInputError("PReLU with one shared slope is not supported (only per-channel PReLU)", field="light_sr")
    return LightSRConfig(scale=scale, num_feat=num_feat, num_conv=len(convs) - 2, base="nearest", in_channels=in_ch, out_channels=in_ch)


def save_light_sr(model: SRVGGNetCompact, folder: Path) -> None:
    """`folder/config.json` + `folder/model.safetensors` (fp16)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"_class_name": "SRVGGNetCompact", **asdict(model.config)}, indent=1) + "\n")
    save_file({k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")


def load_light_sr(source: str | Path = "meg-tiny", *, scale: int = 4) -> SRVGGNetCompact:
    """A light SR model in eval mode, float32, on the CPU.

    Args:
        source: a model family name or folder (its `sr_light_x{scale}` component), a
            component folder (config.json + model.safetensors), or a Real-ESRGAN
            SRVGGNetCompact weights file (`.pth`, read with `torch.load(weights_only=True)`
            and unwrapped from "params_ema" / "params"; or `.safetensors`).
        scale: which of the family's models (ignored for a file or component folder).
    """
    from safetensors.torch import load_file

    path = Path(source)
    state: Any
    if path.is_file():
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            raw: Any = torch.load(path, map_location="cpu", weights_only=True)
            state = raw.get("params_ema", raw.get("params", raw)) if isinstance(raw, dict) else raw
        if not isinstance(state, dict):
            raise InvalidInputError(f"{str(path)!r} holds no state dict", field="light_sr")
        config = _light_config_from_state(state)
    else:
        folder = path if (path / "config.json").exists() else _family_component(str(source), f"sr_light_x{scale}")
        values = json.loads((folder / "config.json").read_text())
        values.pop("_class_name", None)
        config = LightSRConfig(**values)
        state = load_file(folder / "model.safetensors")
    model = SRVGGNetCompact(config)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _family_component(name: str, component: str) -> Path:
    """`component` of the family folder `name` (a path holding it, or a registered family)."""
    from meg.models.registry import model_dir

    if (Path(name) / component).is_dir():
        return Path(name) / component
    folder = model_dir(name) / component
    if not folder.exists():
        raise ModelNotFoundError(f"model family {name!r} has no {component} (train it with `meg train sr`)")
    return folder


def light_sr_flops(model: nn.Module, height: int, width: int) -> int:
    """FLOPs of one light SR pass over a [1, 3, height, width] input (2 per MAC)."""
    from meg.devices.flops import count_flops

    x = torch.zeros(1, 3, height, width)
    return count_flops(lambda: model(x))


# ------------------------------------------------------------------------ diffusion SR


@dataclass(frozen=True)
class UpscalerConfig:
    """How a diffusion upscaler's UNet reads and writes images (`upscaler.json` beside its config)."""

    scales: tuple[int, ...] = SR_SCALES
    """Scale of each class label (the UNet's num_class_embeds = len(scales)); () for a
    scale-agnostic UNet without class labels."""
    residual_scale: float = 4.0
    """The UNet works on (HR − bicubic(LR))·residual_scale (unit-ish variance)."""
    steps: int = 4
    """Default DDIM steps."""
    channels: tuple[int, ...] = field(default=(32, 64, 96))
    """UNet block_out_channels (used when building)."""


def build_sr_unet(config: UpscalerConfig = UpscalerConfig(), *, groups: int = 8) -> Any:
    """A diffusers UNet2DModel for `config`: in 6 channels (noisy residual + bicubic
    image), out 3, no attention (the model must run on patches of any size)."""
    from diffusers import UNet2DModel

    n = len(config.channels)
    return UNet2DModel(
        in_channels=6,
        out_channels=3,
        block_out_channels=config.channels,
        down_block_types=("DownBlock2D",) * n,
        up_block_types=("UpBlock2D",) * n,
        layers_per_block=1,
        norm_num_groups=groups,
        num_class_embeds=len(config.scales) or None,
        time_embedding_type="positional",
    )


class DiffusionUpscaler:
    """A conditional diffusion upscaler: `upscaler(low_res, scale, generator=g)`.

    Components are passed in (diffusers style): `unet` (UNet2DModel, 6 → 3 channels),
    `scheduler` (a diffusers scheduler with `set_timesteps` / `step`, e.g. DDIMScheduler).
    """

    def __init__(self, unet: Any, scheduler: Any, config: UpscalerConfig = UpscalerConfig()) -> None:
        if unet.config.in_channels != 6 or unet.config.out_channels != 3:
            raise InvalidInputError(f"upscaler UNet must map 6 to 3 channels, got {unet.config.in_channels} to {unet.config.out_channels}", field="sr_model")
        self.unet, self.scheduler, self.config = unet, scheduler, config
        self._levels = len(unet.config.block_out_channels)

    def check_scale(self, scale: int) -> None:
        """InvalidInputError naming `scale` unless the model serves it."""
        if self.config.scales and scale not in self.config.scales:
            raise InvalidInputError(f"diffusion SR serves scales {list(self.config.scales)}, got {scale}", field="sr_scale")
        if scale < 1:
            raise InvalidInputError(f"SR scale must be >= 1, got {scale}", field="sr_scale")

    def denoise(self, noisy: torch.Tensor, condition: torch.Tensor, t: torch.Tensor, scale: int) -> torch.Tensor:
        """One UNet call: noisy residual [B,3,H,W] + bicubic image in [-1, 1] [B,3,H,W] → model output."""
        labels = None
        if self.config.scales:
            labels = torch.full((noisy.shape[0],), self.config.scales.index(scale), dtype=torch.long, device=noisy.device)
        return self.unet(torch.cat([noisy, condition], dim=1), t, class_labels=labels).sample

    @torch.no_grad()
    def __call__(self, low_res: torch.Tensor, scale: int, *, steps: int | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:  # fmt: skip
        """Upscale [B, 3, h, w] in [0, 1] to [B, 3, S·h, S·w] in [0, 1].

        Args:
            low_res: the low-resolution images (any h, w ≥ 1; padded internally to the
                UNet's multiple and cropped back).
            scale: S, one of `config.scales`.
            steps: DDIM steps (default `config.steps`).
            generator: the CPU generator of the initial noise (same generator state, same
                output on the same runtime).
        """
        self.check_scale(scale)
        n_steps = steps or self.config.steps
        if n_steps < 1:
            raise InvalidInputError(f"diffusion SR steps must be >= 1, got {n_steps}", field="steps")
        if low_res.ndim != 4 or low_res.shape[1] != 3:
            raise InvalidInputError(f"low_res must be [B, 3, h, w], got {tuple(low_res.shape)}", field="low_res")
        dtype = next(self.unet.parameters()).dtype
        device = next(self.unet.parameters()).device
        # 1. condition: bicubic upsampling, padded (reflect) to the UNet's multiple
        base = upsample_bicubic(low_res.float(), scale)
        h, w = base.shape[-2:]
        multiple = 2 ** (self._levels - 1)
        pad_h, pad_w = (-h) % multiple, (-w) % multiple
        cond = F.pad(base * 2 - 1, (0, pad_w, 0, pad_h), mode="replicate").to(device, dtype)
        # 2. initial noise from the caller's generator, on the CPU (device independent)
        sample = torch.randn(cond.shape[0], 3, *cond.shape[-2:], generator=generator, dtype=torch.float32).to(device, dtype)
        self.scheduler.set_timesteps(n_steps)
        sample = sample * self.scheduler.init_noise_sigma
        # 3. denoising loop
        for t in self.scheduler.timesteps:
            model_in = self.scheduler.scale_model_input(sample, t)
            out = self.denoise(model_in, cond, t.to(device), scale)
            sample = self.scheduler.step(out, t, sample, generator=generator).prev_sample
        # 4. residual back to pixels
        residual = sample[..., :h, :w].float().cpu() / self.config.residual_scale
        return (base + residual).clamp(0, 1)

    def flops(self, height: int, width: int, scale: int, *, steps: int | None = None) -> int:
        """FLOPs of upscaling one [1, 3, height, width] image (`steps` UNet calls; the
        scheduler's element-wise updates are not counted)."""
        from meg.devices.flops import count_flops

        self.check_scale(scale)
        multiple = 2 ** (self._levels - 1)
        hh, ww = -(-height * scale // multiple) * multiple, -(-width * scale // multiple) * multiple
        p = next(self.unet.parameters())
        x = torch.zeros(1, 3, hh, ww, dtype=p.dtype, device=p.device)
        t = torch.tensor(500, device=p.device)
        one = count_flops(lambda: self.denoise(x, x, t, scale))
        return one * (steps or self.config.steps)

    def save(self, folder: Path, *, unet_name: str = "unet", scheduler_name: str = "scheduler") -> None:
        """Write the diffusers folder (fp16 UNet weights)."""
        state = {k: v.detach().clone() for k, v in self.unet.state_dict().items()}
        self.unet.to(torch.float16)
        self.unet.save_pretrained(folder / unet_name, safe_serialization=True)
        self.unet.to(torch.float32)
        self.unet.load_state_dict(state)
        self.scheduler.save_pretrained(folder / scheduler_name)
        values = asdict(self.config)
        (folder / unet_name / "upscaler.json").write_text(json.dumps(values, indent=1) + "\n")


def upsample_bicubic(images: torch.Tensor, scale: int) -> torch.Tensor:
    """Bicubic upsampling (antialias off, align_corners False), clamped to [0, 1]."""
    return F.interpolate(images, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)


def load_diffusion_sr(source: str | Path = "meg-tiny", *, torch_dtype: torch.dtype = torch.float32) -> DiffusionUpscaler:
    """A diffusion upscaler from a diffusers folder.

    Args:
        source: a model family name or folder (components `sr_unet/` + `sr_scheduler/`),
            or an upscaler folder with `unet/` (UNet2DModel, 6 → 3 channels, optional
            `upscaler.json`) and `scheduler/` (any diffusers scheduler; DDPM configs are
            sampled with DDIM).
    """
    from diffusers import DDIMScheduler, UNet2DModel

    path = Path(source)
    # a family folder also holds `unet/` (its text-to-image UNet): its upscaler is `sr_unet/`
    if (path / "unet").is_dir() and not (path / "model_index.json").exists():
        unet_dir, scheduler_dir = path / "unet", path / "scheduler"
    else:
        unet_dir, scheduler_dir = _family_component(str(source), "sr_unet"), _family_component(str(source), "sr_scheduler")
    if not (scheduler_dir / "scheduler_config.json").exists():
        raise ModelNotFoundError(f"upscaler folder {str(path)!r} has no scheduler at {scheduler_dir}")
    unet = UNet2DModel.from_pretrained(unet_dir, torch_dtype=torch_dtype).eval()
    scheduler = DDIMScheduler.from_pretrained(scheduler_dir)
    config_path = unet_dir / "upscaler.json"
    if config_path.exists():
        values: dict[str, Any] = json.loads(config_path.read_text())
        fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        config = UpscalerConfig(**fields)
    else:
        n_classes = unet.config.num_class_embeds or 0
        config = UpscalerConfig(scales=SR_SCALES[:n_classes] if n_classes else (), channels=tuple(unet.config.block_out_channels))
    return DiffusionUpscaler(unet, scheduler, config)
