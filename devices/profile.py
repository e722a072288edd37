"""Device profiles: peak throughput, efficiency, power and radio of an edge server or a UE.

A profile is data (``devices/profiles/NAME.toml``); the models are two lines:

    compute latency = FLOPs / (peak_flops × efficiency) + overhead_s
    compute energy  = power_active_w × compute latency

which is the linear cost model of the MEG paper (PAPERS.md §1, "Costs": latency
κ·F + base, energy ε·F + bias) with κ = 1/(peak × efficiency). `meg devices calibrate`
fits ``efficiency`` and ``overhead_s`` from stage times measured on this machine.
"""

from __future__ import annotations

import json
import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from meg.devices.radio import radio_energy_j
from meg.errors import InvalidInputError

__all__ = ["PROFILES_DIR", "DeviceProfile", "list_profiles", "load_profile"]

PROFILES_DIR = Path(__file__).resolve().parent / "profiles"


@dataclass(frozen=True)
class DeviceProfile:
    """Compute, power and radio parameters of one device."""

    name: str
    """Profile name (file stem in ``devices/profiles``)."""
    peak_flops: float
    """Peak throughput in FLOP/s at the precision the device runs the model in."""
    efficiency: float
    """Fraction of the peak a diffusion model reaches, in (0, 1]."""
    overhead_s: float
    """Fixed per-stage cost (launch, memory traffic not captured by FLOPs), seconds."""
    power_active_w: float
    """Power drawn while computing, watts."""
    power_idle_w: float
    """Power drawn while idle (waiting for the link), watts."""
    tx_power_dbm: float
    """Radio transmit power, dBm."""
    description: str = ""
    """Where the numbers come from; states every assumption."""

    def __post_init__(self) -> None:
        if not self.name:
            raise InvalidInputError("device profile name must not be empty", field="name")
        for field_name in ("peak_flops", "power_active_w", "power_idle_w", "overhead_s", "tx_power_dbm"):
            value = getattr(self, field_name)
            if not math.isfinite(value):
                raise InvalidInputError(f"{field_name} must be finite, got {value!r}", field=field_name)
        if self.peak_flops <= 0:
            raise InvalidInputError(f"peak_flops must be > 0, got {self.peak_flops!r}", field="peak_flops")
        if not (0.0 < self.efficiency <= 1.0):
            raise InvalidInputError(f"efficiency must be in (0, 1], got {self.efficiency!r}", field="efficiency")
        for field_name in ("overhead_s", "power_active_w", "power_idle_w"):
            if getattr(self, field_name) < 0:
                raise InvalidInputError(
                    f"{field_name} must be >= 0, got {getattr(self, field_name)!r}", field=field_name
                )

    @property
    def effective_flops(self) -> float:
        """Sustained throughput, FLOP/s: ``peak_flops × efficiency``."""
        return self.peak_flops * self.efficiency

    def compute_latency_s(self, flops: float) -> float:
        """Seconds to run ``flops`` FLOPs: ``flops / (peak × efficiency) + overhead_s``.

        Zero FLOPs (nothing runs here) costs nothing, not the overhead.
        """
        if not (math.isfinite(flops) and flops >= 0):
            raise InvalidInputError(f"flops must be finite and >= 0, got {flops!r}")
        if flops == 0:
            return 0.0
        return flops / self.effective_flops + self.overhead_s

    def compute_energy_j(self, flops: float) -> float:
        """Joules to run ``flops`` FLOPs: ``power_active_w × compute_latency_s(flops)``."""
        return self.power_active_w * self.compute_latency_s(flops)

    def radio_energy_j(self, airtime_s: float) -> float:
        """Joules radiated while transmitting for ``airtime_s`` at this profile's power."""
        return radio_energy_j(self.tx_power_dbm, airtime_s)

    def energy_j(self, flops: float, *, tx_airtime_s: float = 0.0, idle_s: float = 0.0) -> float:
        """Total energy: compute + radio (transmit airtime) + idle power while waiting."""
        if not (math.isfinite(idle_s) and idle_s >= 0):
            raise InvalidInputError(f"idle_s must be finite and >= 0, got {idle_s!r}")
        return self.compute_energy_j(flops) + self.radio_energy_j(tx_airtime_s) + self.power_idle_w * idle_s

    @classmethod
    def from_toml(cls, path: Path) -> DeviceProfile:
        """Read a profile from a TOML file (keys = field names; unknown keys are errors)."""
        try:
            data = tomllib.loads(Path(path).read_text())
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInputError(f"device profile {str(path)!r} is not valid TOML: {exc}") from exc
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidInputError(f"device profile {str(path)!r} has unknown keys {unknown}")
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name != "description")
        if missing:
            raise InvalidInputError(f"device profile {str(path)!r} lacks keys {missing}")
        try:
            values: dict[str, Any] = {k: (v if k in ("name", "description") else float(v)) for k, v in data.items()}
            return cls(**values)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, InvalidInputError):
                raise
            raise InvalidInputError(f"device profile {str(path)!r}: {exc}") from exc

    def to_toml(self, comment: str = "") -> str:
        """Serialise as TOML (the format `from_toml` reads). ``comment`` lines lead the file."""
        lines = [f"# {line}".rstrip() for line in comment.splitlines()]
        for f in fields(self):
            value = getattr(self, f.name)
            # JSON string escapes are valid TOML basic-string escapes.
            lines.append(f"{f.name} = {json.dumps(value) if isinstance(value, str) else repr(float(value))}")
        return "\n".join(lines) + "\n"


def list_profiles() -> list[str]:
    """Names of the profiles shipped in ``devices/profiles`` (sorted)."""
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml"))


def load_profile(name: str) -> DeviceProfile:
    """Load a shipped profile by name, or any profile file by a path ending in ``.toml``.

    Raises:
        InvalidInputError: unknown name or missing file (the message names it and lists
            the shipped profiles), or a malformed profile.
    """
    path = Path(name) if name.endswith(".toml") else PROFILES_DIR / f"{name}.toml"
    if not path.is_file():
        raise InvalidInputError(
            f"unknown device profile {name!r}; shipped profiles: {', '.join(list_profiles())}",
            field="device_profile",
        )
    return DeviceProfile.from_toml(path)
