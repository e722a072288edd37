"""Checkpoints of learned planners: a folder with `weights.safetensors` and `meta.json`.

Network weights and the dual variables (CVPO's η, λ and trust-region multipliers; the
Lagrange multipliers of PPO) are tensors in safetensors; the algorithm, its
hyper-parameters, the environment configuration it was trained for and the duals (again,
readable) are JSON. Nothing is pickled, so loading a checkpoint never runs code.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from meg.errors import InvalidInputError, ModelNotFoundError
from meg.policy.env import EnvConfig

__all__ = ["FORMAT_VERSION", "Checkpoint", "env_config_from_dict", "load_checkpoint", "save_checkpoint"]

FORMAT_VERSION = 1
_DUAL_PREFIX = "dual."


@dataclass(frozen=True)
class Checkpoint:
    algo: str
    tensors: dict[str, torch.Tensor]  # network weights, "<module>.<param>"
    duals: dict[str, list[float]]
    config: dict[str, Any]  # algorithm hyper-parameters
    env_config: EnvConfig
    extra: dict[str, Any]

    def state_dict(self, prefix: str) -> dict[str, torch.Tensor]:
        """Weights of one module saved under PREFIX ("actor", "critic", …)."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.tensors.items() if k.startswith(p)}


def env_config_from_dict(data: dict[str, Any]) -> EnvConfig:
    known = {f.name: f for f in dataclasses.fields(EnvConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise InvalidInputError(f"environment config has unknown keys {unknown}")
    values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    values.setdefault("reward_mse_offset", 0.0)  # written before the field existed: plain −log MSE
    # written before these fields existed: the behaviour of that time, not today's defaults
    for key, old in (("feature_noise", "snr"), ("distance_model", "walk"), ("edge_tome_ratio", 0.0)):
        values.setdefault(key, old)
    return EnvConfig(**values)


def save_checkpoint(path: Path, *, algo: str, modules: dict[str, torch.nn.Module],
                    duals: dict[str, float | list[float]], config: Any, env_config: EnvConfig,
                    extra: dict[str, Any] | None = None) -> Path:
    """Write PATH/weights.safetensors and PATH/meta.json; returns PATH."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"{name}.{k}": v.detach().cpu().contiguous() for name, m in modules.items()
               for k, v in m.state_dict().items()}
    dual_lists = {k: [float(x) for x in (v if isinstance(v, list | tuple) else [v])] for k, v in duals.items()}
    for k, v in dual_lists.items():
        tensors[_DUAL_PREFIX + k] = torch.tensor(v, dtype=torch.float64)
    save_file(tensors, str(path / "weights.safetensors"))
    meta = {
        "format": FORMAT_VERSION,
        "algo": algo,
        "config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) and not isinstance(config, type) else dict(config),
        "env_config": dataclasses.asdict(env_config),
        "duals": dual_lists,
        "extra": extra or {},
    }
    (path / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return path


def load_checkpoint(path: Path | str) -> Checkpoint:
    """Read a checkpoint folder written by `save_checkpoint`."""
    path = Path(path)
    weights, meta_path = path / "weights.safetensors", path / "meta.json"
    if not weights.is_file() or not meta_path.is_file():
        raise ModelNotFoundError(f"checkpoint {str(path)!r} not found (needs weights.safetensors and meta.json)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"checkpoint {str(path)!r}: meta.json is not JSON: {exc}") from exc
    if meta.get("format") != FORMAT_VERSION:
        raise InvalidInputError(f"checkpoint {str(path)!r} has format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    tensors = load_file(str(weights))
    duals = {k[len(_DUAL_PREFIX):]: v.tolist() for k, v in tensors.items() if k.startswith(_DUAL_PREFIX)}
    if set(duals) != set(meta.get("duals", {})):
        raise InvalidInputError(f"checkpoint {str(path)!r}: duals in weights {sorted(duals)} and meta "
                                f"{sorted(meta.get('duals', {}))} differ")
    return Checkpoint(
        algo=str(meta["algo"]),
        tensors={k: v for k, v in tensors.items() if not k.startswith(_DUAL_PREFIX)},
        duals=duals, config=dict(meta["config"]), env_config=env_config_from_dict(meta["env_config"]),
        extra=dict(meta.get("extra", {})))
