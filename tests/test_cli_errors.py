"""The command line: plan options are never silently ignored, and a user error is one line
with a documented exit code (no traceback)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from meg.cli import EXIT_CODES, cli, exit_code_for
from meg.errors import (
    CodecError,
    DeadlineExceededError,
    InvalidInputError,
    MegError,
    ModelNotFoundError,
)


@pytest.mark.parametrize(("args", "needle"), [
    (["--codec", "bogus"], "--codec set a forced plan and need --split"),
    (["--steps", "3", "--merge-ratio", "0.5"], "--steps, --merge-ratio set a forced plan and need --split"),
    (["--tome-ratio", "0.5"], "--tome-ratio set a forced plan"),
    (["--sr-scale", "2"], "Hybrid SR settings: add --recipe hybrid-sr"),
    (["--recipe", "hybrid-sr", "--split", "decoder"], "MEG settings; Hybrid SR takes --sr-scale"),
    (["--recipe", "hybrid-sr", "--foreground-fraction", "0.5"], "need --sr-scale"),
])
def test_plan_options_without_a_plan_are_refused(args: list[str], needle: str) -> None:
    # the edge address is never reached: the options are refused first
    result = CliRunner().invoke(cli, ["generate", "--edge", "127.0.0.1:1", "--prompt", "a red ring", *args])
    assert result.exit_code == 2, result.output
    assert needle in result.output and "Traceback" not in result.output


def test_a_forced_plan_with_a_bad_codec_is_one_line_and_exit_2() -> None:
    result = CliRunner().invoke(cli, ["generate", "--edge", "127.0.0.1:1", "--prompt", "a red ring",
                                      "--split", "decoder", "--codec", "bogus"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error: " in result.output and "bogus" in result.output


def test_exit_codes_follow_the_error_tree() -> None:
    assert exit_code_for(CodecError("x")) == EXIT_CODES["InvalidInputError"] == 2  # a subclass takes its base's code
    assert exit_code_for(ModelNotFoundError("x")) == 3
    assert exit_code_for(DeadlineExceededError("x")) == 4
    assert exit_code_for(InvalidInputError("x")) == 2
    assert exit_code_for(MegError("x")) == 1 and exit_code_for(RuntimeError("x")) == 1
