"""Refine-strength profiling, oracle and predictor (preview-refine)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from meg.policy.preview_strength import (
    StrengthPredictor,
    StrengthProfileConfig,
    oracle_strength,
    profile_strength,
    train_strength,
    xy,
)
from meg.split.engine import SplitEngine

GRID = (0.25, 0.5, 0.75, 1.0)


def test_oracle_is_the_smallest_strength_within_tolerance() -> None:
    assert oracle_strength({0.25: 0.4, 0.5: 0.62, 1.0: 0.7}, 0.65, 0.05) == 0.5
    assert oracle_strength({0.25: 0.9, 0.5: 0.1}, 0.65, 0.05) == 0.25
    assert oracle_strength({0.25: 0.1, 0.5: 0.2}, 0.65, 0.05) == 0.5  # none reaches it: the largest


def _synthetic(n: int, seed: int) -> list[dict[str, Any]]:
    """Records whose oracle is a function of the first feature; fidelity reaches scratch at the oracle."""
    rng = np.random.default_rng(seed)
    records = []
    for _ in range(n):
        x = rng.normal(size=6)
        oracle = GRID[int(np.clip((x[0] + 1.5) / 0.75, 0, 3))]
        refine = {str(s): (0.8 if s >= oracle else 0.4) for s in GRID}
        records.append({"features": x.tolist(), "oracle": oracle, "scratch_fidelity": 0.8, "preview_fidelity": 0.4,
                        "refine_fidelity": refine})
    return records


def test_predictor_learns_the_oracle_and_survives_fp16_shipping(tmp_path: Path) -> None:
    train, heldout = _synthetic(300, 0), _synthetic(100, 1)
    predictor = train_strength(train, ridge=1.0)
    x, oracle = xy(heldout)
    predicted = predictor.predict(x)
    assert set(predicted) <= set(GRID)
    assert np.mean(np.abs(predicted - oracle) <= 0.1) > 0.5  # far above the 1-in-4 of a guess
    predictor.save(tmp_path)
    shipped = StrengthPredictor.load(tmp_path)
    assert (tmp_path / "strength.safetensors").stat().st_size < 4096
    assert np.mean(shipped.predict(x) == predicted) > 0.95


def test_profile_measures_every_strength(pipeline: Any, engine: SplitEngine) -> None:
    from meg.models.captions import parse_prompt

    prompts = ["a red circle", "a blue square at the top left"]
    config = StrengthProfileConfig(strengths=(0.5, 1.0), refine_steps=2, preview_steps=1)
    records = profile_strength(engine, SplitEngine(pipeline), prompts, [parse_prompt(p) for p in prompts], config)
    assert [r["seed"] for r in records] == [0, 1]
    assert set(records[0]["refine_fidelity"]) == {"0.5", "1.0"} and records[0]["oracle"] in (0.5, 1.0)
    flops = records[0]["flops"]
    assert flops["refine_edge:0.5"] < flops["refine_edge:1.0"] <= flops["scratch_edge"]
    json.dumps(records)  # what run_profile writes


@pytest.mark.parametrize("sessions", [50])
def test_bench_rows_compare_the_methods(tmp_path: Path, sessions: int) -> None:
    from meg.bench.preview_refine import PreviewRefineBenchConfig, run_bench

    flops = {"preview_device": 1e9, "scratch_edge": 8e9, "decode_device": 2e9,
             **{f"refine_edge:{s}": 8e9 * s for s in GRID}}
    for name, seed in (("train", 0), ("heldout", 1)):
        records = _synthetic(100, seed)
        for r in records:
            r["flops"] = flops
        (tmp_path / f"{name}.json").write_text(json.dumps({"records": records}))
    result = run_bench(tmp_path / "train.json", tmp_path / "heldout.json", PreviewRefineBenchConfig(sessions=sessions))
    rows = {r["method"]: r for r in result["rows"]}
    assert result["sessions"] == sessions
    assert rows["refine, oracle"]["final_fidelity"] == pytest.approx(0.8)
    assert rows["refine s=1.0"]["edge_flops_per_session"] == pytest.approx(8e9)
    assert rows["preview only"]["edge_flops_per_session"] == 0
    assert rows["refine, predictor"]["edge_flops_per_session"] < rows["refine s=1.0"]["edge_flops_per_session"]


def test_strength_train_command_ships_fp16(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meg.policy.cli import policy

    (tmp_path / "profile.json").write_text(json.dumps({"model": "m", "records": _synthetic(120, 2)}))
    result = CliRunner().invoke(policy, ["strength", "train", "--profile", str(tmp_path / "profile.json"),
                                         "--out", str(tmp_path / "predictor")])
    assert result.exit_code == 0, result.output
    meta = json.loads((tmp_path / "predictor" / "strength.json").read_text())
    assert meta["n"] == 120 and meta["grid"] == list(GRID) and 0 <= meta["train_within_0_1_of_oracle"] <= 1
    assert StrengthPredictor.load(tmp_path / "predictor").weight.shape == (6,)


def test_edit_rounds_are_measured_per_strength(pipeline: Any) -> None:
    from meg.policy.preview_strength import colour_edits, measure_edits

    pairs = colour_edits(3, 0)
    assert pairs == colour_edits(3, 0) and all(a != b and a.split()[2:] == b.split()[2:] for a, b in pairs)
    rows = measure_edits(SplitEngine(pipeline), pairs, (0.5,), steps=2)
    assert set(rows) == {"from scratch", "edit s=0.5"}
    assert rows["edit s=0.5"]["steps"] == 1 and rows["from scratch"]["steps"] == 2
    assert rows["edit s=0.5"]["pixel_change"] > 0


def test_measured_session_times_follow_the_operation_times() -> None:
    from meg.bench.preview_refine import measure_here, measured_rows

    times = measure_here("tiny-random", ["a red circle"], (0.5,), refine_steps=2, preview_steps=1)
    assert set(times) == {"preview", "edge_round", "refine:0.5"} and all(t > 0 for t in times.values())
    rows = measured_rows({"preview": 1.0, "edge_round": 2.0, "refine:0.5": 0.5},
                         {"refine s=0.5": np.array([0.5, 0.5])}, np.array([3.0, 5.0]))
    assert [r["mean_time_s"] for r in rows] == [8.0, 4.0, 4.5]
    assert rows[2]["time_vs_edge_every_round"] == pytest.approx(-0.4375)
