"""The cell simulation (`meg bench cell`) against closed forms of simple queues."""

from __future__ import annotations

import pytest

from meg.bench.cell import CellConfig, EdgeTimes, simulate


def _times(**kw: object) -> EdgeTimes:
    base = {"forward_s": {1: 0.02, 2: 0.03, 8: 0.09}, "per_request_s": 0.01, "steps": 4, "client_s": 0.1}
    return EdgeTimes(**{**base, **kw})  # type: ignore[arg-type]


@pytest.mark.parametrize("devices", [1, 2, 3, 10, 40])
def test_unbatched_closed_loop_meets_the_closed_form(devices: int) -> None:
    # deterministic service S at one FIFO server, delay Z elsewhere: X = min(N / (S + Z), 1 / S)
    times = _times()
    service = times.per_request_s + times.steps * times.forward(1)  # 0.09 s
    sim = simulate(times, CellConfig(devices=devices, duration_s=200.0, warmup_s=20.0))
    expected = min(devices / (service + times.client_s), 1 / service)
    assert sim["throughput_rps"] == pytest.approx(expected, rel=0.02)
    if devices * service <= service + times.client_s:  # no queueing: latency is the bare path
        assert sim["p50_s"] == pytest.approx(service + times.client_s, rel=0.01)
    else:  # saturated: Little's law, N = X (R) with R the response time
        assert sim["p50_s"] == pytest.approx(devices / expected, rel=0.05)


def test_batching_saturates_at_the_batch_curve() -> None:
    # with many devices every pass carries batch_max calls: X = batch_max / (steps × forward(batch_max))
    times = _times(per_request_s=0.0)
    sim = simulate(times, CellConfig(devices=64, batch_max=8, duration_s=200.0))
    assert sim["throughput_rps"] == pytest.approx(8 / (4 * 0.09), rel=0.03)
    assert sim["busy_share"] == pytest.approx(1.0, abs=0.01)
    alone = simulate(times, CellConfig(devices=64, batch_max=1, duration_s=200.0))
    assert alone["throughput_rps"] == pytest.approx(1 / (4 * 0.02), rel=0.03)


def test_tdma_radio_caps_throughput_at_its_rate() -> None:
    # 10 kB per request over 1 Mbit/s: at most 12.5 transfers a second, whatever the edge does
    times = _times(forward_s={1: 0.001, 2: 0.0015}, per_request_s=0.0, downlink_bytes=10_000, client_s=0.0)
    sim = simulate(times, CellConfig(devices=50, radio="tdma", rate_bps=1e6, duration_s=200.0))
    assert sim["throughput_rps"] == pytest.approx(1e6 / 8 / 10_000, rel=0.02)
    # OFDMA with 8 blocks: each transfer at rate/8, 8 at once, same capacity
    ofdma = simulate(times, CellConfig(devices=50, radio="ofdma", rate_bps=1e6, resource_blocks=8, duration_s=200.0))
    assert ofdma["throughput_rps"] == pytest.approx(1e6 / 8 / 10_000, rel=0.03)


def test_bad_radio_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="radio must be"):
        simulate(_times(), CellConfig(devices=1, radio="wifi"))
    with pytest.raises(ValueError, match="rate_bps"):
        simulate(_times(), CellConfig(devices=1, radio="tdma"))
