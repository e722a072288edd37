"""Device profiles, latency/energy models, FLOP counting and calibration fits."""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from click.testing import CliRunner
from test_onnx_export import tiny_unet, tiny_vae

import meg.devices.calibrate as calibration
from meg.cli import cli
from meg.devices import (
    DeviceProfile,
    count_architecture_flops,
    count_flops,
    list_profiles,
    load_profile,
    radio_energy_j,
)
from meg.devices.calibrate import CalibrationConfig, StageTiming, calibrate, fit_latency_model
from meg.errors import InvalidInputError


def test_shipped_profiles_carry_the_paper_numbers() -> None:
    names = list_profiles()
    assert {"rtx-3080-ti", "jetson-agx-orin", "phone-class", "this-machine"} <= set(names)
    assert load_profile("rtx-3080-ti").peak_flops == pytest.approx(34.1e12)
    assert load_profile("jetson-agx-orin").peak_flops == pytest.approx(10.6e12)
    assert "ASSUMED" in load_profile("phone-class").description
    for name in names:
        profile = load_profile(name)
        assert profile.name == name and profile.description


def test_latency_and_energy_models() -> None:
    p = DeviceProfile("x", peak_flops=1e12, efficiency=0.5, overhead_s=0.01, power_active_w=10.0,
                      power_idle_w=1.0, tx_power_dbm=30.0)
    assert p.compute_latency_s(1e12) == pytest.approx(2.01)
    assert p.compute_latency_s(0) == 0.0
    assert p.compute_energy_j(1e12) == pytest.approx(20.1)
    assert p.radio_energy_j(2.0) == pytest.approx(2.0)  # 30 dBm = 1 W
    assert p.energy_j(1e12, tx_airtime_s=2.0, idle_s=3.0) == pytest.approx(20.1 + 2.0 + 3.0)
    assert radio_energy_j(23.0, 1.0) == pytest.approx(10 ** (-0.7))
    with pytest.raises(InvalidInputError, match="airtime_s"):
        radio_energy_j(23.0, -1.0)
    with pytest.raises(InvalidInputError, match="flops"):
        p.compute_latency_s(math.nan)


@pytest.mark.parametrize(("field", "value"), [("efficiency", 0.0), ("efficiency", 1.5), ("peak_flops", -1.0),
                                              ("overhead_s", -0.1), ("power_active_w", math.inf)])
def test_invalid_profile_values_name_the_field(field: str, value: float) -> None:
    values = dict(name="x", peak_flops=1e12, efficiency=0.5, overhead_s=0.0, power_active_w=1.0,
                  power_idle_w=0.0, tx_power_dbm=20.0)
    values[field] = value
    with pytest.raises(InvalidInputError, match=field) as info:
        DeviceProfile(**values)  # type: ignore[arg-type]
    assert info.value.field == field


def test_toml_round_trip_and_errors(tmp_path: Path) -> None:
    profile = load_profile("jetson-agx-orin")
    path = tmp_path / "copy.toml"
    path.write_text(profile.to_toml("a comment\nsecond line"))
    assert load_profile(str(path)) == profile
    path.write_text(profile.to_toml() + "turbo = true\n")
    with pytest.raises(InvalidInputError, match="turbo"):
        load_profile(str(path))
    with pytest.raises(InvalidInputError, match="'pager-3000'"):
        load_profile("pager-3000")


def test_count_flops_matches_closed_forms() -> None:
    linear = torch.nn.Linear(32, 16, bias=False)
    x = torch.randn(8, 32)
    assert count_flops(lambda: linear(x)) == 2 * 8 * 32 * 16
    conv = torch.nn.Conv2d(3, 4, kernel_size=3, padding=1, bias=False)
    image = torch.randn(1, 3, 10, 10)
    assert count_flops(lambda: conv(image)) == 2 * 3 * 4 * 9 * 10 * 10
    # Attention on CPU: QK^T and AV, 2 · (2·B·H·Lq·Lk·d).
    q, k, v = torch.randn(1, 2, 16, 8), torch.randn(1, 2, 24, 8), torch.randn(1, 2, 24, 8)
    attention = torch.nn.functional.scaled_dot_product_attention
    assert count_flops(lambda: attention(q, k, v)) == 2 * (2 * 1 * 2 * 16 * 24 * 8)


