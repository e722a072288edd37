"""A rule-based policy: the plan follows the link's SNR and the request's latency limit.

MEG's observation is the channel state (and the limits); the rules mirror what the
learned policy is expected to do: with a good link send the latent nearly losslessly,
with a worse one merge more tokens and quantise harder, and with a tight latency limit
take fewer denoising steps.
"""

from __future__ import annotations

from dataclasses import dataclass

from meg.v1 import generation_pb2 as gen_pb
from meg.v1 import policy_service_pb2 as policy_pb

__all__ = ["RuleBasedPolicy", "RulePolicyConfig"]


@dataclass(frozen=True)
class RulePolicyConfig:
    """Thresholds and choices of the rule-based policy."""

    steps: int = 4
    """Denoising steps without a tight latency limit."""
    min_steps: int = 2
    """Denoising steps when the latency limit is tight."""
    tight_latency_s: float = 1.0
    """A latency limit below this (seconds, > 0) counts as tight."""
    good_snr_db: float = 10.0
    """At or above this SNR the latent crosses unmerged."""
    poor_snr_db: float = 0.0
    """Below this SNR the latent is merged at `poor_merge_ratio`."""
    fair_merge_ratio: float = 0.25
    """Merge ratio between `poor_snr_db` and `good_snr_db`."""
    poor_merge_ratio: float = 0.5
    """Merge ratio below `poor_snr_db`."""
    good_chain: str = "fp16,zstd:3"
    """Codec chain on a good link."""
    degraded_chain: str = "int8,zstd:3"
    """Codec chain (after merging) on a fair or poor link."""


class RuleBasedPolicy:
    """`meg.policy.Policy` by fixed rules; always the MEG split (`decoder`)."""

    name = "rule-based"

    def __init__(self, config: RulePolicyConfig = RulePolicyConfig()) -> None:
        self.config = config

    def decide(self, observation: policy_pb.Observation) -> gen_pb.Plan:
        c = self.config
        snr_db = observation.channel.snr_db
        latency_s = observation.limits.latency_s
        steps = c.min_steps if 0 < latency_s < c.tight_latency_s else c.steps
        if snr_db >= c.good_snr_db:
            merge_ratio, chain = 0.0, c.good_chain
        elif snr_db >= c.poor_snr_db:
            merge_ratio, chain = c.fair_merge_ratio, c.degraded_chain
        else:
            merge_ratio, chain = c.poor_merge_ratio, c.degraded_chain
        return gen_pb.Plan(
            split=gen_pb.SplitPoint(kind=gen_pb.SPLIT_KIND_DECODER),
            steps=steps,
            merge_ratio=merge_ratio,
            codec_chain=chain,
            tome_ratio=0.0,
            policy=self.name,
        )
