"""Rule-based planner: MEG's decoder split, merge ratio from SNR, most steps that fit the limits.

No learning and no distortion table: the merge ratio steps up as the SNR falls (fewer
bits when the link is poor), then the planner takes the largest step count whose
*modelled* latency and energy (the same `CostModel` the environment uses, at the observed
SNR) stay within (1 − margin) × limit. If no decoder plan fits it tries the device split
(no airtime), and failing that the cheapest decoder plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from meg.policy.costs import SPLIT_CODES
from meg.policy.env import PlanSimulator

__all__ = ["RuleAgent", "RuleConfig"]


@dataclass(frozen=True)
class RuleConfig:
    snr_thresholds_db: tuple[float, ...] = (10.0, 3.0, -3.0)
    """SNR edges between merge levels: ≥ first → merge_levels[0], …, below last → merge_levels[-1]."""
    merge_levels: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    """Merge ratio per SNR band (one more than thresholds)."""
    margin: float = 0.1
    """Fraction of each limit kept free."""


class RuleAgent:
    name = "rule"

    def __init__(self, config: RuleConfig = RuleConfig()) -> None:
        self.config = config

    def plan(self, sim: PlanSimulator, snr_db: np.ndarray, pixels: np.ndarray, latency_limit_s: np.ndarray,
             energy_limit_j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Plans ([B] plan index, [B] merge ratio) for observed SNR, size and limits ([B] arrays)."""
        c, space = self.config, sim.space
        band = np.searchsorted(-np.asarray(c.snr_thresholds_db), -np.asarray(snr_db), side="right")
        merge = np.asarray(c.merge_levels)[band]
        # candidate plans per request: decoder plans (nearest merge bin for the discrete head), then device
        decoder = np.flatnonzero(space.split == SPLIT_CODES.index("decoder"))
        device = np.flatnonzero(space.split == SPLIT_CODES.index("device"))
        b = len(snr_db)
        if sim.config.merge_head == "discrete" and decoder.size:
            cand_merge = space.merge_ratio[decoder][None, :].repeat(b, 0)
            keep = np.abs(cand_merge - merge[:, None]) == np.abs(cand_merge - merge[:, None]).min(1, keepdims=True)
        else:
            cand_merge = np.broadcast_to(merge[:, None], (b, decoder.size))
            keep = np.ones((b, decoder.size), dtype=bool)
        plans = np.concatenate([np.broadcast_to(decoder, (b, decoder.size)), np.broadcast_to(device, (b, device.size))], 1)
        merges = np.concatenate([cand_merge, np.zeros((b, device.size))], 1)
        keep = np.concatenate([keep, np.ones((b, device.size), dtype=bool)], 1)
        costs = sim.costs(space.split[plans], space.steps[plans], merges, np.asarray(snr_db)[:, None],
                          np.asarray(pixels)[:, None])
        fits = keep & (costs.latency_s <= (1 - c.margin) * latency_limit_s[:, None]) & (
            costs.energy_j <= (1 - c.margin) * energy_limit_j[:, None])
        is_decoder = space.split[plans] == SPLIT_CODES.index("decoder")
        # preference: decoder with most steps, then device with most steps, then cheapest decoder
        score = np.where(fits, space.steps[plans] + np.where(is_decoder, 100.0, 0.0), -np.inf)
        cheapest = np.argmin(np.where(keep & is_decoder, costs.latency_s, np.inf), axis=1)
        choice = np.where(np.isfinite(score).any(1), np.argmax(score, 1), cheapest)
        rows = np.arange(b)
        return plans[rows, choice], merges[rows, choice]

    def act(self, sim: PlanSimulator, obs: np.ndarray, *, deterministic: bool,
            generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        b = obs.shape[0]
        cfg = sim.config
        return self.plan(sim, obs[:, 0], obs[:, 3], np.full(b, cfg.latency_limit_s), np.full(b, cfg.energy_limit_j))
