"""MEG's constrained MDP (PAPERS.md §1, "Constrained MDP"), batched and as a gymnasium Env.

One step is one generation request. The state is what the device measured and what the
request asks for: received SNR (path loss over a drifting distance plus time-correlated
fading), the previous request's latency and energy, and the image size. The action is a
plan: split point × total steps, and a token-merge ratio either from a discrete set (one
categorical head over whole plans) or continuous (a categorical over split × steps and a
Gaussian over the ratio). The reward is −log MSE of the image against the reference,
interpolated from a measured `DistortionTable`; the two costs are latency (s) and energy
(J) from `CostModel`. An episode is `episode_length` requests; the constraint is on the
episode's average cost, and an episode *violates* a limit when its average exceeds it.

The channel evolves independently of the plans, so the same seed gives the same channel
for every policy: comparisons run on identical episodes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from meg.codecs.merge import MAX_MERGE_RATIO
from meg.errors import InvalidInputError
from meg.policy.costs import SPLIT_CODES, CostModel
from meg.policy.distortion import MERGED_SPLITS, DistortionTable, load_table

__all__ = ["ENV_PRESETS", "OBS_DIM", "EnvConfig", "MegPlanEnv", "PlanSimulator", "PlanSpace", "StepResult", "features"]

OBS_DIM = 4  # snr_db, previous latency, previous energy, megapixels


@dataclass(frozen=True)
class EnvConfig:
    """Every default of the environment lives here; the defaults are the paper's MDP.

    `EnvConfig()` is MEG's constrained MDP as the paper defines it (PAPERS.md §1): SDXL at
    1024², the decoder split only, steps L ∈ 4…12 and a merge ratio per request, i.i.d.
    distance U[200, 300] m over an AWGN path-loss channel, token noise σ = 0.1 on the merged
    features, ToMe at 0.5 inside the edge UNet, reward −log MSE, limits 3 s and 1.8 kJ per
    request on average over 64-request episodes. `EnvConfig.preset("extended")` switches on
    this framework's extensions by name (split-point action, two sizes, Rician fading with
    a drifting distance, σ from the SNR, the MSE offset in the reward).
    """

    table: str = "meg-tiny-paper"
    """Distortion table: packaged model name or a JSON path."""
    decoder_tables: tuple[str, ...] = ()
    """Further distortion tables, each measured with another device decoder (e.g.
    "meg-tiny-paper-stock"): a merged-split request is then decoded by whichever decoder the
    tables say is best at its steps, merge ratio and σ (the plan chooses the decoder; the
    device knows all three). Empty: the one decoder of `table`."""
    edge_profile: str = "a100-sxm4"
    """`meg.devices` profile of the edge server."""
    device_profile: str = "meg-paper-ue"
    """`meg.devices` profile of the user device (paper: half the edge's throughput)."""
    episode_length: int = 64
    """Requests per episode (paper: 64)."""
    latency_limit_s: float = 3.0
    """Limit on the episode's average latency per request, seconds (paper: 3 s)."""
    energy_limit_j: float = 1800.0
    """Limit on the episode's average energy per request (edge + device), joules (paper: 1.8 kJ)."""
    resolutions: tuple[int, ...] = (1024,)
    """Square image sizes requests draw from (uniformly); the table must hold their FLOPs (paper: 1024)."""
    splits: tuple[str, ...] = ("decoder",)
    """Split points the policy chooses from (paper: the decoder split only; extension: all of SPLIT_CODES)."""
    steps: tuple[int, ...] = (4, 5, 6, 7, 8, 9, 10, 11, 12)
    """Total denoising steps the policy chooses from (paper: L = int(8·a0) + 4 ∈ 4…12)."""
    merge_ratios: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75)
    """Merge-ratio bins of the discrete head (the continuous head covers [0, max])."""
    max_merge_ratio: float = MAX_MERGE_RATIO
    """Largest token-merge ratio (bipartite matching merges at most 3 of 4 tokens)."""
    merge_head: Literal["discrete", "continuous"] = "continuous"
    """How the merge ratio is chosen (paper: continuous, a1 ∈ [0, 1] clipped at the merge's 0.75)."""
    guidance_passes: int = 2
    """UNet passes per step (classifier-free guidance)."""
    distance_min_m: float = 200.0
    """Closest user (paper: d ~ U[200, 300] m)."""
    distance_max_m: float = 300.0
    """Farthest user."""
    distance_model: Literal["iid", "walk"] = "iid"
    """"iid": a fresh distance U[min, max] per request (paper); "walk": a reflecting random walk
    with `distance_step_m` between consecutive requests (extension: users move)."""
    distance_step_m: float = 5.0
    """Std of the distance drift between consecutive requests (distance_model="walk")."""
    fading: Literal["awgn", "rayleigh", "rician"] = "awgn"
    """Small-scale fading on top of path loss (paper: none drawn; extension: Rician)."""
    rician_k: float = 3.0
    """Rician K-factor (linear) for fading="rician"."""
    fading_correlation: float = 0.9
    """Correlation of consecutive fading gains (Gauss–Markov ρ)."""
    reward_mse_offset: float = 0.0
    """Reward = −log(MSE + offset); 0 is the paper's −log MSE. MSE is of [0, 1] images, so 1e-3
    (the extension) is 30 dB PSNR against the reference: closer than that, an image is not
    visibly better, and −log MSE would still pay up to ~14 nats (MSE → 0 at the reference's
    own step count) for it, so a constrained policy would starve some requests to make others
    bit-exact."""
    feature_noise: Literal["fixed", "snr"] = "fixed"
    """Token noise σ of the analog feature link. "fixed": `feature_sigma` for every request
    (paper: Gaussian noise of std 0.1 on the transmitted tokens at test; the SNR sets the
    rate only). "snr" (extension): σ = 10^(−(SNR + feature_gain_db)/20), the noise of an
    analog link at the received SNR after a processing gain."""
    feature_sigma: float = 0.1
    """σ of feature_noise="fixed" (paper: 0.1)."""
    feature_gain_db: float = 15.0
    """Processing gain of feature_noise="snr": 15 dB maps the paper's SNR range
    (+2.2…−4.4 dB) onto σ ≈ 0.14…0.30, inside the decoder's training range U(0.05, 0.32)."""
    edge_tome_ratio: float = 0.5
    """ToMe ratio inside the edge UNet (paper: 0.5 on all transformer blocks). The distortion
    table must have been measured at it; the edge's UNet FLOPs are counted with it."""

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> EnvConfig:
        """A named configuration: "paper" (the defaults) or "extended" (this framework's
        extensions switched on), with field overrides."""
        if name not in ENV_PRESETS:
            raise InvalidInputError(f"unknown environment preset {name!r}; known: {sorted(ENV_PRESETS)}")
        return cls(**{**ENV_PRESETS[name], **overrides})

    def __post_init__(self) -> None:
        if self.episode_length < 1:
            raise InvalidInputError(f"episode_length must be >= 1, got {self.episode_length!r}")
        if self.latency_limit_s <= 0 or self.energy_limit_j <= 0:
            raise InvalidInputError(
                f"limits must be > 0, got latency_limit_s={self.latency_limit_s!r}, energy_limit_j={self.energy_limit_j!r}")
        unknown = [s for s in self.splits if s not in SPLIT_CODES]
        if unknown or not self.splits:
            raise InvalidInputError(f"splits {list(self.splits)} must be a non-empty subset of {SPLIT_CODES}")
        if not self.steps or min(self.steps) < 1:
            raise InvalidInputError(f"steps {list(self.steps)} must be positive")
        if not 0.0 <= self.max_merge_ratio <= MAX_MERGE_RATIO:
            raise InvalidInputError(f"max_merge_ratio must be in [0, {MAX_MERGE_RATIO}], got {self.max_merge_ratio!r}")
        if any(not 0.0 <= m <= self.max_merge_ratio for m in self.merge_ratios) or not self.merge_ratios:
            raise InvalidInputError(f"merge_ratios {list(self.merge_ratios)} must lie in [0, {self.max_merge_ratio}]")
        if self.distance_min_m <= 0 or self.distance_max_m < self.distance_min_m:
            raise InvalidInputError(f"distance range [{self.distance_min_m}, {self.distance_max_m}] m is empty")
        if not self.reward_mse_offset >= 0.0:
            raise InvalidInputError(f"reward_mse_offset must be >= 0, got {self.reward_mse_offset!r}")
        if not -1.0 <= self.fading_correlation <= 1.0:
            raise InvalidInputError(f"fading_correlation must be in [-1, 1], got {self.fading_correlation!r}")
        if not (math.isfinite(self.feature_sigma) and self.feature_sigma >= 0.0):
            raise InvalidInputError(f"feature_sigma must be finite and >= 0, got {self.feature_sigma!r}")
        if not 0.0 <= self.edge_tome_ratio < MAX_MERGE_RATIO:
            raise InvalidInputError(f"edge_tome_ratio must be in [0, {MAX_MERGE_RATIO}), got {self.edge_tome_ratio!r}")
        if self.feature_noise not in ("fixed", "snr"):
            raise InvalidInputError(f"feature_noise must be 'fixed' or 'snr', got {self.feature_noise!r}")
        if self.distance_model not in ("iid", "walk"):
            raise InvalidInputError(f"distance_model must be 'iid' or 'walk', got {self.distance_model!r}")


