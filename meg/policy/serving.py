"""The in-process `Policy` interface: Observation proto in, Plan proto out.

`PolicyService` serves the same objects over gRPC. Two kinds exist: the rule-based
planner (`rule_policy()`), and learned planners loaded from a checkpoint
(`load_policy(path)`: CVPO, PPO-Lagrangian, unconstrained). `decide` is a feature
computation, one small MLP forward pass and a proto construction; `meg bench policy`
measures its latency.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from meg.errors import InvalidInputError
from meg.policy.costs import SPLIT_CODES
from meg.policy.env import EnvConfig, PlanSimulator, features
from meg.recipes.plan import MEG_TOME_RATIO, make_plan, plan_to_proto
from meg.v1 import generation_pb2, policy_service_pb2

__all__ = ["AgentPolicy", "Policy", "RulePolicy", "load_policy", "packaged_checkpoint", "plan_proto", "rule_policy"]

class Policy(Protocol):
    name: str

    def decide(self, observation: policy_service_pb2.Observation) -> generation_pb2.Plan: ...


def plan_proto(split: str, steps: int, merge_ratio: float, policy: str, *,
               tome_ratio: float = MEG_TOME_RATIO, decoder: str = "") -> generation_pb2.Plan:
    """The wire plan of a planner's choice: the decoder split merges the latent at
    ``merge_ratio`` (the chain's merge stage); the edge UNet runs ToMe at ``tome_ratio``
    whenever the edge denoises (MEG: 0.5); ``decoder`` (a VAE folder, `DEVICE_DECODERS`)
    is the device decoder the plan chose ("": the device's own)."""
    from meg.recipes.meg import DEVICE_DECODERS

    merge = float(merge_ratio) if split == "decoder" else 0.0
    params = {"decoder": float(DEVICE_DECODERS.index(decoder))} if decoder and split == "decoder" else None
    plan = make_plan(split, steps=int(steps), merge_ratio=merge, codec_chain="fp16",
                     tome_ratio=tome_ratio if split != "device" else 0.0, policy=policy, params=params)
    return plan_to_proto(plan)


def _chosen_decoder(sim: PlanSimulator | None, split: str, steps: int, merge: float, snr_db: float) -> str:
    """The device decoder a planner with several decoder tables picks for a plan ("" if one)."""
    if sim is None or not sim.decoder_tables or split != "decoder":
        return ""
    return sim.best_decoder(steps, merge, snr_db)


@functools.cache
def _hybrid_controller() -> Any:
    from meg.policy.hybrid_sr import HybridSrPolicy

    return HybridSrPolicy()


def _recipe_default(observation: policy_service_pb2.Observation) -> generation_pb2.Plan | None:
    """The plan of a recipe these planners were not built for (they plan MEG): Hybrid SR's
    controller for a Hybrid SR request with a size (a batch of one), else the recipe's default."""
    from meg.recipes.registry import recipe_for

    if observation.recipe in (generation_pb2.RECIPE_UNSPECIFIED, generation_pb2.RECIPE_MEG):
        return None
    if observation.recipe == generation_pb2.RECIPE_HYBRID_SR and (observation.width or observation.height):
        return _hybrid_controller().decide(observation)  # type: ignore[no-any-return]
    plan = recipe_for(observation.recipe, field="observation.recipe").default_plan(observation)
    return plan_to_proto(plan) if plan is not None else None


class _Observed:
    """Physical observation and limits read from an Observation proto."""

    def __init__(self, observation: policy_service_pb2.Observation, config: EnvConfig, link_budget: Any) -> None:
        ch = observation.channel
        if ch.snr_db != 0.0 or not ch.distance_m:
            self.snr_db = float(ch.snr_db)
        else:  # only the distance was measured: path-loss SNR
            self.snr_db = float(link_budget.snr_db(float(ch.distance_m)))
        for name in ("previous_latency_s", "previous_energy_j"):
            value = getattr(observation, name)
            if not np.isfinite(value) or value < 0:
                raise InvalidInputError(f"{name} must be finite and >= 0, got {value!r}", field=name)
        if not np.isfinite(self.snr_db):
            raise InvalidInputError(f"channel.snr_db must be finite, got {self.snr_db!r}", field="channel.snr_db")
        self.previous_latency_s = float(observation.previous_latency_s)
        self.previous_energy_j = float(observation.previous_energy_j)
        # the cost model knows the sizes the policy was built for: use the nearest
        pixels = float(observation.width * observation.height) or float(config.resolutions[0] ** 2)
        sizes = np.asarray(config.resolutions, dtype=np.float64) ** 2
        self.pixels = float(sizes[np.argmin(np.abs(np.log(sizes) - np.log(pixels)))])
        lim = observation.limits
        self.latency_limit_s = float(lim.latency_s) if lim.latency_s > 0 else config.latency_limit_s
        self.energy_limit_j = float(lim.energy_j) if lim.energy_j > 0 else config.energy_limit_j


class RulePolicy:
    """`meg.policy.rule.RuleAgent` behind the Policy interface (uses the request's limits)."""

    def __init__(self, env_config: EnvConfig | None = None, *, simulator: PlanSimulator | None = None) -> None:
        from meg.policy.rule import RuleAgent

        # served requests come in every size and may run on any split: the extended environment
        self.sim = simulator if simulator is not None else PlanSimulator(env_config or EnvConfig.preset("extended"))
        self.agent = RuleAgent()
        self.name = "rule"

    def decide(self, observation: policy_service_pb2.Observation) -> generation_pb2.Plan:
        if (other := _recipe_default(observation)) is not None:
            return other
        o = _Observed(observation, self.sim.config, self.sim.link_budget)
        plan, merge = self.agent.plan(self.sim, np.array([o.snr_db]), np.array([o.pixels]),
                                      np.array([o.latency_limit_s]), np.array([o.energy_limit_j]))
        space = self.sim.space
        i = int(plan[0])
        split, steps = SPLIT_CODES[space.split[i]], int(space.steps[i])
        return plan_proto(split, steps, float(merge[0]), self.name,
                          decoder=_chosen_decoder(self.sim, split, steps, float(merge[0]), o.snr_db))


class AgentPolicy:
    """A learned agent's actor behind the Policy interface (deterministic: the most likely plan).

    The actor was trained for the limits in its environment configuration; the request's
    limits are not an input of the network.
    """

    def __init__(self, agent: Any, env_config: EnvConfig, name: str) -> None:
        from meg.channel.pathloss import MEG_LINK_BUDGET
        from meg.policy.env import PlanSpace

        self.agent, self.config, self.name = agent, env_config, name
        self.space = PlanSpace.from_config(env_config)
        # the decoder tables' lookup, when the planner was trained to choose among decoders
        self.sim = PlanSimulator(env_config) if env_config.decoder_tables else None
        self.link_budget = MEG_LINK_BUDGET
        self.actor = agent.actor.eval()

    @torch.no_grad()
    def decide(self, observation: policy_service_pb2.Observation) -> generation_pb2.Plan:
        if (other := _recipe_default(observation)) is not None:
            return other
        o = _Observed(observation, self.config, self.link_budget)
        x = torch.from_numpy(features(np.array(o.snr_db), np.array(o.previous_latency_s),
                                      np.array(o.previous_energy_j), np.array(o.pixels), self.config))
        if hasattr(self.agent, "action_map"):  # a deterministic continuous actor (DDPG-Lagrangian)
            plan, merges = self.agent.action_map(self.actor(x[None]).numpy())
            i, merge = int(plan[0]), float(merges[0])
        else:
            logits, mean, _ = self.actor(x[None])
            i = int(logits[0].argmax())
            if self.config.merge_head == "continuous":
                merge = float(self.config.max_merge_ratio * torch.sigmoid(mean[0]))
            else:
                merge = float(self.space.merge_ratio[i])
        split, steps = SPLIT_CODES[self.space.split[i]], int(self.space.steps[i])
        return plan_proto(split, steps, merge, self.name, tome_ratio=self.config.edge_tome_ratio or MEG_TOME_RATIO,
                          decoder=_chosen_decoder(self.sim, split, steps, merge, o.snr_db))


def rule_policy(env_config: EnvConfig | None = None) -> RulePolicy:
    return RulePolicy(env_config)


def packaged_checkpoint(name: str = "cvpo") -> Path:
    """Folder of a checkpoint shipped with the package (meg/policy/checkpoints/NAME)."""
    return Path(str(resources.files("meg.policy") / "checkpoints" / name))


def load_policy(checkpoint: str | Path) -> Policy:
    """A Policy from a checkpoint folder (`meg policy train` output), "rule", "cvpo" (the CVPO
    checkpoint shipped with the package, trained on the default environment), or "hybrid-sr"
    (Hybrid SR's annealing controller, joint over `DecideBatch`; MEG requests by the rules)."""
    if str(checkpoint) == "rule":
        return rule_policy()
    if str(checkpoint) == "hybrid-sr":
        from meg.policy.hybrid_sr import HybridSrPolicy

        return HybridSrPolicy(other=rule_policy())
    if str(checkpoint) == "cvpo":
        checkpoint = packaged_checkpoint("cvpo")
    from meg.policy.checkpoint import load_checkpoint
    from meg.policy.cvpo import CVPOAgent
    from meg.policy.ppo_lagrangian import PPOAgent

    ckpt = load_checkpoint(checkpoint)
    if ckpt.algo == "cvpo":
        agent: Any = CVPOAgent.from_checkpoint(ckpt)
    elif ckpt.algo in ("ppo-lagrangian", "unconstrained"):
        agent = PPOAgent.from_checkpoint(ckpt)
    elif ckpt.algo == "ddpg-lagrangian":
        from meg.policy.ddpg_lagrangian import DDPGAgent

        agent = DDPGAgent.from_checkpoint(ckpt)
    else:
        raise InvalidInputError(f"checkpoint {str(checkpoint)!r} holds unknown algorithm {ckpt.algo!r}")
    return AgentPolicy(agent, ckpt.env_config, ckpt.algo)
