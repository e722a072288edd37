"""FLOPs per partition: closed forms, conservation across split points, ToMe savings."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from meg.devices.flops import count_flops
from meg.split.engine import GenerationInputs, SplitEngine
from meg.split.flops import partition_flops, stage_flops
from meg.split.loading import load_pipeline
from meg.split.points import SplitPoint

INPUTS = GenerationInputs("a red cube", steps=4)


@pytest.fixture(scope="module")
def engine() -> SplitEngine:
    return SplitEngine(load_pipeline("tiny-random"))


def test_cpu_attention_is_counted() -> None:
    q = torch.zeros(1, 2, 77, 16)
    # QKᵀ and AV: 2 matmuls of 77×16×77 per head, 2 FLOPs per multiply-accumulate.
    assert count_flops(lambda: F.scaled_dot_product_attention(q, q, q)) == 2 * 2 * (2 * 77 * 77 * 16)


def test_text_encoder_closed_form(engine: SplitEngine) -> None:
    # CLIP layer, L=77 tokens, width E=32, MLP I=64: 4 projections L·E·E, attention
    # 2·L·L·E, MLP 2·L·E·I multiply-accumulates; 2 layers, 2 prompts (guidance).
    macs = 4 * 77 * 32 * 32 + 2 * 77 * 77 * 32 + 2 * 77 * 32 * 64
    assert stage_flops(engine, INPUTS)["text"] == 2 * macs * 2 * 2


def test_every_split_conserves_total_work(engine: SplitEngine) -> None:
    total = partition_flops(engine, SplitPoint("device"), INPUTS).device_flops
    assert total > 0
    for split in engine.split_points(INPUTS.steps):
        f = partition_flops(engine, split, INPUTS)
        assert f.edge_flops + f.device_flops == pytest.approx(total, rel=1e-12), str(split)
        assert f.edge_flops >= 0 and f.device_flops >= 0


def test_partition_shapes(engine: SplitEngine) -> None:
    s = stage_flops(engine, INPUTS)
    step2 = partition_flops(engine, SplitPoint("step", 2), INPUTS)
    assert step2.edge_flops == s["text"] + 2 * s["step_edge"]
    assert step2.edge_flops_per_step == step2.device_flops_per_step == s["step_edge"]
    decoder = partition_flops(engine, SplitPoint("decoder"), INPUTS)
    assert decoder.device_flops == s["decode_dev"] and decoder.device_flops_per_step == 0.0
    image = partition_flops(engine, SplitPoint("image"), INPUTS)
    assert image.device_flops == 0.0
    # Cutting later inside the UNet moves work to the edge, monotonically.
    parts = [partition_flops(engine, SplitPoint("unet", b), INPUTS).edge_flops_per_step for b in range(1, 5)]
    assert parts == sorted(parts) and parts[-1] < s["step_edge"]
    for b in range(1, 5):
        cut = stage_flops(engine, INPUTS, boundary=b)
        assert cut["part_edge"] + cut["rest_dev"] == cut["step_edge"]


def test_guidance_doubles_unet_work(engine: SplitEngine) -> None:
    with_cfg = stage_flops(engine, INPUTS)["step_edge"]
    without = stage_flops(engine, GenerationInputs("a red cube", guidance_scale=1.0))["step_edge"]
    assert with_cfg == 2 * without


def test_tome_reduces_edge_flops_only(engine: SplitEngine) -> None:
    plain = partition_flops(engine, SplitPoint("step", 2), INPUTS)
    merged = partition_flops(engine, SplitPoint("step", 2), INPUTS, tome_ratio=0.5)
    assert merged.edge_flops < plain.edge_flops
    assert merged.device_flops == plain.device_flops