ENV_PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "extended": {
        "table": "meg-tiny", "edge_profile": "rtx-3080-ti", "device_profile": "jetson-agx-orin",
        "latency_limit_s": 5.0, "energy_limit_j": 1000.0, "resolutions": (512, 768), "splits": SPLIT_CODES,
        "merge_head": "discrete", "distance_model": "walk", "fading": "rician", "reward_mse_offset": 1e-3,
        "feature_noise": "snr", "edge_tome_ratio": 0.0,
    },
}
"""Named environments: "paper" is `EnvConfig()`; "extended" is the configuration the shipped
CVPO checkpoint was trained for (every extension on, ToMe off, the hybrid-SR paper's devices)."""


def features(snr_db: np.ndarray, previous_latency_s: np.ndarray, previous_energy_j: np.ndarray,
             pixels: np.ndarray, config: EnvConfig) -> np.ndarray:
    """Normalised network input [..., OBS_DIM] from physical observations (shared by training and serving)."""
    return np.stack([
        np.asarray(snr_db, dtype=np.float64) / 10.0,
        np.asarray(previous_latency_s, dtype=np.float64) / config.latency_limit_s,
        np.asarray(previous_energy_j, dtype=np.float64) / config.energy_limit_j,
        np.asarray(pixels, dtype=np.float64) / 1024.0**2,
    ], axis=-1).astype(np.float32)


