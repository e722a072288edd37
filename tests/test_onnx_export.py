"""ONNX export of the device partitions: torch ≈ onnxruntime (fp32, 1e-4), dynamic axes, cache."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import onnx
import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from meg.codecs.merge import latent_to_tokens, merge_latent, unmerge_latent
from meg.errors import InvalidInputError, SplitError
from meg.split import onnx_export
from meg.split.onnx_export import (
    ExportOptions,
    UNetGraph,
    export_device_partitions,
    export_partitions,
    read_manifest,
)
from meg.split.runtime import OnnxRuntime, TorchRuntime

TOL = 1e-4
TORCHSCRIPT = ExportOptions(exporter="torchscript")
HEIGHT = WIDTH = 64  # latent 8×8




def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    """Two levels, cross-attention at the lower one: the smallest SD-shaped UNet."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
        ).eval()


def tiny_vae(seed: int = 1) -> AutoencoderKL:
    """×8 downsampling (four levels) like SD's VAE, 4 latent channels."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1,
            sample_size=64, scaling_factor=0.18215,
        ).eval()


@pytest.fixture(scope="module")
def models() -> tuple[UNet2DConditionModel, AutoencoderKL]:
    return tiny_unet(), tiny_vae()


@pytest.fixture(scope="module")
def exported(models: tuple[UNet2DConditionModel, AutoencoderKL], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """Both partitions, exported with the TorchScript exporter (seconds; the dynamo
    exporter, the default, takes 10-60 s on these models and has its own slow test)."""
    unet, vae = models
    out = tmp_path_factory.mktemp("onnx")
    records = export_partitions(out_dir=out, height=HEIGHT, width=WIDTH, unet=unet, vae=vae, options=TORCHSCRIPT)
    return out, records


@pytest.fixture(scope="module")
def onnx_runtime(exported: tuple[Path, dict]) -> OnnxRuntime:
    return OnnxRuntime(exported[0])


def reference_decode(vae: AutoencoderKL, latent: torch.Tensor) -> torch.Tensor:
    """diffusers' own decode path, independent of DecoderGraph."""
    with torch.no_grad():
        image = vae.decode(latent / vae.config.scaling_factor, return_dict=False)[0]
    return (image / 2 + 0.5).clamp(0, 1)


def test_exporter_is_recorded(exported: tuple[Path, dict]) -> None:
    out, records = exported
    manifest = read_manifest(out)
    assert set(manifest["parts"]) == {"decoder", "unet"}
    for part, record in records.items():
        assert record.exporter == "torchscript"
        assert not record.cached and record.export_s > 0 and record.path.is_file()
        assert manifest["parts"][part]["exporter"] == record.exporter


def single_level_unet() -> UNet2DConditionModel:
    """One cross-attention level, no mid block: the cheapest UNet to trace with torch.export."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        return UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16,),
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",), mid_block_type=None,
            cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8,
        ).eval()


def two_level_vae() -> AutoencoderKL:
    """×2 downsampling: the cheapest VAE decoder to trace with torch.export."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(4)
        return AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(8, 8), latent_channels=4, norm_num_groups=4, layers_per_block=1, sample_size=16,
        ).eval()


@pytest.mark.slow
def test_default_auto_export_uses_dynamo_and_matches_torch(tmp_path: Path) -> None:
    unet, vae = single_level_unet(), two_level_vae()
    records = export_partitions(out_dir=tmp_path, height=16, width=16, unet=unet, vae=vae)
    assert {p: r.exporter for p, r in records.items()} == {"decoder": "dynamo", "unet": "dynamo"}
    assert read_manifest(tmp_path)["parts"]["decoder"]["latent_hw"] == [8, 8]
    runtime = OnnxRuntime(tmp_path)
    gen = torch.Generator().manual_seed(7)
    sample, text = torch.randn(3, 4, 16, 8, generator=gen), torch.randn(3, 5, 16, generator=gen)
    timestep = torch.tensor([999, 500, 1])
    noise_torch = TorchRuntime(unet, vae).unet(sample, timestep, text)
    assert (runtime.unet(sample, timestep, text) - noise_torch).abs().max().item() <= TOL
    merged = merge_latent(torch.randn(2, 4, 8, 8, generator=gen), 0.75, generator=gen)
    image_torch = TorchRuntime(None, vae).decode_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    image_onnx = runtime.decode_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    assert image_onnx.shape == (2, 3, 16, 16)
    assert (image_onnx - image_torch).abs().max().item() <= TOL


def test_decoder_matches_torch_for_merged_tokens(models, onnx_runtime: OnnxRuntime) -> None:
    _, vae = models
    onnx_rt, torch_rt = onnx_runtime, TorchRuntime(None, vae)
    gen = torch.Generator().manual_seed(0)
    # Batch 3 and half the tokens merged away: neither matches the traced example.
    latent = torch.randn(3, 4, 8, 8, generator=gen)
    merged = merge_latent(latent, 0.5, generator=gen)
    assert merged.tokens.shape[1] < 16
    image_onnx = onnx_rt.decode_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    image_torch = torch_rt.decode_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    assert image_onnx.shape == (3, 3, HEIGHT, WIDTH)
    assert (image_onnx - image_torch).abs().max().item() <= TOL
    unmerged = unmerge_latent(merged.tokens, merged.gather_index, merged.latent_shape)
    assert (image_torch - reference_decode(vae, unmerged)).abs().max().item() <= 1e-5
    assert image_onnx.min().item() >= 0.0 and image_onnx.max().item() <= 1.0


