"""Preview–refine: the device previews every prompt round, the edge refines the last one.

"DiffusionX: cloud–edge collaborative multi-round generation" (PAPERS.md §3). A user edits
the prompt over several rounds; the device's small model renders a fast preview of each
(`meg.session.PreviewSession` keeps the rounds). When the user settles:

1. (device → edge) the last preview *latent* goes up the link as uplink tensor
   ``preview`` (the plan's codec chain without its merge stage, ``fp16`` by default);
2. (edge) img2img at strength s = ``plan.params["strength"]``: re-noise the preview to the
   first kept timestep of a ``plan.steps`` schedule and denoise the remaining
   ``int(s · steps)`` steps with the edge's UNet (`SplitEngine.run_img2img`);
3. (edge → device) the refined latent crosses as ``latents`` (decoder split: the plan's
   chain, merge stage included);
4. (device) decodes it.

When the edge is lost the device keeps its last preview as the result; the report's
``extra["preview_refine"]["refined"]`` is False and ``fallback`` gives the reason.

The device half finds the preview the session staged for the request's id
(`PreviewRefineRecipe.stage_preview`); a request without one (a plain
`DeviceClient.generate`) previews first on the device with the previewer, in one call.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from meg.codecs.chain import EncodedTensor
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
from meg.recipes.plan import Plan, make_plan
from meg.recipes.report import PartCost
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.features import LATENT_NAME, chain_for_tensor, receive_feature, send_feature
from meg.split.flops import partition_flops
from meg.split.points import SplitPoint
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "PREVIEW_NAME",
    "PreviewRefineConfig",
    "PreviewRefineRecipe",
    "check_prompt",
    "preview_engine",
    "preview_refine_plan",
]

PREVIEW_NAME = "preview"
"""The uplink tensor: the preview latent [1, C, h, w]."""


@dataclass(frozen=True)
class PreviewRefineConfig:
    """Defaults of the recipe (the plan and the session read them from here)."""

    strength: float = 0.75
    """Refine strength when the plan gives none: on meg-tiny's 200 held-out prompts the refine
    at 0.75 came within 0.025 of the edge's from-scratch fidelity (0.654 vs 0.679) at 3 of
    4 steps, where 0.5 reached 0.538 (docs/preview-refine.md)."""
    refine_steps: int = DEFAULT_STEPS
    """Length of the edge's schedule; img2img runs ``int(strength · refine_steps)`` of it."""
    preview_steps: int = 2
    """Denoising steps of a device preview."""
    uplink_chain: str = "fp16"
    """Codec chain of the uplinked preview when the plan gives none."""


def preview_refine_plan(*, strength: float = PreviewRefineConfig.strength, steps: int = PreviewRefineConfig.refine_steps,
                        codec_chain: str = "fp16", policy: str = "preview-refine-default") -> Plan:
    """A preview–refine plan: decoder split, ``steps`` schedule, refine at ``strength``."""
    return make_plan("decoder", steps=steps, codec_chain=codec_chain, policy=policy, params={"strength": strength})


def check_prompt(prompt: str, tokenizer: Any) -> None:
    """`InvalidInputError` (field ``prompt``) for an empty prompt or one with words the
    tokenizer does not know (word-level vocabularies map them to the unknown token)."""
    if not prompt.strip():
        raise InvalidInputError("prompt is empty: a round needs words to preview", field="prompt")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    from meg.split.tome import object_lock

    with object_lock(tokenizer):
        unknown = [w for w in prompt.split() if unk in tokenizer(w, add_special_tokens=False).input_ids]
    if unknown:
        raise InvalidInputError(f"prompt has words the model does not know: {unknown}", field="prompt")


def preview_engine(pipeline: Any, model: str | None) -> tuple[SplitEngine, str]:
    """The device's preview engine (its ``device_unet`` is the previewer) and the previewer's
    name: family ``model``'s small UNet when it has one that fits the pipeline (same latent
    channels and text width), else the pipeline's own UNet."""
    previewer, name = None, "pipeline-unet"
    if model:
        from meg.errors import ModelNotFoundError
        from meg.models.registry import load_small_unet

        try:
            previewer, name = load_small_unet(model), f"{model}/small_unet"
        except ModelNotFoundError:
            previewer = None
        if previewer is not None and any(previewer.config[k] != pipeline.unet.config[k]
                                         for k in ("in_channels", "cross_attention_dim")):
            # the client was handed another family's pipeline: its own UNet previews
            previewer, name = None, "pipeline-unet"
    return SplitEngine(pipeline, device_unet=previewer), name


