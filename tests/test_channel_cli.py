"""`meg channel ber|link` and `meg bench channel` run end to end on tiny budgets."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from meg.channel.bench import bench_channel
from meg.channel.cli import channel
from meg.cli import cli


def test_ber_command_writes_rows_and_a_plot(tmp_path: Path) -> None:
    out, png = tmp_path / "ber.json", tmp_path / "ber.png"
    result = CliRunner().invoke(
        channel, ["ber", "--modulation", "bpsk,16qam", "--fading", "awgn,rayleigh", "--snr-db", "0,6",
                  "--bits", "20000", "--seed", "1", "--json", str(out), "--plot", str(png)],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 8
    assert {"snr_db", "ber", "ber_theory", "bits"} <= set(rows[0])
    assert [(r["fading"], r["modulation"], r["snr_db"]) for r in rows[:2]] == [("awgn", "bpsk", 0.0), ("awgn", "bpsk", 6.0)]
    for row in rows:  # loose: 20 000 bits per point
        assert abs(row["ber"] - row["ber_theory"]) < 0.3 * row["ber_theory"] + 5e-4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ber_help_says_snr_is_eb_n0_and_bad_names_are_rejected() -> None:
    result = CliRunner().invoke(cli, ["channel", "ber", "--help"])
    assert result.exit_code == 0 and "Eb/N0" in result.output
    bad = CliRunner().invoke(channel, ["ber", "--modulation", "8psk"])
    assert bad.exit_code != 0 and "8psk" in bad.output
    bad_snr = CliRunner().invoke(channel, ["ber", "--snr-db", "0,x"])
    assert bad_snr.exit_code != 0 and "0,x" in bad_snr.output


def test_link_command_reports_the_meg_operating_point(tmp_path: Path) -> None:
    out = tmp_path / "link.json"
    result = CliRunner().invoke(
        channel, ["link", "--distance-m", "200", "--tx-power-dbm", "30", "--bandwidth-hz", "1e6",
                  "--noise-dbm-hz", "-154", "--payload-bytes", "131072", "--json", str(out)],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert abs(data["snr_db"] - 2.18) < 0.01 and abs(data["rate_bps"] - 1.407e6) < 1e3
    assert abs(data["airtime_s"] - 8 * (131072 + 40) / data["rate_bps"]) < 1e-9
    assert data["energy_j"] == data["airtime_s"]  # 1 W
    assert "snr_db" in result.output and "airtime_s" in result.output


def test_link_command_exits_non_zero_when_a_packet_is_lost() -> None:
    result = CliRunner().invoke(
        channel, ["link", "--distance-m", "300", "--payload-bytes", "3000", "--rate-model", "uncoded", "--max-retries", "1"],
    )
    assert result.exit_code == 1 and "lost after 2 attempts" in result.output


def test_bench_channel_writes_throughput_rows(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(bench_channel, ["--symbols", "2048", "--repeats", "1", "--warmup", "0", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["model"]: row for row in json.loads(out.read_text())["rows"]}
    assert "rayleigh fast fading" in rows and "awgn" in rows
    assert all(row["msymbols_per_s_median"] > 0 and row["symbols"] == 2048 for row in rows.values())


def test_commands_are_registered_in_the_meg_cli() -> None:
    runner = CliRunner()
    assert "ber" in runner.invoke(cli, ["channel", "--help"]).output
    bench_help = runner.invoke(cli, ["bench", "channel", "--help"])
    assert bench_help.exit_code == 0 and "--symbols" in bench_help.output
