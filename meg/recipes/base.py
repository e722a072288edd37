"""The recipe interface: what one published system supplies, and what the services give it.

A recipe is one module with one `Recipe` subclass, registered under its wire id
(`GenerationRequest.recipe`). The edge servicer and the device client know nothing else
about it: they check the request, obtain a `Plan`, and then

- on the edge (a worker thread): ``recipe.run_edge(ctx, job)`` yields `Outgoing` tensors,
  each already through the feature path (`meg.split.features.send_feature`); the servicer
  frames and sends each one as soon as it is yielded, so a recipe that streams (Hybrid SR:
  background patches first) overlaps its later work with the device's;
- on the device: ``recipe.device_half(ctx, request)`` returns a `DeviceHalf`, which may
  send tensors up (`uplink`), takes the plan and every tensor as it completes, and finishes
  the image (or falls back to generating alone when the edge is lost).

Costs are `PartCost` records (``edge.compute``/``device.compute``… measured on this machine
and modelled for the named device profiles); the services add the link's and the policy's.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from meg.channel.link import LinkConfig, LinkEmulator
from meg.codecs.chain import EncodedTensor
from meg.errors import InvalidInputError
from meg.recipes.plan import Plan
from meg.recipes.report import PartCost
from meg.split.features import SentFeature
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "DeviceContext",
    "DeviceHalf",
    "DeviceOutput",
    "EdgeContext",
    "EdgeJob",
    "ModelStore",
    "Outgoing",
    "Recipe",
    "UplinkInbox",
]

ProgressFn = Callable[[str, int, int], None]


class ModelStore:
    """Models and runtimes a recipe loads on first use, shared by every request of one side."""

    def __init__(self) -> None:
        self._items: dict[str, Any] = {}
        self._lock = threading.Lock()

    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        """The item under ``key``, loaded once by ``load()`` (thread-safe)."""
        with self._lock:
            if key not in self._items:
                self._items[key] = load()
            return self._items[key]


@dataclass
class EdgeContext:
    """What the edge server gives every recipe: the loaded pipeline's split engine, the
    edge's device profile name, and a per-server store for models a recipe loads lazily."""

    engine: Any
    """`meg.split.SplitEngine` of the served pipeline."""
    edge_profile: str
    """Device profile the edge's compute is modelled with."""
    model: str = ""
    """Name of the served pipeline (`load_pipeline` name or folder)."""
    config: Any = None
    """The edge's `EdgeConfig` (recipe options such as ``sr_model`` live there)."""
    store: ModelStore = field(default_factory=lambda: ModelStore())

    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        return self.store.cached(key, load)


class UplinkInbox:
    """Tensors the device sent up after ``start``, by name; the edge half waits on them."""

    def __init__(self) -> None:
        self._tensors: dict[str, EncodedTensor] = {}
        self._arrived = threading.Condition()
        self._closed = False

    def put(self, name: str, tensor: EncodedTensor) -> None:
        with self._arrived:
            self._tensors[name] = tensor
            self._arrived.notify_all()

    def close(self) -> None:
        """No more tensors will come (the request stream ended)."""
        with self._arrived:
            self._closed = True
            self._arrived.notify_all()

    def get(self, name: str, should_stop: Callable[[], bool]) -> EncodedTensor:
        """Wait for tensor ``name``; `InvalidInputError` if the stream ends without it."""
        with self._arrived:
            while name not in self._tensors:
                if self._closed:
                    raise InvalidInputError(f"the request stream ended without uplink tensor {name!r}",
                                            field="tensor_header.name")
                if should_stop():
                    from meg.errors import DeadlineExceededError

                    raise DeadlineExceededError(f"stopped while waiting for uplink tensor {name!r}")
                self._arrived.wait(0.05)
            return self._tensors[name]


@dataclass
class EdgeJob:
    """One request on the edge, as its recipe sees it."""

    request_id: str
    request: gen_pb.GenerationRequest
    plan: Plan
    link: LinkConfig
    """The link as emulated for this request (mode, SNR, bandwidth…)."""
    downlink: LinkEmulator
    """Seeded from the request; `send_feature` passes analog values through it."""
    on_progress: ProgressFn
    should_stop: Callable[[], bool]
    uplink: UplinkInbox
    costs: list[PartCost] = field(default_factory=list)
    """The recipe appends its compute parts (measured and modelled) here."""

    def check_stop(self, where: str) -> None:
        """Raise `DeadlineExceededError` when the request was cancelled or ran out of time."""
        if self.should_stop():
            from meg.errors import DeadlineExceededError

            raise DeadlineExceededError(f"request {self.request_id} stopped {where}")


@dataclass(frozen=True)
class Outgoing:
    """One tensor the edge half hands to the link, by its name at the cut."""

    name: str
    sent: SentFeature


