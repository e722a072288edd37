"""ToMe adapter over tomesd: per-request ratio, concurrency, max_downsample, clean removal."""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from diffusers import UNet2DConditionModel

from meg.errors import InvalidInputError
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.loading import load_pipeline
from meg.split.points import SplitPoint
from meg.split.tome import ToMeAdapter, ToMeConfig, default_max_downsample, is_patched, unet_lock
from meg.split.unet_stages import SD15_UNET_CONFIG

INPUTS = GenerationInputs("a red cube", seed=5, steps=3)
DECODER = SplitPoint("decoder")


@pytest.fixture(scope="module")
def engine() -> SplitEngine:
    return SplitEngine(load_pipeline("tiny-random"))


def _latents(engine: SplitEngine, ratio: float, split: SplitPoint = DECODER) -> torch.Tensor:
    return engine.run_edge(INPUTS, split, tome_ratio=ratio)["latents"]


def _meta_unet(**overrides: object) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config({**SD15_UNET_CONFIG, **overrides})


def test_max_downsample_per_architecture(engine: SplitEngine) -> None:
    assert default_max_downsample(_meta_unet()) == 1  # SD 1.5: attention at full latent size
    sdxl_like = _meta_unet(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    assert default_max_downsample(sdxl_like) == 2
    assert engine.tome.max_downsample == 2  # tiny-random: attention at ½ resolution only
    assert ToMeAdapter(engine.unet, ToMeConfig(max_downsample=4)).max_downsample == 4


def test_ratio_zero_is_bit_identical_to_unpatched(engine: SplitEngine) -> None:
    plain = _latents(engine, 0.0)
    with unet_lock(engine.unet):  # reference straight through the pipeline's UNet
        reference = engine.run_full(INPUTS)
    assert not is_patched(engine.unet)
    image = engine.run_device({"latents": plain}, INPUTS, DECODER)
    assert torch.equal(image, reference)


def test_ratio_changes_output_reproducibly_and_removal_restores(engine: SplitEngine) -> None:
    before = _latents(engine, 0.0)
    state = {k: v.clone() for k, v in engine.unet.state_dict().items()}
    classes = [type(m) for m in engine.unet.modules()]
    a = _latents(engine, 0.5)
    b = _latents(engine, 0.5)
    assert torch.equal(a, b)  # the merge draws come from the request seed
    assert float((a - before).abs().max()) > 1e-4  # merging did something
    assert not is_patched(engine.unet)
    assert [type(m) for m in engine.unet.modules()] == classes
    assert not any("_tome_info" in m.__dict__ for m in engine.unet.modules())
    assert not any(m._forward_pre_hooks for m in engine.unet.modules())
    assert all(torch.equal(v, state[k]) for k, v in engine.unet.state_dict().items())
    assert torch.equal(_latents(engine, 0.0), before)


def test_patched_only_inside_the_context(engine: SplitEngine) -> None:
    adapter = engine.tome
    with adapter.applied(0.5, generator=torch.Generator().manual_seed(0), latent_hw=(8, 8)) as unet:
        assert unet is engine.unet and is_patched(unet)
        assert unet._tome_info["args"]["ratio"] == 0.5
        assert unet._tome_info["args"]["max_downsample"] == 2
    assert not is_patched(engine.unet)
    with pytest.raises(RuntimeError, match="boom"), adapter.applied(0.5):
        raise RuntimeError("boom")
    assert not is_patched(engine.unet)


def test_tome_inside_a_unet_cut(engine: SplitEngine) -> None:
    # unet:2 runs the attention level on the edge, so merging changes what crosses.
    split = SplitPoint("unet", 2)
    plain = engine.run_edge(INPUTS, split)
    merged = engine.run_edge(INPUTS, split, tome_ratio=0.5)
    assert torch.equal(plain["skip.0"], merged["skip.0"])  # level 0 has no attention
    assert float((plain["hidden"] - merged["hidden"]).abs().max()) > 1e-5


@pytest.mark.parametrize("ratio", [-0.1, 0.75, 1.0, float("nan")])
def test_bad_ratio_names_the_value(engine: SplitEngine, ratio: float) -> None:
    with pytest.raises(InvalidInputError, match="tome_ratio") as info:
        engine.run_edge(INPUTS, DECODER, tome_ratio=ratio)
    assert info.value.field == "tome_ratio"


def test_concurrent_requests_keep_their_own_ratio(engine: SplitEngine) -> None:
    ratios = [0.0, 0.5, 0.25, 0.5, 0.0, 0.25]
    expected = {r: _latents(engine, r) for r in set(ratios)}
    assert not torch.equal(expected[0.25], expected[0.5])
    barrier = threading.Barrier(2)

    def request(ratio: float) -> torch.Tensor:
        with contextlib.suppress(threading.BrokenBarrierError):
            barrier.wait(timeout=5)  # start each pair of requests together
        return _latents(engine, ratio)

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(request, ratios))
    for ratio, latents in zip(ratios, results, strict=True):
        assert torch.equal(latents, expected[ratio]), ratio
    assert not is_patched(engine.unet)
