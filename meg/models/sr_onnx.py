"""The light SR model on the device: ONNX export and an ONNX Runtime runner.

`export_light_sr(model, path)` writes one ONNX graph with dynamic batch, height and width
(TorchScript exporter: the network is a plain conv stack, and this exporter is fast and
keeps `PixelShuffle` as DepthToSpace); `LightSROnnx(path)(images)` runs it and returns a
torch tensor, so the device half can swap torch for ONNX Runtime without other changes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meg.errors import InvalidInputError, ModelNotFoundError
from meg.models.sr import SRVGGNetCompact

__all__ = ["LightSROnnx", "export_light_sr"]

_INPUT, _OUTPUT = "low_res", "high_res"


def export_light_sr(model: SRVGGNetCompact, path: Path, *, opset: int = 18) -> Path:
    """Export `model` (float32) to `path` (.onnx) with a `path.json` sidecar naming its scale.

    Input `low_res` [B, 3, h, w] float32 in [0, 1]; output `high_res` [B, 3, S·h, S·w].
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.float().eval()
    example = torch.zeros(1, model.config.in_channels, 16, 16)
    torch.onnx.export(
        model, (example,), str(path), dynamo=False, input_names=[_INPUT], output_names=[_OUTPUT],
        dynamic_axes={_INPUT: {0: "batch", 2: "height", 3: "width"}, _OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}},
        opset_version=opset, do_constant_folding=True,
    )  # fmt: skip
    path.with_suffix(".json").write_text(json.dumps({"scale": model.scale, "input": _INPUT, "output": _OUTPUT}) + "\n")
    return path


class LightSROnnx:
    """ONNX Runtime session of an exported light SR model: `runner(images) -> images`.

    Args:
        path: the .onnx file written by `export_light_sr`.
        providers: execution providers in priority order.
        intra_op_threads: threads per operator (default: torch's thread count).
    """

    def __init__(self, path: Path, *, providers: tuple[str, ...] = ("CPUExecutionProvider",),
                 intra_op_threads: int | None = None) -> None:  # fmt: skip
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise ModelNotFoundError(f"no ONNX light SR model at {str(path)!r}")
        sidecar = path.with_suffix(".json")
        self.scale = int(json.loads(sidecar.read_text())["scale"]) if sidecar.exists() else None
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = intra_op_threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        self.session: Any = ort.InferenceSession(str(path), sess_options=options, providers=list(providers))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, h, w] float in [0, 1] → [B, 3, S·h, S·w] float32 (not clamped, as torch)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise InvalidInputError(f"light SR input must be [B, 3, h, w], got {tuple(images.shape)}", field="low_res")
        x = np.ascontiguousarray(images.detach().cpu().float().numpy())
        (out,) = self.session.run([_OUTPUT], {_INPUT: x})
        return torch.from_numpy(out)
