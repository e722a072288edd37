"""Hybrid SR: region-aware super-resolution split between the edge and the device.

"Enhancing Text-to-Image Generation via End-Edge Collaborative Hybrid Super-Resolution"
(Yi, Liang, Zhou, Yang; PAPERS.md §2). For a target resolution R̃ and SR scale S:

1. (edge, T1) generate at R = R̃/S with D denoising steps and decode;
2. (edge) partition the *latent* into a 4×4 grid ranked by spatial variance; the top
   fraction γ of cells is foreground (`meg.split.regions.partition_latent`);
3. (edge → device, T5) send every background cell of the low-resolution image, with an
   overlap margin, first;
4. (edge, T2 → device, T4) upscale each foreground cell with the diffusion SR model and send
   it as soon as it is done;
5. (device, T3) meanwhile upscale each background cell with the light SR model (ONNX
   Runtime), as it arrives;
6. (device) stitch all cells by feathered overlap-add into the R̃ image.

T = T1 + max(T2 + T4, T3 + T5): the background path overlaps the edge's diffusion SR. Each
tensor on the stream is named by its cell (``bg:5``, ``fg:10``); S = 1 sends the generated
image (``image``) without any SR (the paper's "w/o SR" baseline at R̃). Plan: ``steps`` = D,
``params["sr_scale"]`` = S, ``params["foreground_fraction"]`` = γ, ``codec_chain`` for every
patch. `run_hybrid_sr` is the same pipeline in one process: the served image equals it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from meg.codecs.chain import EncodedTensor, parse_chain
from meg.convert import inputs_from_request
from meg.devices import load_profile
from meg.errors import FramingError, InvalidInputError
from meg.recipes.base import (
    DeviceContext,
    DeviceHalf,
    DeviceOutput,
    EdgeContext,
    EdgeJob,
    Outgoing,
    Recipe,
)
from meg.recipes.meg import DEFAULT_STEPS
from meg.recipes.plan import Plan, plan_from_proto
from meg.recipes.report import PartCost
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.features import receive_feature, send_feature
from meg.split.flops import partition_flops
from meg.split.points import SplitPoint
from meg.split.regions import Patch, crop, grid_patches, partition_latent, stitch
from meg.v1 import generation_pb2 as gen_pb

__all__ = ["HybridSrConfig", "HybridSrRecipe", "HybridSrResult", "hybrid_plan", "run_hybrid_sr"]

SR_SCALES = (1, 2, 4)


@dataclass(frozen=True)
class HybridSrConfig:
    """Defaults of the Hybrid SR recipe (the paper's where it gives them)."""

    sr_scale: int = 4
    """S: R = R̃ / S."""
    foreground_fraction: float = 0.25
    """γ: fraction of the 4×4 cells upscaled by diffusion SR on the edge (paper: 0.25)."""
    grid: int = 4
    """Cells per side of the latent partition (paper: 4)."""
    margin_px: int = 4
    """Overlap margin of each patch, in low-resolution pixels (cross-fade over 2·margin·S)."""
    codec_chain: str = "fp16,zstd:3"
    """Chain every patch crosses the link with."""
    max_target_px: int = 1024
    """Largest target side the edge accepts."""


def hybrid_plan(*, steps: int = DEFAULT_STEPS, sr_scale: int = HybridSrConfig.sr_scale,
                foreground_fraction: float = HybridSrConfig.foreground_fraction,
                codec_chain: str = HybridSrConfig.codec_chain, policy: str = "override") -> Plan:
    """A Hybrid SR plan: D = ``steps``, S = ``sr_scale``, γ = ``foreground_fraction``."""
    return Plan(split=SplitPoint("image"), steps=steps, codec_chain=parse_chain(codec_chain).spec, policy=policy,
                params={"sr_scale": float(sr_scale), "foreground_fraction": float(foreground_fraction)})


@dataclass(frozen=True)
class _Settings:
    """A plan and request read as Hybrid SR settings (checked)."""

    scale: int
    gamma: float
    target_h: int
    target_w: int
    low: GenerationInputs
    """The generation at R = R̃ / S."""

    @classmethod
    def read(cls, engine: SplitEngine, request: gen_pb.GenerationRequest, plan: Plan,
             config: HybridSrConfig = HybridSrConfig()) -> _Settings:
        scale_value = plan.param("sr_scale", config.sr_scale)
        if scale_value not in SR_SCALES:
            raise InvalidInputError(f"plan.params['sr_scale'] = {scale_value:g} is not one of {SR_SCALES}",
                                    field="plan.params")
        scale = int(scale_value)
        gamma = plan.param("foreground_fraction", config.foreground_fraction)
        if not 0.0 <= gamma <= 1.0:
            raise InvalidInputError(f"plan.params['foreground_fraction'] = {gamma:g} is outside [0, 1]",
                                    field="plan.params")
        native = engine.native_size_px * scale  # without a size: the model's native R, upscaled
        target = inputs_from_request(request, plan.steps, default_size_px=native)
        for name, side in (("width", target.width), ("height", target.height)):
            if side > config.max_target_px:
                raise InvalidInputError(f"{name} {side} exceeds the Hybrid SR target limit {config.max_target_px} px",
                                        field=name)
            multiple = engine.vae_scale_factor * config.grid * scale
            if side % multiple:
                raise InvalidInputError(
                    f"{name} {side} is not a multiple of {multiple}: R = {name}/S (S = {scale}) must be a multiple "
                    f"of {engine.vae_scale_factor * config.grid} (VAE factor × grid)", field=name)
        low = GenerationInputs(prompt=target.prompt, negative_prompt=target.negative_prompt, seed=target.seed,
                               height=target.height // scale, width=target.width // scale, steps=plan.steps,
                               guidance_scale=target.guidance_scale)
        engine.check(low, SplitPoint("image"))
        return cls(scale, gamma, target.height, target.width, low)


# -- the models, loaded once per side -------------------------------------------------------------


class _Upscalers:
    """The diffusion upscaler (edge) behind a lock (it keeps scheduler state per call)."""

    def __init__(self, diffusion: Any) -> None:
        self.diffusion = diffusion
        self.lock = threading.Lock()

    def foreground(self, pixels: torch.Tensor, scale: int, seed: int, cell: int) -> torch.Tensor:
        # seeded by (request, cell): a patch's noise does not depend on the order cells run in
        generator = torch.Generator().manual_seed((seed * 1_000_003 + 7919 * (cell + 1)) % 2**63)
        with self.lock:
            return self.diffusion(pixels, scale, generator=generator)


def _diffusion_for(ctx: EdgeContext) -> _Upscalers:
    from meg.models.sr import load_diffusion_sr

    source = getattr(ctx.config, "sr_model", None) or ctx.model or "meg-tiny"
    return ctx.cached(f"hybrid-sr.diffusion:{source}", lambda: _Upscalers(load_diffusion_sr(source)))


def _light_for(ctx: DeviceContext, scale: int) -> tuple[Any, Any, str]:
    """(runner, torch model, runtime name) of the device's light SR at ``scale``."""
    from meg.models.sr import load_light_sr

    config = ctx.config
    source = getattr(config, "light_sr", None) or getattr(config, "model", None) or "meg-tiny"
    kind = getattr(config, "runtime", "eager")

    def load() -> tuple[Any, Any, str]:
        model = load_light_sr(source, scale=scale)
        if model.scale != scale:
            raise InvalidInputError(f"light SR model {source!r} upscales by {model.scale}, the plan needs {scale}",
                                    field="light_sr")
        if kind != "onnxruntime":
            return model, model, "torch"
        from meg.models.sr_onnx import LightSROnnx, export_light_sr

        cache = Path(getattr(config, "onnx_dir", Path.home() / ".cache" / "meg" / "onnx"))
        tag = Path(str(source)).name.replace(".", "_")
        path = export_light_sr(model, cache / "sr" / f"{tag}-x{scale}.onnx")
        return LightSROnnx(path), model, "onnxruntime"

    return ctx.cached(f"hybrid-sr.light:{source}:{scale}:{kind}", load)  # type: ignore[no-any-return]


def _light(runner: Any, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return runner(pixels).float().clamp(0, 1)


def _layout(settings: _Settings, config: HybridSrConfig = HybridSrConfig()) -> list[Patch]:
    return grid_patches(settings.low.height, settings.low.width, grid=config.grid, margin=config.margin_px)


def _generate_low(engine: SplitEngine, settings: _Settings, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(latent, decoded image) at R."""
    latents = engine.run_edge(settings.low, SplitPoint("decoder"), **kwargs)["latents"]
    with torch.no_grad():
        return latents, engine.decode(engine.vae, latents)


# -- the same pipeline in one process (the reference the served result equals) ---------------------


@dataclass
class HybridSrResult:
    image: torch.Tensor
    """[1, 3, R̃, R̃'] in [0, 1]."""
    low_res: torch.Tensor
    foreground_cells: list[int]


def run_hybrid_sr(engine: SplitEngine, diffusion: Any, light: Any, request: gen_pb.GenerationRequest,
                  plan: Plan) -> HybridSrResult:
    """Hybrid SR in one process, with the served recipe's functions and seeds."""
    settings = _Settings.read(engine, request, plan)
    latents, image = _generate_low(engine, settings)
    if settings.scale == 1:
        return HybridSrResult(image, image, [])
    if getattr(light, "scale", settings.scale) != settings.scale:
        raise InvalidInputError(f"light SR upscales by {light.scale}, the plan needs {settings.scale}", field="light_sr")
    cells = partition_latent(latents, foreground_fraction=settings.gamma).foreground_cells()
    upscalers = _Upscalers(diffusion)
    patches = _layout(settings)
    ups = [upscalers.foreground(crop(image, p.padded), settings.scale, settings.low.seed, p.cell) if p.cell in cells
           else _light(light, crop(image, p.padded)) for p in patches]
    out = stitch(ups, [p.scaled(settings.scale) for p in patches], settings.target_h, settings.target_w)
    return HybridSrResult(out, image, cells)


# -- the recipe ----------------------------------------------------------------------------------


class HybridSrRecipe(Recipe):
    name = "hybrid-sr"
    wire_id = gen_pb.RECIPE_HYBRID_SR
    param_names = ("sr_scale", "foreground_fraction")

    def check_plan(self, ctx: EdgeContext, request: gen_pb.GenerationRequest, plan: Plan) -> None:
        super().check_plan(ctx, request, plan)
        if parse_chain(plan.codec_chain).merge is not None:
            raise InvalidInputError(f"plan.codec_chain {plan.codec_chain!r}: Hybrid SR sends image patches, which "
                                    "take no merge stage", field="plan.codec_chain")
        settings = _Settings.read(ctx.engine, request, plan)
        if settings.scale > 1:
            _diffusion_for(ctx).diffusion.check_scale(settings.scale)  # loads the model once; a wrong S fails here

    def run_edge(self, ctx: EdgeContext, job: EdgeJob) -> Iterator[Outgoing]:
        engine: SplitEngine = ctx.engine
        settings = _Settings.read(engine, job.request, job.plan)
        profile = load_profile(ctx.edge_profile)
        chain, seed = job.plan.codec_chain, settings.low.seed
        job.check_stop("while queued")
        started = time.perf_counter()
        latents, image = _generate_low(engine, settings, on_progress=job.on_progress, should_stop=job.should_stop)
        generate_s = time.perf_counter() - started
        generate_flops = partition_flops(engine, SplitPoint("image"), settings.low).edge_flops
        job.costs += [PartCost("edge.compute", "this-machine", generate_s, flops=generate_flops, measured=True),
                      PartCost.modelled("edge.compute", profile, generate_flops)]
        if settings.scale == 1:
            yield Outgoing("image", send_feature(image, chain, job.downlink, seed=seed, name="image"))
            return
        partition = partition_latent(latents, foreground_fraction=settings.gamma)
        foreground = partition.foreground_cells()
        patches = {p.cell: p for p in _layout(settings)}
        # background first: the device upscales it while the edge runs diffusion SR
        for cell in partition.background_cells():
            pixels = crop(image, patches[cell].padded)
            yield Outgoing(f"bg:{cell}", send_feature(pixels, chain, job.downlink, seed=seed, name=f"bg:{cell}"))
        upscalers = _diffusion_for(ctx) if foreground else None
        sr_s, sr_flops = 0.0, 0.0
        for done, cell in enumerate(foreground):
            job.check_stop(f"before diffusion SR of cell {cell}")
            assert upscalers is not None
            pixels = crop(image, patches[cell].padded)
            started = time.perf_counter()
            up = upscalers.foreground(pixels, settings.scale, seed, cell)
            sr_s += time.perf_counter() - started
            sr_flops += upscalers.diffusion.flops(pixels.shape[-2], pixels.shape[-1], settings.scale)
            job.on_progress("diffusion_sr", done + 1, len(foreground))
            yield Outgoing(f"fg:{cell}", send_feature(up, chain, job.downlink, seed=seed, name=f"fg:{cell}"))
        job.costs += [PartCost("edge.sr", "this-machine", sr_s, flops=sr_flops, measured=True),
                      PartCost.modelled("edge.sr", profile, sr_flops)]

    def device_half(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> DeviceHalf:
        return _HybridDevice(ctx, request)

    def default_plan(self, observation: Any) -> Plan:
        return hybrid_plan(policy="hybrid-sr-default")

    def modelled_latency_s(self, parts: list[PartCost], extra: dict[str, Any]) -> float:
        """T = T1 + max(T2 + T4, T3 + T5) (Hybrid SR eq. 3), from the modelled parts; the link's
        airtime is shared between the foreground (T4) and background (T5) by their bytes."""
        info = extra.get("hybrid_sr", {})
        modelled = [p for p in parts if not p.measured]

        def total(part: str) -> float:
            return sum(p.latency_s for p in modelled if p.part == part)

        if "foreground_bytes" not in info:  # fallback or S = 1: nothing ran concurrently
            return sum(p.latency_s for p in modelled)
        link_s = total("link.downlink")
        fg_bytes, bg_bytes = info["foreground_bytes"], info["background_bytes"]
        share = fg_bytes / (fg_bytes + bg_bytes) if fg_bytes + bg_bytes else 0.0
        t4, t5 = link_s * share, link_s * (1 - share)
        rest = total("policy.decide") + total("link.uplink")
        return rest + total("edge.compute") + max(total("edge.sr") + t4, total("device.sr") + t5)


@dataclass
class _Timeline:
    """What the device measured, seconds from the start of the request."""

    started: float = field(default_factory=time.perf_counter)
    first_background_s: float | None = None
    last_foreground_s: float | None = None
    light_sr_intervals: list[tuple[float, float]] = field(default_factory=list)

    def now(self) -> float:
        return time.perf_counter() - self.started

    def overlap_s(self) -> float:
        """Light SR time spent while the edge was still sending foreground (both paths busy)."""
        end = self.last_foreground_s
        if end is None:
            return 0.0
        return sum(max(0.0, min(b, end) - a) for a, b in self.light_sr_intervals)


class _HybridDevice(DeviceHalf):
    def __init__(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> None:
        self.ctx = ctx
        self.engine: SplitEngine = ctx.engine
        self.request = request
        self.settings: _Settings | None = None
        self.patches: dict[int, Patch] = {}
        self.background: dict[int, Future[torch.Tensor]] = {}
        self.foreground: dict[int, torch.Tensor] = {}
        self.image: torch.Tensor | None = None
        self.bytes = {"foreground": 0, "background": 0}
        self.timeline = _Timeline()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="light-sr")
        self.light: Any = None

    def on_plan(self, plan: Plan) -> None:
        super().on_plan(plan)
        self.settings = _Settings.read(self.engine, self.request, plan)
        self.patches = {p.cell: p for p in _layout(self.settings)}
        if self.settings.scale > 1:
            self.light = _light_for(self.ctx, self.settings.scale)

    def _upscale_background(self, pixels: torch.Tensor) -> torch.Tensor:
        begin = self.timeline.now()
        out = _light(self.light[0], pixels)
        self.timeline.light_sr_intervals.append((begin, self.timeline.now()))
        return out

    def on_tensor(self, name: str, encoded: EncodedTensor) -> None:
        assert self.settings is not None
        kind, _, cell_text = name.partition(":")
        value = receive_feature(encoded)
        assert isinstance(value, torch.Tensor)
        if name == "image" and self.settings.scale == 1:
            expected = (1, 3, self.settings.low.height, self.settings.low.width)
            if tuple(value.shape) != expected:
                raise FramingError(f"image has shape {tuple(value.shape)}, expected {expected}", field="tensor_header.shape")
            self.image = value.float()
            return
        if kind not in ("bg", "fg") or not cell_text.isdigit() or int(cell_text) not in self.patches:
            raise FramingError(f"unexpected tensor {name!r} for Hybrid SR (cells bg:N / fg:N, N < {len(self.patches)})",
                               field="tensor_header.name")
        cell = int(cell_text)
        if cell in self.background or cell in self.foreground:
            raise FramingError(f"cell {cell} arrived twice", field="tensor_header.name")
        box = self.patches[cell].padded
        scale = self.settings.scale if kind == "fg" else 1
        expected = (1, 3, box.height * scale, box.width * scale)
        if tuple(value.shape) != expected:
            raise FramingError(f"{name} has shape {tuple(value.shape)}, expected {expected}", field="tensor_header.shape")
        if kind == "bg":
            self.timeline.first_background_s = self.timeline.first_background_s or self.timeline.now()
            self.bytes["background"] += len(encoded.payload) + len(encoded.params)
            self.background[cell] = self.pool.submit(self._upscale_background, value.float())
        else:
            self.timeline.last_foreground_s = self.timeline.now()
            self.bytes["foreground"] += len(encoded.payload) + len(encoded.params)
            self.foreground[cell] = value.float()

    def finish(self) -> DeviceOutput:
        assert self.settings is not None
        settings = self.settings
        if settings.scale == 1:
            if self.image is None:
                raise FramingError("edge sent no image", field="tensor_header.name")
            return DeviceOutput(self.image, [], extra={"hybrid_sr": {"sr_scale": 1}})
        missing = sorted(set(self.patches) - set(self.background) - set(self.foreground))
        if missing:
            raise FramingError(f"edge sent no patch for cells {missing}", field="tensor_header.name")
        return self._stitch({**{c: f.result() for c, f in self.background.items()}, **self.foreground},
                            foreground=sorted(self.foreground))

    def _stitch(self, ups: dict[int, torch.Tensor], *, foreground: list[int]) -> DeviceOutput:
        assert self.settings is not None
        settings = self.settings
        started = time.perf_counter()
        cells = sorted(self.patches)
        image = stitch([ups[c] for c in cells], [self.patches[c].scaled(settings.scale) for c in cells],
                       settings.target_h, settings.target_w)
        stitch_s = time.perf_counter() - started
        self.pool.shutdown(wait=False)
        light_model = self.light[1]
        background = [c for c in cells if c not in foreground]
        flops = sum(_light_flops(light_model, self.patches[c]) for c in background)
        light_s = sum(b - a for a, b in self.timeline.light_sr_intervals)
        parts = [PartCost("device.sr", "this-machine", light_s, flops=flops, measured=True),
                 PartCost("device.stitch", "this-machine", stitch_s, measured=True)]
        if self.ctx.device_profile:
            parts.append(PartCost.modelled("device.sr", load_profile(self.ctx.device_profile), flops))
        timeline = self.timeline
        extra = {"hybrid_sr": {
            "sr_scale": settings.scale, "foreground_fraction": settings.gamma,
            "low_res": [settings.low.height, settings.low.width], "foreground_cells": foreground,
            "foreground_bytes": self.bytes["foreground"], "background_bytes": self.bytes["background"],
            "measured_first_background_s": timeline.first_background_s,
            "measured_last_foreground_s": timeline.last_foreground_s,
            "measured_light_sr_s": light_s,
            "measured_overlap_s": timeline.overlap_s(),
        }}
        return DeviceOutput(image, parts, runtime=self.light[2],
                            providers=("CPUExecutionProvider",) if self.light[2] == "onnxruntime" else ("torch-cpu",),
                            extra=extra)

    def fallback(self, reason: str) -> DeviceOutput:
        """Generate at R on the device and upscale every cell with light SR."""
        if self.settings is None:  # no plan arrived: the request's own, else the recipe's default
            forced = self.request.HasField("plan_override")
            self.on_plan(plan_from_proto(self.request.plan_override, field="plan_override") if forced
                         else hybrid_plan(policy="fallback"))
        assert self.plan is not None
        steps = self.plan.steps
        self.plan = Plan(split=SplitPoint("device"), steps=steps, policy="fallback", params=dict(self.plan.params))
        assert self.settings is not None
        with torch.no_grad():
            low = self.engine.run_device({}, self.settings.low, SplitPoint("device"))
        if self.settings.scale == 1:
            return DeviceOutput(low, [], extra={"hybrid_sr": {"sr_scale": 1}})
        self.timeline = _Timeline()
        ups = {c: self._upscale_background(crop(low, p.padded)) for c, p in self.patches.items()}
        return self._stitch(ups, foreground=[])

    def reference(self) -> torch.Tensor | None:
        """The in-process Hybrid SR pipeline (edge's diffusion SR model needed here too)."""
        assert self.plan is not None and self.settings is not None
        from meg.models.sr import load_diffusion_sr

        config = self.ctx.config
        source = getattr(config, "sr_model", None) or getattr(config, "model", None) or "meg-tiny"
        diffusion = self.ctx.cached(f"hybrid-sr.diffusion:{source}", lambda: load_diffusion_sr(source))
        light = self.light[1] if self.light is not None else None
        return run_hybrid_sr(self.engine, diffusion, light, self.request, self.plan).image


def _light_flops(model: Any, patch: Patch) -> float:
    from meg.models.sr import light_sr_flops

    return float(light_sr_flops(model, patch.padded.height, patch.padded.width))
