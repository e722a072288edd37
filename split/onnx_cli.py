"""`meg export-onnx`: export the device partition of a split point to ONNX (cached)."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from meg.errors import MegError
from meg.split.onnx_export import EXPORTERS, ExportOptions

_DEFAULTS = ExportOptions()


def parts_for_split(split_text: str) -> tuple[str, ...]:
    """The ONNX partitions the device runs for a split point.

    ``decoder`` → the decoder; ``step:K``, ``device`` and ``unet:B`` → the UNet (the
    device's full steps) and the decoder; ``image`` runs nothing on the device.

    Raises:
        SplitError: an unknown split, or ``image``.
    """
    from meg.errors import SplitError
    from meg.split.points import SplitPoint

    split = SplitPoint.parse(split_text)
    if split.kind == "image":
        raise SplitError(f"split {split_text!r} runs nothing on the device; there is nothing to export", field="split")
    return ("decoder",) if split.kind == "decoder" else ("unet", "decoder")


@click.command("export-onnx")
@click.option("--model", default="tiny-random", show_default=True, help="tiny-random, meg-tiny or a local diffusers folder.")
@click.option("--split", "split_text", default="decoder", show_default=True, help="Split point: decoder, step:K, device, unet:B.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), required=True, help="Output folder.")
@click.option("--height", type=int, default=None, help="Image height in pixels (default: the model's native size).")
@click.option("--width", type=int, default=None, help="Image width in pixels (default: the model's native size).")
@click.option("--exporter", type=click.Choice(EXPORTERS),
              default=_DEFAULTS.exporter, show_default=True, help="auto: dynamo, falling back to TorchScript.")
@click.option("--opset", type=int, default=_DEFAULTS.opset, show_default=True, help="ONNX opset.")
def export_onnx(model: str, split_text: str, out_dir: Path, height: int | None, width: int | None, exporter: str, opset: int) -> None:
    """Export the device partition(s) of SPLIT to OUT (decoder.onnx, unet.onnx, manifest.json).

    A second run with the same weights and options reuses the files (content-hash cache).
    """
    from meg.split.loading import load_pipeline, native_size_px
    from meg.split.onnx_export import export_partitions

    logging.basicConfig(level=logging.WARNING)
    console = Console()
    try:
        parts = parts_for_split(split_text)
        pipeline = load_pipeline(model)
        native = native_size_px(pipeline)
        options = ExportOptions(exporter=exporter, opset=opset)  # type: ignore[arg-type]
        with console.status(f"exporting {', '.join(parts)}"):
            records = export_partitions(
                out_dir=out_dir, height=height or native, width=width or native,
                unet=pipeline.unet, vae=pipeline.vae, parts=parts, options=options,
            )
    except MegError as exc:
        raise click.ClickException(str(exc)) from exc
    table = Table("part", "file", "exporter", "export s", "cached", "MB", title=f"ONNX export of {model} ({split_text})")
    for record in records.values():
        size = sum(p.stat().st_size for p in record.path.parent.glob(record.path.name + "*"))
        table.add_row(record.part, str(record.path), record.exporter, f"{record.export_s:.2f}",
                      "yes" if record.cached else "no", f"{size / 1e6:.2f}")
    console.print(table)
