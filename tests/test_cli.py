"""The `meg` command line: help answers without loading the heavy stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from meg.cli import cli
from meg.services.edge_config import EdgeConfig

# Run in a fresh interpreter: this test process has imported torch long ago.
_IMPORTED_AFTER_HELP = """
import json, sys
from meg.cli import main
try:
    main({args!r})
except SystemExit:
    pass
print(json.dumps(sorted(m for m in ("torch", "diffusers", "transformers", "grpc") if m in sys.modules)))
"""


@pytest.mark.parametrize("args", [["--help"], ["serve", "--help"], ["serve", "edge", "--help"]])
def test_help_imports_no_model_stack(args: list[str]) -> None:
    # torch alone takes seconds to import on a loaded CPU; help must not wait for it.
    run = subprocess.run([sys.executable, "-c", _IMPORTED_AFTER_HELP.format(args=args)],
                         capture_output=True, text=True, timeout=120, check=True)
    heavy = json.loads(run.stdout.strip().splitlines()[-1])
    assert not {"torch", "diffusers", "transformers"} & set(heavy), heavy


def test_serve_edge_defaults_to_the_embedded_family() -> None:
    assert EdgeConfig.model == "meg-tiny"
    result = CliRunner().invoke(cli, ["serve", "edge", "--help"])
    assert result.exit_code == 0 and "[default: meg-tiny]" in result.output
    listing = CliRunner().invoke(cli, ["serve", "--help"])
    assert listing.exit_code == 0 and "edge" in listing.output and "policy" in listing.output