def test_decoder_unmerged_latent_batch_one(models, onnx_runtime: OnnxRuntime) -> None:
    _, vae = models
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1)) * 3
    tokens = latent_to_tokens(latent)
    index = torch.arange(tokens.shape[1]).expand(1, -1).contiguous()
    image = onnx_runtime.decode_latent(tokens, index, (1, 4, 8, 8))
    assert (image - reference_decode(vae, latent)).abs().max().item() <= TOL


@pytest.mark.parametrize(("batch", "side_h", "side_w", "text_len"), [(2, 8, 8, 77), (1, 16, 8, 5), (3, 4, 12, 9)])
def test_unet_matches_torch_with_dynamic_axes(
    models, onnx_runtime: OnnxRuntime, batch: int, side_h: int, side_w: int, text_len: int
) -> None:
    unet, vae = models
    gen = torch.Generator().manual_seed(batch)
    sample = torch.randn(batch, 4, side_h, side_w, generator=gen)
    text = torch.randn(batch, text_len, 16, generator=gen)
    timestep = torch.tensor(981)  # a scalar, as schedulers hand it out
    noise_onnx = onnx_runtime.unet(sample, timestep, text)
    noise_torch = TorchRuntime(unet, vae).unet(sample, timestep, text)
    assert noise_onnx.shape == sample.shape
    assert (noise_onnx - noise_torch).abs().max().item() <= TOL
    assert noise_torch.abs().max().item() > 1e-3  # not a degenerate all-zero comparison


def test_second_export_is_a_cache_hit(models, exported) -> None:
    unet, vae = models
    out, first = exported
    mtimes = {p: r.path.stat().st_mtime_ns for p, r in first.items()}
    again = export_partitions(out_dir=out, height=HEIGHT, width=WIDTH, unet=unet, vae=vae, options=TORCHSCRIPT)
    assert all(r.cached for r in again.values())
    assert {p: r.key for p, r in again.items()} == {p: r.key for p, r in first.items()}
    assert {p: r.path.stat().st_mtime_ns for p, r in again.items()} == mtimes
    paths = export_device_partitions(SimpleNamespace(unet=unet, vae=vae), out_dir=out, height=HEIGHT, width=WIDTH,
                                     options=TORCHSCRIPT)
    assert paths == {p: r.path for p, r in first.items()}


def test_changed_weights_or_options_miss_the_cache(tmp_path: Path) -> None:
    vae = tiny_vae()
    opts = TORCHSCRIPT
    first = export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("decoder",), options=opts)
    hit = export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("decoder",), options=opts)
    assert not first["decoder"].cached and hit["decoder"].cached
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.25)
    changed = export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("decoder",), options=opts)
    assert not changed["decoder"].cached and changed["decoder"].key != first["decoder"].key
    # The new file holds the new weights.
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    tokens = latent_to_tokens(latent)
    image = OnnxRuntime(tmp_path).decode_latent(tokens, torch.arange(16).expand(1, -1).contiguous(), (1, 4, 8, 8))
    assert (image - reference_decode(vae, latent)).abs().max().item() <= TOL


def test_auto_falls_back_to_torchscript_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(onnx_export, "_export_dynamo", broken)
    records = export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=tiny_vae(), parts=("decoder",))
    assert records["decoder"].exporter == "torchscript"
    assert json.loads((tmp_path / "manifest.json").read_text())["parts"]["decoder"]["exporter"] == "torchscript"
    assert any("dynamo ONNX export" in r.message for r in caplog.records)
    with pytest.raises(RuntimeError, match="unsupported operator"):
        export_partitions(out_dir=tmp_path / "strict", height=HEIGHT, width=WIDTH, vae=tiny_vae(),
                          parts=("decoder",), options=ExportOptions(exporter="dynamo"))


def test_large_weights_go_to_external_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD_BYTES", 0)
    vae = tiny_vae()
    records = export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("decoder",),
                                options=ExportOptions(exporter="torchscript"))
    path = records["decoder"].path
    assert records["decoder"].external_data
    data = Path(str(path) + ".data")
    assert data.is_file() and data.stat().st_size > 0
    graph = onnx.load(str(path), load_external_data=False).graph
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.initializer)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    image = OnnxRuntime(tmp_path).decode_latent(latent_to_tokens(latent), torch.arange(16).expand(1, -1).contiguous(), (1, 4, 8, 8))
    assert (image - reference_decode(vae, latent)).abs().max().item() <= TOL


def test_bad_export_requests(tmp_path: Path) -> None:
    vae = tiny_vae()
    with pytest.raises(InvalidInputError, match="'encoder'"):
        export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("encoder",))
    with pytest.raises(InvalidInputError, match="60x64"):
        export_partitions(out_dir=tmp_path, height=60, width=WIDTH, vae=vae, parts=("decoder",))
    with pytest.raises(InvalidInputError, match="needs the unet"):
        export_partitions(out_dir=tmp_path, height=HEIGHT, width=WIDTH, vae=vae, parts=("unet",))
    with pytest.raises(InvalidInputError, match="'onnx2'"):
        ExportOptions(exporter="onnx2")  # type: ignore[arg-type]
    sdxl_like = torch.nn.Module()
    sdxl_like.config = SimpleNamespace(addition_embed_type="text_time")  # type: ignore[assignment]
    with pytest.raises(SplitError, match="text_time"):
        UNetGraph(sdxl_like)
