"""The committed stubs in meg/v1 are exactly what the generation script writes."""

from __future__ import annotations

import filecmp
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_stubs_are_fresh(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_proto.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = tmp_path / "meg" / "v1"
    committed = ROOT / "meg" / "v1"
    names = sorted(p.name for p in fresh.iterdir() if p.is_file())
    assert names == sorted(p.name for p in committed.iterdir() if p.is_file() and p.suffix in {".py", ".pyi"})
    _, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
    assert not mismatch and not errors, f"stale generated files (run scripts/gen_proto.py): {mismatch + errors}"


def test_enums_start_with_unspecified() -> None:
    from meg.v1 import edge_service_pb2, generation_pb2, policy_service_pb2, tensor_pb2

    for module in (tensor_pb2, generation_pb2, edge_service_pb2, policy_service_pb2):
        for enum in module.DESCRIPTOR.enum_types_by_name.values():
            zero = enum.values_by_number[0].name
            assert zero.endswith("_UNSPECIFIED"), f"{enum.name} starts with {zero}"


def test_services_are_declared() -> None:
    from meg.v1 import edge_service_pb2, policy_service_pb2

    generate = edge_service_pb2.DESCRIPTOR.services_by_name["EdgeService"].methods_by_name["Generate"]
    assert generate.client_streaming and generate.server_streaming
    decide = policy_service_pb2.DESCRIPTOR.services_by_name["PolicyService"].methods_by_name["Decide"]
    assert not decide.client_streaming and not decide.server_streaming