@dataclass
class DeviceContext:
    """What the device client gives every recipe."""

    engine: Any
    """`meg.split.SplitEngine` of the device's pipeline."""
    runtime: Callable[..., Any]
    """``runtime(height, width, parts[, decoder])``: the device runtime for those graph parts
    ("decoder", "unet"), cached by the client (ONNX Runtime by default; None for eager
    torch); ``decoder`` names another VAE folder of the device's model to decode with."""
    device_profile: str | None
    config: Any = None
    """The client's `ClientConfig` (runtime kind, cache folder, recipe options such as ``light_sr``)."""
    store: ModelStore = field(default_factory=lambda: ModelStore())

    def cached(self, key: str, load: Callable[[], Any]) -> Any:
        return self.store.cached(key, load)


@dataclass
class DeviceOutput:
    """What the device half hands back: the image and the device's cost parts."""

    image: torch.Tensor
    """[1, 3, H, W] float32 in [0, 1]."""
    parts: list[PartCost]
    runtime: str = "eager-torch"
    providers: tuple[str, ...] = ("torch-cpu",)
    extra: dict[str, Any] = field(default_factory=dict)
    """Recipe-specific report section (e.g. Hybrid SR's timeline)."""
    setup_s: float = 0.0
    """One-off runtime set-up inside this call (e.g. ONNX export on first use), kept out of
    the measured wall time."""


class DeviceHalf(ABC):
    """One request on the device. Calls come in this order: `uplink` (before the edge is
    called), `on_plan`, `on_tensor` for each tensor as it completes, then `finish`; or
    `fallback` at any point when the edge is lost. Raising a `MegError` from `on_plan`,
    `on_tensor` or `finish` means "the edge sent something unusable" (the client falls back)."""

    plan: Plan | None = None

    def uplink(self) -> list[tuple[str, EncodedTensor]]:
        """Tensors to send to the edge after ``start`` (none by default)."""
        return []

    def on_plan(self, plan: Plan) -> None:
        self.plan = plan

    @abstractmethod
    def on_tensor(self, name: str, encoded: EncodedTensor) -> None:
        """A tensor arrived complete and verified (CRC, sizes); take it or raise."""

    @abstractmethod
    def finish(self) -> DeviceOutput:
        """Every tensor has arrived (the edge sent its report): finish the image."""

    @abstractmethod
    def fallback(self, reason: str) -> DeviceOutput:
        """The edge is lost: produce the image without it (``plan`` may be None)."""

    def fallback_plan(self) -> Plan:
        """The plan the fallback ran, for the report."""
        assert self.plan is not None
        return self.plan

    def reference(self) -> torch.Tensor | None:
        """The unsplit reference image for the report's quality section (None: no reference)."""
        return None


class Recipe(ABC):
    """One published system (see the module docstring)."""

    name: ClassVar[str]
    """Short name, e.g. "meg", "hybrid-sr"."""
    wire_id: ClassVar[int]
    """Its `meg.v1.Recipe` value."""
    uplink_names: ClassVar[tuple[str, ...]] = ()
    """Names of the tensors the device may send up; anything else is refused."""
    param_names: ClassVar[tuple[str, ...]] = ()
    """Names this recipe accepts in `Plan.params`."""

    def check_plan(self, ctx: EdgeContext, request: gen_pb.GenerationRequest, plan: Plan) -> None:
        """Raise a `MegError` naming the field when ``plan`` cannot run here (before queueing).

        The default checks the parameter names; recipes extend it."""
        unknown = sorted(set(plan.params) - set(self.param_names))
        if unknown:
            allowed = ", ".join(self.param_names) or "none"
            raise InvalidInputError(
                f"plan.params {unknown} are not settings of recipe {self.name!r} (it takes: {allowed})",
                field="plan.params",
            )

    @abstractmethod
    def run_edge(self, ctx: EdgeContext, job: EdgeJob) -> Iterator[Outgoing]:
        """The edge half (runs in a worker thread): yield each crossing tensor when ready."""

    @abstractmethod
    def device_half(self, ctx: DeviceContext, request: gen_pb.GenerationRequest) -> DeviceHalf:
        """A fresh device half for one request."""

    def default_plan(self, observation: Any) -> Plan | None:
        """The plan for a request of this recipe that a policy built for another recipe
        cannot plan (None: the policy's own plan is meant for this recipe)."""
        return None

    def modelled_latency_s(self, parts: list[PartCost], extra: dict[str, Any]) -> float:
        """End-to-end modelled latency from the report's parts: by default the parts run one
        after the other (their sum); a recipe whose parts overlap says how."""
        return sum(p.latency_s for p in parts if not p.measured)