def _strength(plan: Plan) -> float:
    return float(plan.param("strength", PreviewRefineConfig.strength))


class PreviewRefineRecipe(Recipe):
    name = "preview-refine"
    wire_id = gen_pb.RECIPE_PREVIEW_REFINE
    uplink_names = (PREVIEW_NAME,)
    param_names = ("strength",)

    def __init__(self) -> None:
        self._staged: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    # -- device-side hand-over from the session ---------------------------------------------
    def stage_preview(self, request_id: str, latent: torch.Tensor) -> None:
        """The preview latent the device half of request ``request_id`` sends up."""
        with self._lock:
            self._staged[request_id] = latent

    def take_staged(self, request_id: str) -> torch.Tensor | None:
        """Remove and return the preview staged for ``request_id`` (None if none)."""
        with self._lock:
            return self._staged.pop(request_id, None)

    # -- edge ------------------------------------------------------------------------------
    def check_plan(self, ctx: EdgeContext, request: gen_pb.GenerationRequest, plan: Plan) -> None:
        super().check_plan(ctx, request, plan)
        check_prompt(request.prompt, ctx.engine.tokenizer)
        if plan.split.kind != "decoder":
            raise InvalidInputError(f"plan.split {plan.split}: preview-refine sends the refined latent (decoder split)",
                                    field="plan.split")
        strength = _strength(plan)
        if not 0.0 < strength <= 1.0:
            raise InvalidInputError(f"plan.params strength {strength} must be in (0, 1]", field="plan.params")
        if SplitEngine.img2img_steps(plan.steps, strength) < 1:
            raise InvalidInputError(f"plan.params strength {strength} leaves no step of {plan.steps}",
                                    field="plan.params")

    def run_edge(self, ctx: EdgeContext, job: EdgeJob) -> Iterator[Outgoing]:
        engine: SplitEngine = ctx.engine
        plan = job.plan
        inputs = inputs_from_request(job.request, plan.steps, default_size_px=engine.native_size_px)
        preview = receive_feature(job.uplink.get(PREVIEW_NAME, job.should_stop))
        assert isinstance(preview, torch.Tensor)
        expected = engine.latent_shape(inputs)
        if tuple(preview.shape) != expected:
            raise InvalidInputError(f"uplinked preview has shape {list(preview.shape)}, expected {list(expected)}",
                                    field="tensor_header.shape")
        if not preview.is_floating_point():
            raise InvalidInputError(f"uplinked preview has dtype {preview.dtype}, expected a float latent",
                                    field="tensor_header.dtype")
        strength = _strength(plan)
        job.check_stop("while queued")
        started = time.perf_counter()
        refined = engine.run_img2img(inputs, preview, strength, on_progress=job.on_progress,
                                     should_stop=job.should_stop)
        compute_s = time.perf_counter() - started
        kept = SplitEngine.img2img_steps(plan.steps, strength)
        flops = partition_flops(engine, SplitPoint("decoder"), _with_steps(inputs, kept)).edge_flops
        job.costs += [
            PartCost("edge.compute", "this-machine", compute_s, flops=flops, measured=True),
            PartCost.modelled("edge.compute", load_profile(ctx.edge_profile), flops),
        ]
        yield Outgoing(LATENT_NAME, send_feature(refined, plan.codec_chain, job.downlink, seed=inputs.seed))

    def default_plan(self, observation: Any) -> Plan:
        return preview_refine_plan()

    # -- device ----------------------------------------------------------------------------
    def device_half(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> DeviceHalf:
        return _PreviewRefineDevice(ctx, request, self.take_staged(request.request_id))


def _with_steps(inputs: GenerationInputs, steps: int) -> GenerationInputs:
    from dataclasses import replace

    return replace(inputs, steps=steps)


def _device_preview_engine(ctx: DeviceContext) -> tuple[SplitEngine, str]:
    model = getattr(ctx.config, "model", None)
    return ctx.cached("preview-refine:previewer", lambda: preview_engine(ctx.engine.pipeline, model))  # type: ignore[no-any-return]


class _PreviewRefineDevice(DeviceHalf):
    def __init__(self, ctx: DeviceContext, request: gen_pb.GenerationRequest, preview: torch.Tensor | None) -> None:
        self.ctx = ctx
        self.engine: SplitEngine = ctx.engine
        self.request = request
        self.info: dict[str, Any] = {"preview_source": "session" if preview is not None else "this-request"}
        self.preview_parts: list[PartCost] = []
        if preview is None:
            preview = self._preview_here()
        self.preview = preview
        self.received: EncodedTensor | None = None

    def _preview_here(self) -> torch.Tensor:
        engine, name = _device_preview_engine(self.ctx)
        config = PreviewRefineConfig()
        inputs = inputs_from_request(self.request, config.preview_steps, default_size_px=self.engine.native_size_px)
        check_prompt(inputs.prompt, engine.tokenizer)
        started = time.perf_counter()
        latent = engine.generate_latents(inputs, unet=engine.device_unet)
        self.preview_parts.append(PartCost("device.preview", "this-machine", time.perf_counter() - started,
                                           measured=True))
        if self.ctx.device_profile:
            flops = partition_flops(engine, SplitPoint("device"), inputs).device_flops
            self.preview_parts.append(PartCost.modelled("device.preview", load_profile(self.ctx.device_profile), flops))
        self.info["previewer"] = name
        return latent

    def uplink(self) -> list[tuple[str, EncodedTensor]]:
        chain = PreviewRefineConfig.uplink_chain
        if self.request.HasField("plan_override") and self.request.plan_override.codec_chain:
            chain = self.request.plan_override.codec_chain
        sent = send_feature(self.preview, chain_for_tensor(PREVIEW_NAME, chain), None, seed=int(self.request.seed),
                            name=PREVIEW_NAME)
        return [(PREVIEW_NAME, sent.encoded)]

    def on_tensor(self, name: str, encoded: EncodedTensor) -> None:
        assert self.plan is not None
        inputs = self._inputs(self.plan.steps)
        expected = self.engine.latent_shape(inputs)
        if name != LATENT_NAME:
            raise FramingError(f"edge sent tensor {name!r}; preview-refine needs {LATENT_NAME!r}",
                               field="tensor_header.name")
        if tuple(encoded.shape) != expected:
            raise FramingError(f"tensor {name!r} has shape {list(encoded.shape)}, expected {list(expected)}",
                               field="tensor_header.shape")
        self.received = encoded

    def finish(self) -> DeviceOutput:
        assert self.plan is not None
        if self.received is None:
            raise FramingError(f"edge sent no {LATENT_NAME!r}", field="tensor_header.name")
        inputs = self._inputs(self.plan.steps)
        started = time.perf_counter()
        latent = receive_feature(self.received, keep_merged=True)
        receive_s = time.perf_counter() - started
        strength = _strength(self.plan)
        self.info.update(refined=True, strength=strength,
                         refine_steps=SplitEngine.img2img_steps(self.plan.steps, strength))
        return self._decode(latent, inputs, receive_s)

    def fallback(self, reason: str) -> DeviceOutput:
        # the last preview is the result: the user already saw it, and it costs nothing more
        self.plan = make_plan("device", steps=PreviewRefineConfig.preview_steps, policy="fallback")
        self.info.update(refined=False, reason=reason)
        return self._decode(self.preview, self._inputs(self.plan.steps), 0.0)

    def reference(self) -> torch.Tensor | None:
        """The refine in one process (same preview, strength, seed), decoded in torch."""
        if self.plan is None or self.plan.split.kind != "decoder":
            return None
        inputs = self._inputs(self.plan.steps)
        refined = self.engine.run_img2img(inputs, self.preview, _strength(self.plan))
        return self.engine.decode(self.engine.device_vae, refined)

    def _inputs(self, steps: int) -> GenerationInputs:
        return inputs_from_request(self.request, steps, default_size_px=self.engine.native_size_px)

    def _decode(self, latent: Any, inputs: GenerationInputs, receive_s: float) -> DeviceOutput:
        started = time.perf_counter()
        runtime = self.ctx.runtime(inputs.height, inputs.width, ("decoder",))
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        image = self.engine.run_device({LATENT_NAME: latent}, inputs, SplitPoint("decoder"), runtime=runtime)
        compute_s = time.perf_counter() - started
        flops = partition_flops(self.engine, SplitPoint("decoder"), inputs).device_flops
        parts = [*self.preview_parts,
                 PartCost("device.receive_decode", "this-machine", receive_s, measured=True),
                 PartCost("device.compute", "this-machine", compute_s, flops=flops, measured=True)]
        if self.ctx.device_profile:
            parts.append(PartCost.modelled("device.compute", load_profile(self.ctx.device_profile), flops))
        return DeviceOutput(image=image, parts=parts, runtime=getattr(runtime, "name", "eager-torch"),
                            providers=tuple(getattr(runtime, "providers", ("torch-cpu",))), setup_s=setup_s,
                            extra={"preview_refine": dict(self.info)})
