"""A bounded smoke run of every fuzz target (atheris, coverage-guided), and the regression
tests of what fuzzing found. `meg fuzz --runs 100000` is the long mode."""

from __future__ import annotations

from pathlib import Path

import pytest

from meg.errors import FramingError, InvalidInputError, MegError
from meg.fuzz import TARGETS, check, seeds
from meg.fuzz.cli import run_target

SMOKE_RUNS = 20_000


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_target_survives_a_smoke_run(target: str, tmp_path: Path) -> None:
    result = run_target(target, runs=SMOKE_RUNS, corpus=tmp_path / "corpus", artifacts=tmp_path / "artifacts")
    assert result["exit_code"] == 0, result["tail"]
    assert result["runs"] >= SMOKE_RUNS and result["crashes"] == 0 and result["hangs"] == 0


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_seeds_are_accepted_inputs(target: str) -> None:
    # the seeds are real, well-formed inputs: the parsers take them without a refusal
    for seed in seeds(target):
        if target == "report" and seed.startswith(b'{"request_id": "x"}'):
            continue  # the deliberately partial report
        TARGETS[target](seed)


def test_check_lets_only_meg_errors_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(data: bytes) -> None:
        raise (InvalidInputError("refused") if data else KeyError("crash"))

    monkeypatch.setitem(TARGETS, "boom", boom)
    check("boom", b"x")  # a typed refusal is fine
    with pytest.raises(KeyError):
        check("boom", b"")


# -- regressions found by fuzzing ---------------------------------------------------------------


def test_corrupt_generate_response_is_a_framing_error() -> None:
    # found by the `wire` target: protobuf's DecodeError escaped the client's deserializer
    from meg.services.wire import decode_generate_response

    with pytest.raises(FramingError, match="malformed GenerateResponse"):
        decode_generate_response(b"\x0a\xff\xff\xff\xff\x0f")


def test_a_report_that_is_not_one_is_refused_naming_why() -> None:
    # the `report` target's contract: GenerationReport.from_dict refuses, it does not crash
    from meg.recipes.report import GenerationReport

    for bad in ({}, {"request_id": "x"}, [], {"bytes": 3}):
        with pytest.raises(MegError, match="not a MEG generation report"):
            GenerationReport.from_dict(bad)  # type: ignore[arg-type]


def test_a_merged_latent_with_an_empty_dimension_is_refused() -> None:
    # found by the `codec-decode` target: shape [0, 4, 0, 4] reached a reshape that raised RuntimeError
    from meg.fuzz import TARGETS

    data = bytes.fromhex("6d657267653a302e3136000104000004000100000000b500")
    with pytest.raises(MegError, match="non-empty latent"):
        TARGETS["codec-decode"](data)
