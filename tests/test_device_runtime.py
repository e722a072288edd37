"""Runtimes: explicit providers (missing → error or logged fallback, never silent), input checks."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import onnxruntime as ort
import pytest
import torch
from test_onnx_export import HEIGHT, TORCHSCRIPT, WIDTH, tiny_vae

from meg.codecs.merge import latent_to_tokens
from meg.errors import InvalidInputError, ModelNotFoundError, SplitError, UnavailableError
from meg.split.onnx_export import export_partitions
from meg.split.runtime import DeviceRuntime, OnnxRuntime, TorchRuntime, resolve_providers


@pytest.fixture(scope="module")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("decoder_only")
    export_partitions(out_dir=out, height=HEIGHT, width=WIDTH, vae=tiny_vae(), parts=("decoder",), options=TORCHSCRIPT)
    return out


def identity_index(batch: int, n: int) -> torch.Tensor:
    return torch.arange(n).expand(batch, -1).contiguous()


def test_cpu_provider_and_session_options(decoder_dir: Path) -> None:
    runtime = OnnxRuntime(decoder_dir, intra_op_threads=1)
    assert runtime.name == "onnxruntime" and runtime.providers == ("CPUExecutionProvider",)
    assert runtime.parts == ("decoder",)
    assert isinstance(runtime, DeviceRuntime) and isinstance(TorchRuntime(None, tiny_vae()), DeviceRuntime)
    options = runtime._session("decoder").get_session_options()
    assert options.intra_op_num_threads == 1
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert TorchRuntime(None, tiny_vae()).providers == ("torch-cpu",)


def test_missing_provider_is_an_error_naming_it(decoder_dir: Path) -> None:
    assert "TensorrtExecutionProvider" not in ort.get_available_providers()
    with pytest.raises(UnavailableError, match="'TensorrtExecutionProvider'"):
        OnnxRuntime(decoder_dir, providers=("TensorrtExecutionProvider", "CPUExecutionProvider"))
    with pytest.raises(InvalidInputError):
        resolve_providers(())
    with pytest.raises(InvalidInputError, match="intra_op_threads"):
        OnnxRuntime(decoder_dir, intra_op_threads=0)


def test_fallback_only_when_asked_and_logged(decoder_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="meg.split.runtime"):
        runtime = OnnxRuntime(decoder_dir, providers=("CUDAExecutionProvider",), allow_fallback=True)
    assert runtime.providers == ("CPUExecutionProvider",)
    assert any("CUDAExecutionProvider" in r.getMessage() for r in caplog.records)


def test_provider_the_session_silently_dropped_is_caught(decoder_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A build that lists CUDA but whose session comes up without it (e.g. no driver):
    # onnxruntime only warns; the runtime must not.
    listed = [*ort.get_available_providers(), "CUDAExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: listed)

    class CpuOnlySession:
        def __init__(self, path: str, sess_options: object = None, providers: object = None) -> None:
            self.path = path

        def get_providers(self) -> list[str]:
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(ort, "InferenceSession", CpuOnlySession)
    with pytest.raises(UnavailableError, match="CUDAExecutionProvider"):
        OnnxRuntime(decoder_dir, providers=("CUDAExecutionProvider", "CPUExecutionProvider"))
    runtime = OnnxRuntime(decoder_dir, providers=("CUDAExecutionProvider", "CPUExecutionProvider"), allow_fallback=True)
    assert runtime.providers == ("CPUExecutionProvider",)


def test_missing_export_and_missing_part(tmp_path: Path, decoder_dir: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="manifest.json"):
        OnnxRuntime(tmp_path)
    runtime = OnnxRuntime(decoder_dir)
    with pytest.raises(UnavailableError, match="'unet'"):
        runtime.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.zeros(1, 77, 16))
    with pytest.raises(UnavailableError, match="no UNet"):
        TorchRuntime(None, tiny_vae()).unet(torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.zeros(1, 77, 16))


def test_bad_decoder_inputs_are_rejected_before_the_kernel(decoder_dir: Path) -> None:
    runtime = OnnxRuntime(decoder_dir)
    latent = torch.zeros(1, 4, 8, 8)
    tokens = latent_to_tokens(latent)
    with pytest.raises(InvalidInputError, match="does not match the exported decoder"):
        runtime.decode_latent(latent_to_tokens(torch.zeros(1, 4, 16, 8)), identity_index(1, 32), (1, 4, 16, 8))
    with pytest.raises(InvalidInputError, match=r"\[0, 16\)"):
        bad = identity_index(1, 16).clone()
        bad[0, 3] = 16
        runtime.decode_latent(tokens, bad, (1, 4, 8, 8))
    with pytest.raises(InvalidInputError, match="gather_index must have shape"):
        runtime.decode_latent(tokens, identity_index(1, 15), (1, 4, 8, 8))
    with pytest.raises(InvalidInputError, match="int64"):
        runtime.decode_latent(tokens, identity_index(1, 16).int(), (1, 4, 8, 8))
    with pytest.raises(InvalidInputError, match="NaN"):
        runtime.decode_latent(torch.full_like(tokens, float("nan")), identity_index(1, 16), (1, 4, 8, 8))
    with pytest.raises(InvalidInputError, match="tokens must have shape"):
        TorchRuntime(None, tiny_vae()).decode_latent(tokens[..., :8], identity_index(1, 16), (1, 4, 8, 8))


def test_torch_runtime_decodes_with_an_sdxl_unet_but_refuses_to_drive_it() -> None:
    sdxl_like = torch.nn.Module()
    sdxl_like.config = SimpleNamespace(addition_embed_type="text_time")  # type: ignore[assignment]
    vae = tiny_vae()
    runtime = TorchRuntime(sdxl_like, vae)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert runtime.decode_latent(latent_to_tokens(latent), identity_index(1, 16), (1, 4, 8, 8)).shape == (1, 3, 64, 64)
    with pytest.raises(SplitError, match="text_time"):
        runtime.unet(torch.zeros(1, 4, 8, 8), torch.tensor(1), torch.zeros(1, 77, 16))
