"""Measured distortion table: MSE of a split generation against the unsplit reference.

`meg policy profile` runs the real split pipeline over a grid of (split point, steps,
merge ratio, channel noise σ) and writes one of these tables as JSON; the environment
interpolates it. Nothing in here is invented: every number in a table is a measurement,
and the table says which model, resolution and prompts it was measured on.

Interpolation is multilinear in log(MSE) over (steps, merge ratio, σ) inside the grid and
clamps to the grid's edges outside it (never extrapolates).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from meg.errors import InvalidInputError, ModelNotFoundError

__all__ = [
    "NOISY_SPLITS",
    "DistortionTable",
    "MeasuredPoint",
    "load_table",
    "packaged_table_path",
]

# Splits whose crossing tensor travels as analog feature values (noise σ applies);
# "image" travels digitally (8-bit, error-free after ARQ), "device" sends nothing.
NOISY_SPLITS = ("decoder",)
# Splits the merge ratio applies to (the merged latent crosses).
MERGED_SPLITS = ("decoder",)


@dataclass(frozen=True)
class MeasuredPoint:
    """One grid point of a profile: mean/std of MSE over the prompt set."""

    split: str
    steps: int
    merge_ratio: float
    noise_sigma: float
    mse: float
    mse_std: float


@dataclass(frozen=True)
class DistortionTable:
    """MSE(split, steps, merge_ratio, noise_sigma) measured on one model.

    Attributes:
        model: model the table was measured on (e.g. "tiny-random").
        height, width: resolution of the profiled generations (pixels).
        reference_steps: steps of the reference image (MSE is against it).
        prompts: the prompt set.
        steps, merge_ratios, noise_sigmas: the grid axes (ascending).
        points: every measured point.
        flops: FLOPs per partition of the profiled model, keyed "split@steps".
        cost_flops: FLOPs of the cost architecture per resolution (see `meg.devices.flops`).
        mse_floor: smallest MSE the reward uses (a bit-exact result has MSE 0 and
            −log 0 is unbounded); half the 8-bit quantisation noise power by default.
        tome_ratio: ToMe ratio inside the edge UNet of every measured generation.
        decoder: VAE folder the device decoded the merged split with ("" : the pipeline's own).
    """

    model: str
    height: int
    width: int
    reference_steps: int
    prompts: tuple[str, ...]
    steps: tuple[int, ...]
    merge_ratios: tuple[float, ...]
    noise_sigmas: tuple[float, ...]
    points: tuple[MeasuredPoint, ...]
    flops: dict[str, dict[str, float]] = field(default_factory=dict)
    cost_flops: dict[str, Any] = field(default_factory=dict)
    mse_floor: float = (1.0 / 255.0) ** 2 / 24.0
    tome_ratio: float = 0.0
    decoder: str = ""

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidInputError("distortion table has no measured points")
        for name, axis in (("steps", self.steps), ("merge_ratios", self.merge_ratios),
                           ("noise_sigmas", self.noise_sigmas)):
            if list(axis) != sorted(set(axis)) or not axis:
                raise InvalidInputError(f"distortion table axis {name}={list(axis)} must be ascending and unique")
        object.__setattr__(self, "_grids", self._build_grids())

    # ---- construction -------------------------------------------------------------------
    def _build_grids(self) -> dict[str, np.ndarray]:
        """log-MSE arrays per split: [n_steps, n_merge, n_sigma] (axes of size 1 where unused)."""
        grids: dict[str, np.ndarray] = {}
        splits = sorted({p.split for p in self.points})
        for split in splits:
            n_m = len(self.merge_ratios) if split in MERGED_SPLITS else 1
            n_s = len(self.noise_sigmas) if split in NOISY_SPLITS else 1
            grid = np.full((len(self.steps), n_m, n_s), np.nan)
            for p in self.points:
                if p.split != split:
                    continue
                i = self.steps.index(p.steps)
                j = self.merge_ratios.index(p.merge_ratio) if n_m > 1 else 0
                k = self.noise_sigmas.index(p.noise_sigma) if n_s > 1 else 0
                grid[i, j, k] = np.log(max(p.mse, self.mse_floor))
            if np.isnan(grid).any():
                raise InvalidInputError(f"distortion table misses grid points for split {split!r}")
            grids[split] = grid
        return grids

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(sorted(self._grids))  # type: ignore[attr-defined]

    # ---- queries ------------------------------------------------------------------------
    def log_mse(self, split: str, steps: np.ndarray, merge_ratio: np.ndarray,
                noise_sigma: np.ndarray) -> np.ndarray:
        """Interpolated natural-log MSE; array arguments broadcast together.

        Args:
            split: split point text present in the table ("device", "decoder", "image", …).
            steps: total denoising steps (float or int array).
            merge_ratio: token-merge ratio in [0, 0.75] (ignored for unmerged splits).
            noise_sigma: relative noise std on the crossing features (ignored for digital splits).
        Returns:
            log MSE, broadcast shape of the arguments.
        """
        grids: dict[str, np.ndarray] = self._grids  # type: ignore[attr-defined]
        if split not in grids:
            raise InvalidInputError(f"split {split!r} is not in the distortion table (has {list(grids)})")
        grid = grids[split]
        steps, merge_ratio, noise_sigma = np.broadcast_arrays(
            np.asarray(steps, dtype=np.float64), np.asarray(merge_ratio, dtype=np.float64),
            np.asarray(noise_sigma, dtype=np.float64))
        axes = [np.asarray(self.steps, dtype=np.float64),
                np.asarray(self.merge_ratios, dtype=np.float64),
                np.asarray(self.noise_sigmas, dtype=np.float64)]
        coords = [steps, merge_ratio, noise_sigma]
        # Per axis: lower index and weight of the upper neighbour (clamped to the grid).
        lows, weights = [], []
        for a, (axis, x) in enumerate(zip(axes, coords, strict=True)):
            if grid.shape[a] == 1:
                lows.append(np.zeros(x.shape, dtype=np.int64))
                weights.append(np.zeros(x.shape))
                continue
            xc = np.clip(x, axis[0], axis[-1])
            lo = np.clip(np.searchsorted(axis, xc, side="right") - 1, 0, len(axis) - 2)
            lows.append(lo)
            weights.append((xc - axis[lo]) / (axis[lo + 1] - axis[lo]))
        out = np.zeros(steps.shape)
        for corner in range(8):
            bits = [(corner >> a) & 1 for a in range(3)]
            if any(b and grid.shape[a] == 1 for a, b in enumerate(bits)):
                continue
            w = np.ones(steps.shape)
            idx = []
            for a, b in enumerate(bits):
                w = w * (weights[a] if b else 1.0 - weights[a])
                idx.append(lows[a] + b)
            out = out + w * grid[idx[0], idx[1], idx[2]]
        return out

    def mse(self, split: str, steps: np.ndarray, merge_ratio: np.ndarray, noise_sigma: np.ndarray) -> np.ndarray:
        """Interpolated MSE (≥ mse_floor); see `log_mse`."""
        return np.exp(self.log_mse(split, steps, merge_ratio, noise_sigma))

    # ---- JSON ---------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "height": self.height,
            "width": self.width,
            "reference_steps": self.reference_steps,
            "prompts": list(self.prompts),
            "grid": {"steps": list(self.steps), "merge_ratio": list(self.merge_ratios),
                     "noise_sigma": list(self.noise_sigmas)},
            "mse_floor": self.mse_floor,
            "points": [p.__dict__ for p in self.points],
            "flops": self.flops,
            "cost_flops": self.cost_flops,
            "tome_ratio": self.tome_ratio,
            "decoder": self.decoder,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DistortionTable:
        try:
            grid = data["grid"]
            return cls(
                model=str(data["model"]), height=int(data["height"]), width=int(data["width"]),
                reference_steps=int(data["reference_steps"]), prompts=tuple(data["prompts"]),
                steps=tuple(int(s) for s in grid["steps"]),
                merge_ratios=tuple(float(m) for m in grid["merge_ratio"]),
                noise_sigmas=tuple(float(s) for s in grid["noise_sigma"]),
                points=tuple(MeasuredPoint(**p) for p in data["points"]),
                flops=dict(data.get("flops", {})), cost_flops=dict(data.get("cost_flops", {})),
                mse_floor=float(data.get("mse_floor", (1.0 / 255.0) ** 2 / 24.0)),
                tome_ratio=float(data.get("tome_ratio", 0.0)), decoder=str(data.get("decoder", "")),
            )
        except (KeyError, TypeError) as exc:
            raise InvalidInputError(f"malformed distortion table: {exc!r}") from exc

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=1) + "\n")


def packaged_table_path(model: str = "tiny-random") -> Path:
    """Path of the table shipped with the package for MODEL (meg/policy/tables/MODEL.json)."""
    return Path(str(resources.files("meg.policy") / "tables" / f"{model}.json"))


def load_table(path_or_model: str | Path = "tiny-random") -> DistortionTable:
    """Load a table from a JSON path, or the packaged table of a model name."""
    path = Path(path_or_model)
    if path.suffix != ".json":
        path = packaged_table_path(str(path_or_model))
    if not path.is_file():
        raise ModelNotFoundError(f"distortion table {str(path_or_model)!r} not found (looked at {path})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"distortion table {str(path)!r} is not JSON: {exc}") from exc
    return DistortionTable.from_json(data)