@dataclass(frozen=True)
class PlanSpace:
    """The discrete plan set: categorical index → (split code, steps, merge ratio).

    With the discrete head, plans are every (split, steps) pair, times every merge bin for
    the split that merges ("decoder"); with the continuous head, merge bins are not part of
    the index (the ratio comes from the Gaussian head) and each plan holds ratio 0.
    """

    split: np.ndarray  # [A] int codes into SPLIT_CODES
    steps: np.ndarray  # [A] int
    merge_ratio: np.ndarray  # [A] float (0 for the continuous head)
    merges: np.ndarray  # [A] bool: the plan's split merges tokens

    @classmethod
    def from_config(cls, config: EnvConfig) -> PlanSpace:
        split, steps, merge, merges = [], [], [], []
        for name in config.splits:
            code = SPLIT_CODES.index(name)
            ratios = config.merge_ratios if (name == "decoder" and config.merge_head == "discrete") else (0.0,)
            for s in config.steps:
                for m in ratios:
                    split.append(code)
                    steps.append(s)
                    merge.append(m)
                    merges.append(name == "decoder")
        return cls(np.array(split), np.array(steps), np.array(merge, dtype=np.float64), np.array(merges))

    @property
    def size(self) -> int:
        return len(self.split)

    def action_features(self) -> np.ndarray:
        """[A, 5] critic input per plan: split one-hot (3), steps/12, merge ratio (discrete head)."""
        onehot = np.eye(len(SPLIT_CODES))[self.split]
        return np.concatenate([onehot, self.steps[:, None] / 12.0, self.merge_ratio[:, None]], axis=1).astype(np.float32)

    def describe(self, index: int, merge_ratio: float | None = None) -> str:
        m = self.merge_ratio[index] if merge_ratio is None else merge_ratio
        m = m if self.merges[index] else 0.0
        return f"{SPLIT_CODES[self.split[index]]}/{int(self.steps[index])} steps/merge {m:.2f}"


