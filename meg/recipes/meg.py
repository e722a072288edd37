"""MEG: the edge runs text encoding and the few-step UNet (ToMe inside); the device decodes.

"Accelerating Mobile Edge Generation by Constrained Learning" (PAPERS.md §1). The plan's
split point says where the pipeline is cut (`meg.split.points`; MEG's own is ``decoder``),
its codec chain how the crossing tensors are coded (a merge stage is MEG's token merging of
the final latent), its ``tome_ratio`` the token merging inside the edge UNet. Every crossing
tensor goes through the one feature path (`meg.split.features`); the device keeps a merged
latent merged and its runtime's decoder graph unmerges it.

Edge half: `SplitEngine.run_edge` → `send_feature` per tensor. Device half: decode what
arrived → `SplitEngine.run_device` in the device runtime; when the edge is lost, the whole
generation on the device (the ``device`` split) with the plan's steps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

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
from meg.recipes.plan import Plan
from meg.recipes.report import PartCost
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.features import LATENT_NAME, receive_feature, send_feature
from meg.split.flops import partition_flops
from meg.split.points import SplitPoint
from meg.v1 import generation_pb2 as gen_pb

__all__ = ["DEFAULT_STEPS", "DEVICE_DECODERS", "MegRecipe", "runtime_parts"]

DEFAULT_STEPS = 4
"""Denoising steps when nothing else says (the few-step student's)."""

DEVICE_DECODERS = ("", "vae", "vae_merge", "vae_merge_paper")
"""What the plan's ``decoder`` setting selects, by index: 0 the device's own decoder; else
the VAE folder of the device's model: 1 the stock decoder, 2 the merge-aware decoder, 3 the
decoder distilled as MEG's paper does. No single decoder is best at every step count and
merge ratio (docs/reproduction.md), so a plan may choose per request."""


def runtime_parts(split: SplitPoint) -> tuple[str, ...]:
    """Graph parts the device runtime needs for ``split``: the decoder, plus the UNet when
    the device runs denoising steps."""
    return ("decoder",) if split.kind in ("decoder", "image") else ("decoder", "unet")


def plan_decoder(plan: Plan) -> str | None:
    """The VAE folder a plan's ``decoder`` setting selects (None: the device's own)."""
    value = plan.params.get("decoder", 0.0)
    if value != int(value) or not 0 <= int(value) < len(DEVICE_DECODERS):
        known = ", ".join(f"{i}: {n or 'device default'}" for i, n in enumerate(DEVICE_DECODERS))
        raise InvalidInputError(f"plan.params decoder {value!r} is not one of 0..{len(DEVICE_DECODERS) - 1} ({known})",
                                field="plan.params")
    return DEVICE_DECODERS[int(value)] or None


class MegRecipe(Recipe):
    name = "meg"
    wire_id = gen_pb.RECIPE_MEG
    param_names = ("decoder",)

    def check_plan(self, ctx: EdgeContext, request: gen_pb.GenerationRequest, plan: Plan) -> None:
        super().check_plan(ctx, request, plan)
        plan_decoder(plan)
        engine: SplitEngine = ctx.engine
        engine.crossing(plan.split, inputs_from_request(request, plan.steps, default_size_px=engine.native_size_px))  # an impossible split fails here
        engine.tome.check_ratio(plan.tome_ratio)

    def run_edge(self, ctx: EdgeContext, job: EdgeJob) -> Iterator[Outgoing]:
        engine: SplitEngine = ctx.engine
        plan = job.plan
        inputs = inputs_from_request(job.request, plan.steps, default_size_px=engine.native_size_px)
        job.check_stop("while queued")
        started = time.perf_counter()
        crossing = engine.run_edge(inputs, plan.split, tome_ratio=plan.tome_ratio, on_progress=job.on_progress,
                                   should_stop=job.should_stop)
        compute_s = time.perf_counter() - started
        started = time.perf_counter()
        sent = [Outgoing(name, send_feature(tensor, plan.codec_chain, job.downlink, seed=inputs.seed, name=name))
                for name, tensor in crossing.items()]
        encode_s = time.perf_counter() - started
        flops = partition_flops(engine, plan.split, inputs, tome_ratio=plan.tome_ratio).edge_flops
        job.costs += [
            PartCost("edge.compute", "this-machine", compute_s, flops=flops, measured=True),
            PartCost("edge.encode", "this-machine", encode_s, measured=True),
            PartCost.modelled("edge.compute", load_profile(ctx.edge_profile), flops),
        ]
        yield from sent

    def device_half(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> DeviceHalf:
        return _MegDevice(ctx, request)


class _MegDevice(DeviceHalf):
    def __init__(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> None:
        self.ctx = ctx
        self.engine: SplitEngine = ctx.engine
        self.request = request
        self.received: dict[str, EncodedTensor] = {}
        self.expected: dict[str, tuple[int, ...]] = {}
        self.inputs: GenerationInputs | None = None

    def on_plan(self, plan: Plan) -> None:
        super().on_plan(plan)
        self.inputs = self._inputs(plan.steps)
        self.expected = {spec.name: spec.shape for spec in self.engine.crossing(plan.split, self.inputs)}

    def on_tensor(self, name: str, encoded: EncodedTensor) -> None:
        assert self.plan is not None
        if name not in self.expected:
            raise FramingError(f"edge sent tensor {name!r}; split {self.plan.split} needs {sorted(self.expected)}",
                               field="tensor_header.name")
        if tuple(encoded.shape) != self.expected[name]:
            raise FramingError(f"tensor {name!r} has shape {list(encoded.shape)}, expected {list(self.expected[name])}",
                               field="tensor_header.shape")
        self.received[name] = encoded

    def finish(self) -> DeviceOutput:
        assert self.plan is not None and self.inputs is not None
        missing = sorted(set(self.expected) - set(self.received))
        if missing:
            raise FramingError(f"edge sent no {missing} for split {self.plan.split}", field="tensor_header.name")
        started = time.perf_counter()
        split = self.plan.split
        # the latent stays merged for the decoder split: the runtime's graph unmerges it
        crossing = {name: receive_feature(enc, keep_merged=split.kind == "decoder" and name == LATENT_NAME)
                    for name, enc in self.received.items()}
        decode_s = time.perf_counter() - started
        return self._run(crossing, self.plan, self.inputs, decode_s)

    def fallback(self, reason: str) -> DeviceOutput:
        steps = self.plan.steps if self.plan is not None else DEFAULT_STEPS
        self.plan = Plan(split=SplitPoint("device"), steps=steps, policy="fallback")
        self.inputs = self._inputs(steps)
        return self._run({}, self.plan, self.inputs, 0.0)

    def _inputs(self, steps: int) -> GenerationInputs:
        return inputs_from_request(self.request, steps, default_size_px=self.engine.native_size_px)

    def reference(self) -> Any:
        assert self.inputs is not None
        return self.engine.run_full(self.inputs)

    def _run(self, crossing: dict[str, Any], plan: Plan, inputs: GenerationInputs, decode_s: float) -> DeviceOutput:
        started = time.perf_counter()
        decoder = plan_decoder(plan)
        runtime = (self.ctx.runtime(inputs.height, inputs.width, runtime_parts(plan.split), decoder) if decoder
                   else self.ctx.runtime(inputs.height, inputs.width, runtime_parts(plan.split)))
        setup_s = time.perf_counter() - started
        started = time.perf_counter()
        image = self.engine.run_device(crossing, inputs, plan.split, runtime=runtime)
        compute_s = time.perf_counter() - started
        flops = partition_flops(self.engine, plan.split, inputs).device_flops
        parts = [
            PartCost("device.receive_decode", "this-machine", decode_s, measured=True),
            PartCost("device.compute", "this-machine", compute_s, flops=flops, measured=True),
        ]
        if self.ctx.device_profile:
            parts.append(PartCost.modelled("device.compute", load_profile(self.ctx.device_profile), flops))
        return DeviceOutput(image=image, parts=parts, runtime=getattr(runtime, "name", "eager-torch"),
                            providers=tuple(getattr(runtime, "providers", ("torch-cpu",))), setup_s=setup_s)