@pytest.mark.slow
def test_cost_architecture_flops_are_the_ones_the_policy_tables_record() -> None:
    """The policy's cost FLOPs come from the same counter as the split's: same numbers."""
    import meg.policy

    table = json.loads((Path(meg.policy.__file__).parent / "tables" / "meg-tiny.json").read_text())
    recorded = table["cost_flops"]["by_resolution"]["512"]
    assert count_architecture_flops("sdxl", 512, 512) == recorded
    with pytest.raises(InvalidInputError, match="'sd3'"):
        count_architecture_flops("sd3", 512, 512)  # type: ignore[arg-type]


def test_fit_recovers_a_known_line_and_refuses_nonsense() -> None:
    timings = [StageTiming(f"s{i}", flops, 2e-10 * flops + 0.003) for i, flops in enumerate((1e8, 4e8, 9e8))]
    seconds_per_flop, overhead_s, rms_s = fit_latency_model(timings)
    assert seconds_per_flop == pytest.approx(2e-10) and overhead_s == pytest.approx(0.003)
    assert rms_s < 1e-9
    with pytest.raises(InvalidInputError, match="two different FLOP counts"):
        fit_latency_model(timings[:1])
    with pytest.raises(InvalidInputError, match="do not grow"):
        fit_latency_model([StageTiming("a", 1e8, 0.5), StageTiming("b", 2e8, 0.1)])


def exact_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage time = FLOPs / 50 GFLOP/s + 4 ms, peak = 200 GFLOP/s: a machine with a known answer.

    Each stage still runs once, under the real FLOP counter; only the clock is replaced.
    """
    counted: list[int] = []

    def recording_count(fn):  # type: ignore[no-untyped-def]
        counted.append(count_flops(fn))
        return counted[-1]

    monkeypatch.setattr(calibration, "count_flops", recording_count)
    monkeypatch.setattr(calibration, "median_time_s", lambda fn, *, warmup, repeats: counted[-1] / 50e9 + 0.004)
    monkeypatch.setattr(calibration, "measure_peak_flops", lambda size, repeats: 200e9)


def test_calibrate_fits_efficiency_and_overhead(monkeypatch: pytest.MonkeyPatch) -> None:
    exact_timer(monkeypatch)
    result = calibrate(tiny_unet(), tiny_vae(), config=CalibrationConfig(latent_sizes=(4, 8), text_tokens=8))
    assert [t.stage for t in result.timings] == ["unet-step 32px", "vae-decode 32px", "unet-step 64px", "vae-decode 64px"]
    assert len({t.flops for t in result.timings}) == 4
    assert result.profile.efficiency == pytest.approx(0.25)
    assert result.profile.overhead_s == pytest.approx(0.004)
    assert result.profile.peak_flops == 200e9


def test_calibrate_cli_writes_a_loadable_profile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import meg.split.loading

    exact_timer(monkeypatch)
    loaded: list[str] = []

    def fake_load(model: str) -> SimpleNamespace:
        loaded.append(model)
        return SimpleNamespace(unet=tiny_unet(), vae=tiny_vae())

    monkeypatch.setattr(meg.split.loading, "load_pipeline", fake_load)
    out = tmp_path / "here.toml"
    result = CliRunner().invoke(cli, ["devices", "calibrate", "--model", "some-model", "--profile-out", str(out),
                                      "--latent-sizes", "4", "--repeats", "1", "--name", "lab-box"])
    assert result.exit_code == 0, result.output
    assert loaded == ["some-model"]
    profile = load_profile(str(out))
    assert profile.name == "lab-box"
    assert profile.efficiency == pytest.approx(0.25) and profile.overhead_s == pytest.approx(0.004)
    unknown = CliRunner().invoke(cli, ["devices", "show", "pager-3000"])
    assert unknown.exit_code == 1 and "'pager-3000'" in unknown.output
    listing = CliRunner().invoke(cli, ["devices", "list"])
    assert listing.exit_code == 0 and "jetson-agx-orin" in listing.output