@dataclass(frozen=True)
class StepResult:
    """What one batched step returns (arrays over the batch)."""

    obs: np.ndarray  # [B, 4] physical observation of the next request
    reward: np.ndarray  # [B]
    latency_s: np.ndarray  # [B]
    energy_j: np.ndarray  # [B]
    mse: np.ndarray  # [B]
    snr_db: np.ndarray  # [B] SNR the request was served at
    truncated: bool  # the episode ended with this step


def _load_profile(name: str) -> Any:
    from meg.devices import load_profile

    return load_profile(name)


class PlanSimulator:
    """B independent episodes of the constrained MDP, stepped together (numpy).

    Args:
        config: environment configuration.
        table: distortion table (default: `load_table(config.table)`).
        edge, device: device profiles (default: `meg.devices.load_profile` of the config's names).
        link_budget: path-loss budget (default `meg.channel.pathloss.MEG_LINK_BUDGET`).
    """

    def __init__(self, config: EnvConfig = EnvConfig(), *, table: DistortionTable | None = None,
                 edge: Any = None, device: Any = None, link_budget: Any = None) -> None:
        from meg.channel.correlated import GaussMarkovFading

        if link_budget is None:
            from meg.channel.pathloss import MEG_LINK_BUDGET

            link_budget = MEG_LINK_BUDGET
        self.config = config
        self.table = table if table is not None else load_table(config.table)
        self.decoder_tables = tuple(load_table(name) for name in config.decoder_tables)
        for other in self.decoder_tables:
            if other.tome_ratio != self.table.tome_ratio or other.reference_steps != self.table.reference_steps:
                raise InvalidInputError(
                    f"decoder table {other.model!r} ({other.decoder!r}) was measured with ToMe {other.tome_ratio:g} and a "
                    f"{other.reference_steps}-step reference; the main table with ToMe {self.table.tome_ratio:g} and "
                    f"{self.table.reference_steps} steps")
        by_res = self.table.cost_flops.get("by_resolution", {})
        missing = [r for r in config.resolutions if str(r) not in by_res]
        if missing:
            raise InvalidInputError(
                f"distortion table {self.table.model!r} has no cost FLOPs for resolutions {missing}")
        missing_splits = [s for s in config.splits if s not in self.table.splits]
        if missing_splits:
            raise InvalidInputError(f"distortion table {self.table.model!r} lacks splits {missing_splits}")
        if not math.isclose(self.table.tome_ratio, config.edge_tome_ratio, abs_tol=1e-9):
            raise InvalidInputError(
                f"distortion table {self.table.model!r} was measured with ToMe ratio {self.table.tome_ratio:g} in the edge "
                f"UNet, the environment asks for edge_tome_ratio {config.edge_tome_ratio:g}")
        flops = {}
        for r in config.resolutions:
            row = dict(by_res[str(r)])
            if config.edge_tome_ratio > 0:
                if "unet_pass_flops_tome" not in row:
                    raise InvalidInputError(f"distortion table {self.table.model!r} has no ToMe FLOPs at {r} px")
                row["edge_unet_pass_flops"] = row["unet_pass_flops_tome"]
            flops[r * r] = row
        self.costs = CostModel(
            edge if edge is not None else _load_profile(config.edge_profile),
            device if device is not None else _load_profile(config.device_profile),
            flops, bandwidth_hz=float(link_budget.bandwidth_hz), guidance_passes=config.guidance_passes)
        self.link_budget = link_budget
        k = {"awgn": math.inf, "rayleigh": 0.0, "rician": config.rician_k}[config.fading]
        self.fading = None if math.isinf(k) else GaussMarkovFading(config.fading_correlation, k)
        self.space = PlanSpace.from_config(config)
        self.batch = 0

    # ---- episode state ------------------------------------------------------------------
    def reset(self, batch: int, seed: int) -> np.ndarray:
        """Start B episodes; the channel and request sizes are drawn from SEED only."""
        cfg = self.config
        self.batch = batch
        self.generator = torch.Generator().manual_seed(int(seed))
        g = self.generator
        self.distance_m = cfg.distance_min_m + (cfg.distance_max_m - cfg.distance_min_m) * torch.rand(
            batch, generator=g, dtype=torch.float64)
        self.fading_state = self.fading.initial((batch,), generator=g) if self.fading else None
        self.t = 0
        self.previous_latency_s = np.zeros(batch)
        self.previous_energy_j = np.zeros(batch)
        self._draw_request()
        return self.observation()

    def _draw_request(self) -> None:
        cfg, g = self.config, self.generator
        snr = self.link_budget.snr_db(self.distance_m).numpy()
        if self.fading is not None:
            assert self.fading_state is not None
            gain = self.fading.gain(self.fading_state).abs().double().pow(2).clamp_min(1e-12).numpy()
            snr = snr + 10.0 * np.log10(gain)
        self.snr_db = np.asarray(snr, dtype=np.float64)
        res = torch.randint(len(cfg.resolutions), (self.batch,), generator=g).numpy()
        side = np.asarray(cfg.resolutions, dtype=np.float64)[res]
        self.pixels = side * side

    def _advance_channel(self) -> None:
        cfg, g = self.config, self.generator
        if cfg.distance_model == "iid":
            self.distance_m = cfg.distance_min_m + (cfg.distance_max_m - cfg.distance_min_m) * torch.rand(
                self.batch, generator=g, dtype=torch.float64)
            if self.fading is not None:
                assert self.fading_state is not None
                self.fading_state = self.fading.step(self.fading_state, generator=g)
            return
        d = self.distance_m + cfg.distance_step_m * torch.randn(self.batch, generator=g, dtype=torch.float64)
        lo, hi = cfg.distance_min_m, cfg.distance_max_m
        if hi > lo:  # reflect at the edges of the cell
            d = torch.where(d < lo, 2 * lo - d, d)
            d = torch.where(d > hi, 2 * hi - d, d).clamp(lo, hi)
        self.distance_m = d
        if self.fading is not None:
            assert self.fading_state is not None
            self.fading_state = self.fading.step(self.fading_state, generator=g)

    def observation(self) -> np.ndarray:
        """[B, 4] physical observation: snr_db, previous latency_s, previous energy_j, pixels."""
        return np.stack([self.snr_db, self.previous_latency_s, self.previous_energy_j, self.pixels], axis=1)

    # ---- outcomes -----------------------------------------------------------------------
    def noise_sigma(self, snr_db: np.ndarray) -> np.ndarray:
        """Relative token noise std of the analog feature link at SNR (see EnvConfig.feature_noise)."""
        if self.config.feature_noise == "fixed":
            return np.full(np.shape(snr_db), self.config.feature_sigma, dtype=np.float64)
        return np.power(10.0, -(np.asarray(snr_db) + self.config.feature_gain_db) / 20.0)

    def outcome(self, split: np.ndarray, steps: np.ndarray, merge_ratio: np.ndarray,
                snr_db: np.ndarray | None = None, pixels: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(reward, latency_s, energy_j, mse) of plans at the current requests; broadcasts.

        Plan arrays may carry extra trailing axes ([B, A] for A candidates per request).
        """
        snr_db = self.snr_db if snr_db is None else snr_db
        pixels = self.pixels if pixels is None else pixels
        split = np.asarray(split)
        extra = split.ndim - np.ndim(snr_db)
        snr = np.reshape(snr_db, np.shape(snr_db) + (1,) * extra)
        pix = np.reshape(pixels, np.shape(pixels) + (1,) * extra)
        merge = np.clip(np.asarray(merge_ratio, dtype=np.float64), 0.0, self.config.max_merge_ratio)
        costs = self.costs(split, steps, merge, snr, pix)
        sigma = self.noise_sigma(snr)
        split_b, steps_b, merge_b, sigma_b = np.broadcast_arrays(split, np.asarray(steps, dtype=np.float64), merge, sigma)
        log_mse = np.zeros(split_b.shape)
        for code, name in enumerate(SPLIT_CODES):
            mask = split_b == code
            if mask.any():
                if name in MERGED_SPLITS:  # the best of the device decoders
                    log_mse[mask] = self._decoder_log_mse(steps_b[mask], merge_b[mask], sigma_b[mask]).min(0)
                else:
                    log_mse[mask] = self.table.log_mse(name, steps_b[mask], merge_b[mask], sigma_b[mask])
        mse = np.exp(log_mse)
        reward = -np.log(mse + self.config.reward_mse_offset) if self.config.reward_mse_offset > 0 else -log_mse
        return reward, costs.latency_s, costs.energy_j, mse

    def _decoder_log_mse(self, steps: np.ndarray, merge_ratio: np.ndarray, sigma: np.ndarray) -> np.ndarray:
        """[D, ...] log MSE of the merged split with each device decoder (`table` first)."""
        return np.stack([t.log_mse("decoder", steps, merge_ratio, sigma) for t in (self.table, *self.decoder_tables)])

    def best_decoder(self, steps: float, merge_ratio: float, snr_db: float) -> str:
        """VAE folder of the device decoder with the lowest tabulated MSE for a merged-split
        plan at SNR (the table's `decoder`; "" where the table does not name one)."""
        values = self._decoder_log_mse(np.array([float(steps)]), np.array([float(merge_ratio)]),
                                       self.noise_sigma(np.array([snr_db])))
        return (self.table, *self.decoder_tables)[int(np.argmin(values[:, 0]))].decoder

    def step(self, split: np.ndarray, steps: np.ndarray, merge_ratio: np.ndarray) -> StepResult:
        """Serve the current request of every episode with the given plans ([B] arrays)."""
        reward, latency_s, energy_j, mse = self.outcome(split, steps, merge_ratio)
        served_snr = self.snr_db
        self.previous_latency_s, self.previous_energy_j = latency_s, energy_j
        self.t += 1
        self._advance_channel()
        self._draw_request()
        return StepResult(self.observation(), reward, latency_s, energy_j, mse, served_snr,
                          self.t >= self.config.episode_length)

    def features(self, obs: np.ndarray) -> np.ndarray:
        return features(obs[..., 0], obs[..., 1], obs[..., 2], obs[..., 3], self.config)


class MegPlanEnv(gym.Env[np.ndarray, Any]):
    """Gymnasium view of one episode of `PlanSimulator`.

    Observation: Box(4) = (snr_db, previous_latency_s, previous_energy_j, pixels).
    Action: Discrete(A) over whole plans (merge_head="discrete"), or
    Dict(plan=Discrete(A), merge_ratio=Box([0], [max])) (merge_head="continuous").
    `step` returns reward = −log MSE and info = {"cost": [latency_s, energy_j], "mse", "plan"}.
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, config: EnvConfig = EnvConfig(), **simulator_kwargs: Any) -> None:
        self.sim = PlanSimulator(config, **simulator_kwargs)
        self.config = config
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float64)
        plans = gym.spaces.Discrete(self.sim.space.size)
        if config.merge_head == "discrete":
            self.action_space: gym.spaces.Space[Any] = plans
        else:
            self.action_space = gym.spaces.Dict({
                "plan": plans,
                "merge_ratio": gym.spaces.Box(0.0, config.max_merge_ratio, shape=(1,), dtype=np.float64)})
        self._started = False

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        episode_seed = int(self.np_random.integers(2**31 - 1)) if seed is None else int(seed)
        obs = self.sim.reset(1, episode_seed)
        self._started = True
        return obs[0], {}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if not self._started:
            raise InvalidInputError("step() called before reset()")
        space = self.sim.space
        if isinstance(action, dict):
            index, merge = int(action["plan"]), float(np.asarray(action["merge_ratio"]).reshape(-1)[0])
        else:
            index = int(action)
            merge = float(space.merge_ratio[index]) if 0 <= index < space.size else 0.0
        if not 0 <= index < space.size:
            raise InvalidInputError(f"action {index} is outside the plan set of size {space.size}")
        if not 0.0 <= merge <= self.config.max_merge_ratio:
            raise InvalidInputError(f"merge_ratio {merge} is outside [0, {self.config.max_merge_ratio}]")
        r = self.sim.step(space.split[index:index + 1], space.steps[index:index + 1], np.array([merge]))
        if r.truncated:
            self._started = False
        info = {"cost": np.array([r.latency_s[0], r.energy_j[0]]), "mse": float(r.mse[0]),
                "plan": space.describe(index, merge), "snr_db": float(r.snr_db[0])}
        return r.obs[0], float(r.reward[0]), False, r.truncated, info

