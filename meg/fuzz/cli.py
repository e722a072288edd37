"""`meg fuzz`: run the fuzz targets under atheris and summarise them."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from meg.fuzz import TARGETS
from meg.services.background import proc_status_kb

__all__ = ["fuzz", "run_target"]


def run_target(target: str, *, runs: int, timeout_s: float = 1.0, rss_limit_mb: int = 2048,
               corpus: Path | None = None, artifacts: Path | None = None) -> dict[str, Any]:  # fmt: skip
    """One target in its own process (libFuzzer exits it): runs, crashes, hangs, peak memory."""
    corpus = corpus or Path(tempfile.mkdtemp(prefix=f"meg-fuzz-{target}-"))
    artifacts = artifacts or corpus
    artifacts.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "meg.fuzz", target, f"-runs={runs}", f"-timeout={max(10, round(10 * timeout_s))}",
            f"-rss_limit_mb={rss_limit_mb}", f"-artifact_prefix={artifacts}/", "-print_final_stats=1", str(corpus)]  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        # the child's own peak (VmHWM since its exec; libFuzzer's peak_rss_mb counts the parent's too)
        peak_kb = 0
        while proc.poll() is None:
            peak_kb = max(peak_kb, proc_status_kb(proc.pid, "VmHWM"))
            time.sleep(0.05)
        log.seek(0)
        out = log.read().decode(errors="replace")
    done = re.findall(r"Done (\d+) runs", out)
    crashes = sorted(str(p) for p in artifacts.glob("crash-*"))
    hangs = sorted(str(p) for p in artifacts.glob("timeout-*"))
    idle = None
    if runs > 1:  # the same process after a single input: what the target costs at rest
        idle = run_target(target, runs=1, timeout_s=timeout_s, rss_limit_mb=rss_limit_mb)["peak_rss_mb"]
    return {"target": target, "runs": int(done[-1]) if done else 0, "crashes": len(crashes), "hangs": len(hangs),
            "peak_rss_mb": round(peak_kb / 1024) if peak_kb else None, "idle_rss_mb": idle, "exit_code": proc.returncode,
            "wall_s": round(time.perf_counter() - started, 1), "artifacts": crashes + hangs,
            "tail": "" if proc.returncode == 0 else out[-3000:]}  # fmt: skip


@click.command("fuzz")
@click.argument("targets", nargs=-1)
@click.option("--runs", type=click.IntRange(min=1), default=100_000, show_default=True, help="Inputs per target.")
@click.option("--timeout-s", type=float, default=1.0, show_default=True, help="An input running longer is a hang.")
@click.option("--corpus", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Corpus folder (one sub-folder per target; default: temporary).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), help="Write the summary as JSON here.")
def fuzz(targets: tuple[str, ...], runs: int, timeout_s: float, corpus: Path | None, json_path: Path | None) -> None:
    """Coverage-guided fuzzing (atheris) of every parser of untrusted input: only MegError may
    escape. TARGETS default to all: wire, framing, codec-decode, chain, prompt, request, report."""
    import json

    names = targets or tuple(TARGETS)
    unknown = [t for t in names if t not in TARGETS]
    if unknown:
        raise click.BadParameter(f"unknown target(s) {', '.join(unknown)}; targets: {', '.join(TARGETS)}", param_hint="TARGETS")
    results = [run_target(t, runs=runs, timeout_s=timeout_s, corpus=corpus / t if corpus else None) for t in names]
    table = Table(title=f"meg fuzz: {runs} inputs per target")
    for column in ("target", "inputs", "crashes", "hangs", "peak RSS MB", "idle RSS MB", "wall s"):
        table.add_column(column, justify="right")
    for r in results:
        table.add_row(r["target"], str(r["runs"]), str(r["crashes"]), str(r["hangs"]), str(r["peak_rss_mb"]), str(r["idle_rss_mb"]),
                      str(r["wall_s"]))  # fmt: skip
    Console().print(table)
    for r in results:
        if r["exit_code"] != 0:
            click.echo(f"{r['target']}: exit {r['exit_code']}; inputs kept: {', '.join(r['artifacts'])}\n{r['tail']}", err=True)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
    if any(r["exit_code"] != 0 for r in results):
        raise SystemExit(1)
