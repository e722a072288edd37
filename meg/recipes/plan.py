"""`Plan`: what a policy decided for one request, and its one converter to and from the wire.

A plan is recipe-neutral: the split point, the total denoising steps, the codec chain of
the tensors that cross (its merge stage is MEG's token merging of the latent), the ToMe
ratio inside the edge UNet, the deciding policy's name, and the recipe's own settings by
name in ``params`` (each recipe checks its names). The merge ratio lives only in the chain;
`Plan.merge_ratio` reads it from there, and `plan_from_proto` reconciles the wire's
separate ``merge_ratio`` field with the chain exactly once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from meg.codecs.chain import MergeStage, parse_chain
from meg.errors import InvalidInputError, MegError, SplitError
from meg.split.points import SplitKind, SplitPoint
from meg.v1 import generation_pb2 as gen_pb

__all__ = [
    "MEG_TOME_RATIO",
    "Plan",
    "make_plan",
    "plan_from_proto",
    "plan_to_proto",
    "split_from_proto",
    "split_to_proto",
]

MEG_TOME_RATIO = 0.5
"""ToMe ratio inside the edge UNet that MEG uses (paper: 0.5 on all transformer blocks)."""

_KIND_TO_PROTO: dict[SplitKind, Any] = {
    "device": gen_pb.SPLIT_KIND_DEVICE,
    "step": gen_pb.SPLIT_KIND_STEP,
    "decoder": gen_pb.SPLIT_KIND_DECODER,
    "image": gen_pb.SPLIT_KIND_IMAGE,
    "unet": gen_pb.SPLIT_KIND_UNET,
}
_KIND_FROM_PROTO: dict[int, SplitKind] = {v: k for k, v in _KIND_TO_PROTO.items()}


def split_from_proto(split: gen_pb.SplitPoint, *, field: str = "plan.split") -> SplitPoint:
    """Domain split point of a wire `SplitPoint`; an unknown kind raises `SplitError`."""
    kind = _KIND_FROM_PROTO.get(split.kind)
    if kind is None:
        raise SplitError(f"split kind {split.kind} is not a known SplitKind", field=f"{field}.kind")
    try:
        return SplitPoint(kind, int(split.index) if kind in ("step", "unet") else 0)
    except SplitError as exc:
        raise SplitError(exc.message, field=f"{field}.index") from exc


def split_to_proto(split: SplitPoint) -> gen_pb.SplitPoint:
    """Wire `SplitPoint` of a domain split point."""
    return gen_pb.SplitPoint(kind=_KIND_TO_PROTO[split.kind], index=split.index)


@dataclass(frozen=True)
class Plan:
    """One request's plan (see the module docstring)."""

    split: SplitPoint
    steps: int
    codec_chain: str = "none"
    """Canonical codec chain (`meg.codecs.chain`), merge stage included."""
    tome_ratio: float = 0.0
    policy: str = ""
    params: Mapping[str, float] = field(default_factory=dict)
    """Recipe-specific settings by name."""

    @property
    def merge(self) -> MergeStage | None:
        """The chain's merge stage, if any."""
        return parse_chain(self.codec_chain).merge

    @property
    def merge_ratio(self) -> float:
        merge = self.merge
        return merge.ratio if merge is not None else 0.0

    def param(self, name: str, default: float) -> float:
        return float(self.params.get(name, default))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plan (the report's ``plan``)."""
        return {
            "split": str(self.split),
            "steps": int(self.steps),
            "merge_ratio": self.merge_ratio,
            "codec_chain": self.codec_chain,
            "tome_ratio": float(self.tome_ratio),
            "policy": self.policy,
            "params": {k: float(v) for k, v in sorted(self.params.items())},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Plan:
        return cls(split=SplitPoint.parse(data["split"]), steps=int(data["steps"]), codec_chain=data["codec_chain"],
                   tome_ratio=float(data["tome_ratio"]), policy=str(data["policy"]),
                   params={str(k): float(v) for k, v in dict(data.get("params", {})).items()})


def _chain_with_merge(chain: str, merge_ratio: float, *, field: str) -> str:
    """``chain`` with a merge stage at ``merge_ratio`` (when > 0), checked against any merge
    stage it already has."""
    try:
        parsed = parse_chain(chain or "none")
    except MegError as exc:
        exc.field = f"{field}.codec_chain"
        raise
    if not math.isfinite(merge_ratio) or merge_ratio < 0:
        raise InvalidInputError(f"{field}.merge_ratio = {merge_ratio!r} must be finite and >= 0",
                                field=f"{field}.merge_ratio")
    if merge_ratio == 0 or (parsed.merge is not None and math.isclose(parsed.merge.ratio, merge_ratio, abs_tol=1e-9)):
        return parsed.spec
    if parsed.merge is not None:
        raise InvalidInputError(
            f"{field}.merge_ratio = {merge_ratio:g} disagrees with the codec chain's merge stage "
            f"{parsed.merge} ({parsed.spec!r}); set one of them",
            field=f"{field}.merge_ratio",
        )
    spec = f"merge:{merge_ratio:g}" + ("" if parsed.spec == "none" else f",{parsed.spec}")
    try:
        return parse_chain(spec).spec
    except MegError as exc:
        exc.field = f"{field}.merge_ratio"
        raise


def make_plan(
    split: str | SplitPoint,
    *,
    steps: int,
    codec_chain: str = "none",
    merge_ratio: float = 0.0,
    tome_ratio: float = 0.0,
    policy: str = "override",
    params: Mapping[str, float] | None = None,
) -> Plan:
    """A `Plan` from plain values, e.g. ``make_plan("decoder", steps=4, merge_ratio=0.5, codec_chain="int8")``;
    ``merge_ratio`` puts a merge stage in front of the chain."""
    point = split if isinstance(split, SplitPoint) else SplitPoint.parse(split)
    return Plan(split=point, steps=int(steps), codec_chain=_chain_with_merge(codec_chain, merge_ratio, field="plan"),
                tome_ratio=float(tome_ratio), policy=policy, params=dict(params or {}))


def plan_from_proto(plan: gen_pb.Plan, *, field: str = "plan") -> Plan:
    """The domain plan of a wire `Plan`; errors name the field at fault under ``field``."""
    split = split_from_proto(plan.split, field=f"{field}.split") if plan.HasField("split") else SplitPoint("decoder")
    params: dict[str, float] = {}
    for name, value in plan.params.items():
        if not math.isfinite(value):
            raise InvalidInputError(f"{field}.params[{name!r}] = {value!r} is not finite", field=f"{field}.params")
        params[name] = float(value)
    return Plan(split=split, steps=int(plan.steps),
                codec_chain=_chain_with_merge(plan.codec_chain, float(plan.merge_ratio), field=field),
                tome_ratio=float(plan.tome_ratio), policy=plan.policy, params=params)


def plan_to_proto(plan: Plan) -> gen_pb.Plan:
    """The wire `Plan` (``merge_ratio`` filled in from the chain for readers that want it)."""
    return gen_pb.Plan(split=split_to_proto(plan.split), steps=plan.steps, merge_ratio=plan.merge_ratio,
                       codec_chain=plan.codec_chain, tome_ratio=plan.tome_ratio, policy=plan.policy,
                       params=dict(plan.params))
