"""`meg session` and `meg demo --recipe preview-refine`: a multi-round preview–refine session.

Both start an edge server on 127.0.0.1 (a real socket, port picked by the OS) unless given
one, and act as the device: every prompt round is previewed here with the family's small
UNet and written as a PNG; ``/final`` sends the last preview up, the edge refines it and
sends the latent back, and the final image and its report are written.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click

__all__ = ["SessionDemoConfig", "run_session_demo", "session"]

DEMO_ROUNDS = (
    "a red circle",
    "a blue circle at the top left",
    "a blue circle at the top left and a yellow square at the bottom right",
)
"""The scripted session: a first idea, a colour and position edit, an added object."""


@dataclass(frozen=True)
class SessionDemoConfig:
    """Defaults of the scripted session (`meg demo --recipe preview-refine`)."""

    rounds: tuple[str, ...] = DEMO_ROUNDS
    out_dir: Path = Path("meg-demo")
    model: str = "meg-tiny"
    """Family of device and loopback edge (`meg demo` resolves its "auto" before calling)."""
    seed: int = 0
    strength: float | None = None
    """Refine strength; None: the recipe's default (`PreviewRefineConfig.strength`)."""
    device_profile: str = "jetson-agx-orin"
    runtime: str = "eager"


@contextlib.contextmanager
def _loopback_edge(model: str, pipeline: Any) -> Iterator[str]:
    from meg.services.background import ServiceLoop, start_edge
    from meg.services.edge_config import EdgeConfig

    loop = ServiceLoop()
    try:
        edge = start_edge(EdgeConfig(port=0, model=model), pipeline=pipeline, loop=loop)
        try:
            yield edge.address
        finally:
            edge.stop(0.5)
    finally:
        loop.close()


def _open_session(client: Any, pipeline: Any, model: str, seed: int, device_profile: str) -> Any:
    from meg.session import PreviewSession

    return PreviewSession(client, pipeline, model=model, seed=seed, device_profile=device_profile)


def _save_round(session: Any, out_dir: Path) -> Path:
    from meg.services.client import save_png

    path = out_dir / f"preview-{len(session.rounds)}.png"
    save_png(session.rounds[-1].image, path)
    return path


def _save_final(result: Any, out_dir: Path) -> tuple[Path, Path]:
    from meg.services.client import save_png

    image, report = out_dir / "image.png", out_dir / "report.json"
    save_png(result.image, image)
    result.report.save(report)
    return image, report


def run_session_demo(config: SessionDemoConfig = SessionDemoConfig()) -> dict[str, Any]:
    """Replay ``config.rounds`` then refine; write previews, image.png, report.json and
    session.json (the rounds with their measured preview times) into ``config.out_dir``."""
    import torch

    import meg.models  # noqa: F401  (registers meg-tiny as a model source)
    from meg.services.client import ClientConfig, DeviceClient
    from meg.split.loading import load_pipeline

    torch.set_num_threads(1)
    model = config.model
    pipeline = load_pipeline(model)
    out = Path(config.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with (_loopback_edge(model, pipeline) as address,
          DeviceClient([address], ClientConfig(model=model, runtime=config.runtime),  # type: ignore[arg-type]
                       pipeline=pipeline) as client):
        session = _open_session(client, pipeline, model, config.seed, config.device_profile)
        previews = []
        for prompt in config.rounds:
            session.preview(prompt)
            previews.append(str(_save_round(session, out)))
        result = session.final(strength=config.strength)
    image, report = _save_final(result, out)
    summary = {
        "model": model, "previewer": session.previewer, "refined": result.refined,
        "rounds": [{"prompt": r.prompt, "seed": r.seed, "preview_s": round(r.preview_s, 4), "png": p}
                   for r, p in zip(session.rounds, previews, strict=True)],
        "final": {"png": str(image), "report": str(report), **result.report.extra.get("preview_refine", {})},
    }
    (out / "session.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def _interact(session: Any, out_dir: Path, lines: TextIO, echo: Any) -> None:
    from meg.errors import MegError

    echo("type a prompt to preview it; /edit STRENGTH PROMPT re-noises the last preview for the edited "
         "prompt; /final [STRENGTH] refines the last preview; /quit ends")
    for raw in lines:
        line = raw.strip()
        if not line:
            continue
        if line in ("/quit", "/exit"):
            return
        try:
            if line.startswith("/final"):
                words = line.split()
                strength = float(words[1]) if len(words) > 1 else None
                result = session.final(strength=strength)
                image, report = _save_final(result, out_dir)
                state = "refined by the edge" if result.refined else "edge lost: the last preview is the result"
                echo(f"final ({state}): {image}, {report}")
            elif line.startswith("/edit"):
                words = line.split(maxsplit=2)
                current = session.preview(words[2] if len(words) > 2 else "", edit_strength=float(words[1]))
                echo(f"round {len(session.rounds)} (edit): {_save_round(session, out_dir)} "
                     f"({current.preview_s * 1000:.0f} ms)")
            elif line.startswith("/"):
                echo(f"unknown command {line.split()[0]!r} (/edit, /final, /quit)")
            else:
                current = session.preview(line)
                echo(f"round {len(session.rounds)}: {_save_round(session, out_dir)} ({current.preview_s * 1000:.0f} ms)")
        except (MegError, ValueError) as exc:
            echo(f"error: {getattr(exc, 'message', exc)} (the session keeps its {len(session.rounds)} rounds)")


@click.command("session")
@click.option("--edge", "edge_address", default=None, help="Edge address host:port (default: one on loopback).")
@click.option("--model", default=SessionDemoConfig.model, show_default=True,
              help="Model family of device (and loopback edge).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("meg-session"),
              show_default=True, help="Folder for previews, the final image and its report.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of every round.")
def session(edge_address: str | None, model: str, out_dir: Path, seed: int) -> None:
    """Preview–refine in the terminal: each typed prompt is previewed on this device and
    written as a PNG; /final sends the last preview to the edge for refinement."""
    import torch

    import meg.models  # noqa: F401
    from meg.services.client import ClientConfig, DeviceClient
    from meg.split.loading import load_pipeline

    torch.set_num_threads(1)
    pipeline = load_pipeline(model)
    out_dir.mkdir(parents=True, exist_ok=True)
    edge = contextlib.nullcontext(edge_address) if edge_address else _loopback_edge(model, pipeline)
    with edge as address, DeviceClient([address], ClientConfig(model=model, runtime="eager"), pipeline=pipeline) as client:
        _interact(_open_session(client, pipeline, model, seed, "jetson-agx-orin"), out_dir, sys.stdin, click.echo)
