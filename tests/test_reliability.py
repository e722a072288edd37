"""Hostile request streams against real edge and policy processes (a small `meg bench reliability`)."""

from __future__ import annotations

import random

from meg.bench.reliability import _mutate, run_hostile


def test_every_mutation_kind_is_produced_and_is_bytes() -> None:
    rng = random.Random(0)
    stream = [b"\x0a\x02\x12\x00", b"\x12\x00", b"\x1a\x00"]
    kinds = set()
    for _ in range(500):
        kind, messages = _mutate(stream, rng)
        kinds.add(kind)
        assert all(isinstance(m, bytes) for m in messages)
    assert len(kinds) >= 12


def test_hostile_streams_get_typed_statuses_while_a_good_client_is_served() -> None:
    result = run_hostile(streams=200, seed=1, workers=4)
    assert result["internal_or_unknown"] == 0, result["untyped"]
    assert sum(result["statuses"].values()) == 200
    assert result["statuses"].get("INVALID_ARGUMENT", 0) > 50  # most mutations are refused as the client's fault
    assert result["good_client"]["failed"] == 0 and result["good_client"]["ok"] > 0
    assert result["health_after"] == {"edge": "SERVING", "policy": "SERVING"}
