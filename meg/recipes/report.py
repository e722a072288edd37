"""`GenerationReport`: one schema for every generation, whatever the recipe (DESIGN.md §4).

The device client builds it from the edge's `EdgeReport` and its own measurements;
``to_dict``/``from_dict`` give its JSON form (``report.json``), whose JSON Schema is
``docs/report.schema.json`` (a test validates `meg demo`'s output against it). Units are
in the names: seconds, joules, bytes, FLOPs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meg.errors import InvalidInputError
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "BytesRecord",
    "ChannelRecord",
    "DeviceRecord",
    "EnergyRecord",
    "FallbackRecord",
    "GenerationReport",
    "LatencyRecord",
    "PartCost",
    "QualityRecord",
    "TensorRecord",
    "quality_vs_reference",
]


@dataclass(frozen=True)
class PartCost:
    """Latency and energy of one part of a generation, e.g. ``edge.compute`` on
    ``rtx-3080-ti`` (modelled) or on ``this-machine`` (measured)."""

    part: str
    profile: str
    latency_s: float
    energy_j: float = 0.0
    flops: float = 0.0
    measured: bool = False

    def to_proto(self) -> gen_pb.PartCost:
        return gen_pb.PartCost(part=self.part, profile=self.profile, latency_s=self.latency_s, energy_j=self.energy_j,
                               flops=self.flops, measured=self.measured)

    @classmethod
    def from_proto(cls, cost: gen_pb.PartCost) -> PartCost:
        return cls(cost.part, cost.profile, cost.latency_s, cost.energy_j, cost.flops, cost.measured)

    @classmethod
    def modelled(cls, part: str, profile: Any, flops: float) -> PartCost:
        """``part`` on device profile ``profile`` (`meg.devices.DeviceProfile`) for ``flops``."""
        if flops <= 0:
            return cls(part, profile.name, 0.0, 0.0, 0.0, False)
        return cls(part, profile.name, profile.compute_latency_s(flops), profile.compute_energy_j(flops), flops, False)


@dataclass(frozen=True)
class TensorRecord:
    """One tensor that crossed the link."""

    name: str
    codec_chain: str
    shape: list[int]
    dtype: str
    raw_bytes: int
    encoded_bytes: int
    direction: str = "downlink"


@dataclass(frozen=True)
class FallbackRecord:
    used: bool = False
    reason: str | None = None


@dataclass(frozen=True)
class ChannelRecord:
    """The channel state the request carried, and what the emulated link did."""

    mode: str
    fading: str
    snr_db: float
    bandwidth_hz: float
    distance_m: float
    rate_bps: float
    rician_k: float
    tx_power_dbm: float
    downlink_airtime_s: float = 0.0
    retransmissions: int = 0
    feature_snr_db: float | None = None


@dataclass(frozen=True)
class BytesRecord:
    downlink: int = 0
    uplink: int = 0
    tensors: list[TensorRecord] = field(default_factory=list)


@dataclass(frozen=True)
class LatencyRecord:
    modelled_total: float
    """Sum of the modelled parts' latencies (the parts run one after the other unless the
    recipe says otherwise in ``extra``)."""
    measured_edge_call: float
    measured_wall: float
    measured_runtime_setup: float


@dataclass(frozen=True)
class EnergyRecord:
    modelled_edge: float
    modelled_link: float
    modelled_device: float
    modelled_total: float


@dataclass(frozen=True)
class DeviceRecord:
    profile: str | None
    runtime: str
    providers: list[str]


@dataclass(frozen=True)
class QualityRecord:
    reference: str
    mse_vs_reference: float
    psnr_db: float | None
    """None when the image equals the reference."""
    max_abs_diff: float


def quality_vs_reference(image: Any, reference: Any, description: str) -> QualityRecord:
    """MSE, PSNR (peak 1) and largest difference of two [1, 3, H, W] images in [0, 1]."""
    diff = image.float() - reference.float()
    mse = float((diff**2).mean())
    return QualityRecord(description, mse, 10 * math.log10(1.0 / mse) if mse > 0 else None, float(diff.abs().max()))


@dataclass
class GenerationReport:
    """The report of one generation (see the module docstring)."""

    request_id: str
    recipe: str
    prompt: str
    seed: int
    width: int
    height: int
    edge_addresses: list[str]
    plan: dict[str, Any]
    """`meg.recipes.plan.Plan.to_dict()` of the plan that ran."""
    fallback: FallbackRecord
    channel: ChannelRecord
    bytes: BytesRecord
    parts: list[PartCost]
    latency_s: LatencyRecord
    energy_j: EnergyRecord
    device: DeviceRecord
    quality: QualityRecord | None = None
    served_by: str = ""
    """The edge replica whose answer was used (its `meg-replica` name), or "device" after a fallback."""
    retries: list[str] = field(default_factory=list)
    """Earlier attempts of this request, one line each: the replica and why it failed."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Recipe- or tool-specific sections (e.g. ``hybrid_sr``, ``demo``)."""

    @staticmethod
    def totals(parts: Sequence[PartCost]) -> tuple[float, EnergyRecord]:
        """Modelled latency sum and energy split (edge / link / device) of ``parts``."""
        modelled = [p for p in parts if not p.measured]

        def energy(prefix: str) -> float:
            return sum(p.energy_j for p in modelled if p.part.startswith(prefix))

        return (sum(p.latency_s for p in modelled),
                EnergyRecord(energy("edge."), energy("link."), energy("device."), sum(p.energy_j for p in modelled)))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, path: Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationReport:
        """Inverse of `to_dict` (e.g. for a ``report.json`` read back); anything that is not
        such a report is refused with `InvalidInputError` naming what is wrong."""
        try:
            return cls._from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidInputError(f"not a MEG generation report: {type(exc).__name__}: {exc}", field="report") from None

    @classmethod
    def _from_dict(cls, data: Mapping[str, Any]) -> GenerationReport:
        b = data["bytes"]
        quality = data.get("quality")
        return cls(
            request_id=data["request_id"], recipe=data["recipe"], prompt=data["prompt"], seed=int(data["seed"]),
            width=int(data["width"]), height=int(data["height"]), edge_addresses=list(data["edge_addresses"]),
            plan=dict(data["plan"]), fallback=FallbackRecord(**data["fallback"]), channel=ChannelRecord(**data["channel"]),
            bytes=BytesRecord(b["downlink"], b["uplink"], [TensorRecord(**t) for t in b["tensors"]]),
            parts=[PartCost(**p) for p in data["parts"]], latency_s=LatencyRecord(**data["latency_s"]),
            energy_j=EnergyRecord(**data["energy_j"]), device=DeviceRecord(**data["device"]),
            quality=QualityRecord(**quality) if quality else None, served_by=str(data.get("served_by", "")),
            retries=[str(r) for r in data.get("retries", [])], extra=dict(data.get("extra", {})),
        )

    @classmethod
    def load(cls, path: Path) -> GenerationReport:
        return cls.from_dict(json.loads(Path(path).read_text()))
