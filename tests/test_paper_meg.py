"""MEG as the paper defines it: the default MDP, ToMe in the edge's costs, the paper's decoder
distillation, per-decoder distortion tables and the reproduction benchmark."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_helpers import one_thread

from meg.errors import InvalidInputError
from meg.policy.checkpoint import load_checkpoint
from meg.policy.costs import SPLIT_CODES
from meg.policy.distortion import load_table
from meg.policy.env import EnvConfig, PlanSimulator

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_default_environment_is_the_papers_mdp() -> None:
    cfg = EnvConfig()
    assert (cfg.latency_limit_s, cfg.energy_limit_j, cfg.episode_length) == (3.0, 1800.0, 64)
    assert cfg.splits == ("decoder",) and cfg.steps == tuple(range(4, 13)) and cfg.resolutions == (1024,)
    assert cfg.reward_mse_offset == 0.0 and cfg.fading == "awgn" and cfg.distance_model == "iid"
    assert cfg.feature_noise == "fixed" and cfg.feature_sigma == 0.1 and cfg.edge_tome_ratio == 0.5
    sim = PlanSimulator(cfg)
    assert sim.table.tome_ratio == 0.5
    obs = sim.reset(4096, seed=3)
    first = obs[:, 0].copy()
    sim.step(np.full(4096, SPLIT_CODES.index("decoder")), np.full(4096, 8), np.full(4096, 0.5))
    second = sim.observation()[:, 0]
    # i.i.d. distance U[200, 300] m over AWGN path loss: SNR within the paper's range, no memory
    assert first.min() >= -4.5 and first.max() <= 2.3
    assert abs(np.corrcoef(first, second)[0, 1]) < 0.06
    # σ is the paper's fixed test noise, whatever the SNR; the reward is plain −log MSE
    np.testing.assert_array_equal(sim.noise_sigma(np.array([-4.0, 0.0, 2.0])), [0.1, 0.1, 0.1])
    reward, _, _, mse = sim.outcome(np.array([1]), np.array([8]), np.array([0.5]))
    np.testing.assert_allclose(reward, -np.log(mse))


def test_extended_preset_is_the_shipped_checkpoints_environment() -> None:
    from meg.policy.serving import packaged_checkpoint

    shipped = load_checkpoint(packaged_checkpoint("cvpo")).env_config
    assert shipped == EnvConfig.preset("extended")
    assert EnvConfig.preset("paper") == EnvConfig()
    assert EnvConfig.preset("extended", latency_limit_s=2.0).latency_limit_s == 2.0
    with pytest.raises(InvalidInputError, match="'bogus'"):
        EnvConfig.preset("bogus")


def test_edge_tome_enters_the_cost_and_must_match_the_table() -> None:
    paper = PlanSimulator(EnvConfig())
    plain_flops = load_table("meg-tiny-paper").cost_flops["by_resolution"]["1024"]
    assert plain_flops["tome_ratio"] == 0.5
    saving = 1 - plain_flops["unet_pass_flops_tome"] / plain_flops["unet_pass_flops"]
    assert 0.05 < saving < 0.3  # ToMe merges before self-attention only
    c = paper.costs(np.array(1), np.array(8), np.array(0.5), np.array(0.0), np.array(1024.0**2))
    expected_edge = plain_flops["text_encoder_flops"] + 8 * 2 * plain_flops["unet_pass_flops_tome"]
    assert float(c.edge_flops) == pytest.approx(expected_edge)
    assert float(c.device_flops) == pytest.approx(plain_flops["vae_decoder_flops"])
    with pytest.raises(InvalidInputError, match="ToMe ratio 0.5"):
        PlanSimulator(EnvConfig(edge_tome_ratio=0.25))
    with pytest.raises(InvalidInputError, match="edge_tome_ratio"):
        EnvConfig(edge_tome_ratio=0.8)


def test_per_sample_merge_ratios_in_the_training_feature_path() -> None:
    from meg.split.features import merge_noise_unmerge

    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ratios = torch.tensor([0.0, 0.5, 0.75])
    out = merge_noise_unmerge(latents, ratios, torch.zeros(3), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out[0], latents[0])  # ratio 0, no noise: untouched
    # merging makes tokens equal: the fraction of distinct tokens falls with the ratio
    distinct = [len({tuple(t.tolist()) for t in out[b].reshape(4, -1).T}) for b in range(3)]
    assert distinct[0] > distinct[1] > distinct[2]
    with pytest.raises(InvalidInputError, match="2 merge ratios for a batch of 3"):
        merge_noise_unmerge(latents, ratios[:2], torch.zeros(3), generator=torch.Generator())


def test_decoder_paper_distillation_trains_from_the_stock_decoder(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from meg.cli import cli
    from meg.models.registry import model_dir

    family = tmp_path / "meg-tiny"
    shutil.copytree(model_dir("meg-tiny"), family, ignore=shutil.ignore_patterns("*.png", "sr_unet", "judge"))
    result = CliRunner().invoke(cli, [
        "train", "decoder-paper", "--model-dir", str(family), "--work-dir", str(tmp_path / "work"), "--threads", "1",
        "--steps", "2", "--batch", "2", "--crop", "32", "--prompts", "2", "--min-steps", "2", "--max-steps", "3",
        "--reference-steps", "4", "--out", "vae_test"])
    assert result.exit_code == 0, result.output
    from safetensors.torch import load_file

    stock = load_file(str(family / "vae" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(family / "vae_test" / "diffusion_pytorch_model.safetensors"))
    changed = [k for k in stock if not torch.equal(stock[k], trained[k])]
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    record = json.loads((family / "training.json").read_text())["vae_test"]
    assert record["step_range"] == [2, 3] and record["reference_steps"] == 4 and record["init"] == "vae"
    assert np.isfinite(record["final_losses"]["image_mse"])
    pool = torch.load(next((tmp_path / "work" / "decoder_paper").glob("pool-*.pt")), weights_only=True)
    assert pool["latents"].shape[:2] == (2, 2) and pool["reference"].shape[0] == 2
    bad = CliRunner().invoke(cli, ["train", "decoder-paper", "--model-dir", str(family), "--min-steps", "9",
                                   "--max-steps", "4"])
    assert bad.exit_code == 2 and "min-steps 9" in bad.output


def test_profile_with_a_chosen_decoder_changes_what_the_device_decodes(tmp_path: Path) -> None:
    from meg.policy.measure_distortion import ProfileConfig, profile_distortion

    base = ProfileConfig(model="meg-tiny", prompts=("a red circle on the left",), height=128, width=128, steps=(2,),
                         reference_steps=3, merge_ratios=(0.5,), noise_sigmas=(0.1,), cost_resolutions=(512,),
                         tome_ratio=0.5, decoder="vae")
    stock = profile_distortion(base)
    aware = profile_distortion(dataclasses.replace(base, decoder="vae_merge"))
    assert stock.tome_ratio == 0.5 and stock.decoder == "vae" and aware.decoder == "vae_merge"
    by = {(p.split, p.steps): p.mse for p in stock.points}
    other = {(p.split, p.steps): p.mse for p in aware.points}
    # the edge's image (and the reference) use the stock decoder whatever the device's is
    assert by[("image", 2)] == other[("image", 2)]
    assert by[("decoder", 2)] != other[("decoder", 2)] and by[("device", 2)] != other[("device", 2)]
    assert stock.cost_flops["by_resolution"]["512"]["unet_pass_flops_tome"] < stock.cost_flops["by_resolution"]["512"]["unet_pass_flops"]
    with pytest.raises(InvalidInputError, match="vae_nope"):
        profile_distortion(dataclasses.replace(base, decoder="vae_nope"))


def test_fig3_headline_and_fig5_curves_from_the_packaged_tables() -> None:
    from meg.bench.paper_meg import DECODER_TABLES, PaperMegConfig, run_fig3, run_fig5

    config = PaperMegConfig(distances_m=(200.0, 250.0, 300.0))
    fig3 = run_fig3(config)
    at = {(r["scheme"], r["distance_m"]): r for r in fig3["rows"]}
    for d in (200.0, 300.0):
        meg, ceg, ms = at[("MEG", d)], at[("CEG", d)], at[("MS", d)]
        # MS and MEG send the same bits and run the same models: equal costs, different decoders
        assert meg["latency_s"] == ms["latency_s"] and meg["energy_j"] == ms["energy_j"]
        assert meg["latency_s"] < ceg["latency_s"] and meg["airtime_s"] < at[("MEG, no merging", d)]["airtime_s"]
    # farther is slower for everything that transmits
    assert at[("CEG", 300.0)]["latency_s"] > at[("CEG", 200.0)]["latency_s"]
    assert [h["distance_m"] for h in fig3["headline"]] == [200.0, 300.0]
    for h in fig3["headline"]:
        assert h["met"] == (h["latency_reduction"] >= 0.40 and h["meg_mse"] <= h["ms_mse"])
    fig5 = run_fig5(config)
    assert set(fig5["curves"]) == set(DECODER_TABLES)
    for curve in fig5["curves"].values():
        table = load_table(curve["table"])
        assert curve["merge_ratio"]["x"] == list(table.merge_ratios)
        # at grid points the curve is the measured table value
        expected = table.mse("decoder", np.array(8.0), np.array(0.5), np.array(0.1))
        i = curve["merge_ratio"]["x"].index(0.5)
        assert curve["merge_ratio"]["mse"][i] == pytest.approx(float(expected))


def test_a_policy_with_decoder_tables_puts_the_best_decoder_in_the_plan() -> None:
    from meg.policy.serving import RulePolicy
    from meg.v1 import generation_pb2, policy_service_pb2

    sim = PlanSimulator(EnvConfig(decoder_tables=("meg-tiny-paper-stock",)))
    # few steps: the paper's distillation wins; 12 steps without merging: stock wins
    assert sim.best_decoder(4, 0.5, 0.0) == "vae_merge_paper" and sim.best_decoder(12, 0.0, 0.0) == "vae"
    policy = RulePolicy(simulator=sim)
    plan = policy.decide(policy_service_pb2.Observation(channel=generation_pb2.ChannelState(snr_db=2.0), width=1024, height=1024))
    from meg.recipes.meg import DEVICE_DECODERS

    assert plan.params["decoder"] == DEVICE_DECODERS.index(sim.best_decoder(plan.steps, plan.merge_ratio, 2.0))
    one = RulePolicy(simulator=PlanSimulator(EnvConfig()))
    assert "decoder" not in one.decide(policy_service_pb2.Observation(channel=generation_pb2.ChannelState(snr_db=2.0))).params


def test_the_plan_chooses_the_better_decoder() -> None:
    alone = PlanSimulator(EnvConfig())
    both = PlanSimulator(EnvConfig(decoder_tables=("meg-tiny-paper-stock",)))
    stock = load_table("meg-tiny-paper-stock")
    steps = np.array([4.0, 8.0, 12.0, 12.0])
    merge = np.array([0.5, 0.25, 0.0, 0.75])
    for sim in (alone, both):
        sim.reset(len(steps), seed=0)
    split = np.full(len(steps), SPLIT_CODES.index("decoder"))
    _, _, _, mse_alone = alone.outcome(split, steps, merge)
    _, lat_both, _, mse_both = both.outcome(split, steps, merge)
    mse_stock = stock.mse("decoder", steps, merge, np.full(len(steps), 0.1))
    np.testing.assert_allclose(mse_both, np.minimum(mse_alone, mse_stock), rtol=1e-12)
    np.testing.assert_array_equal(lat_both, alone.outcome(split, steps, merge)[1])  # same costs
    with pytest.raises(InvalidInputError, match="ToMe 0"):
        PlanSimulator(EnvConfig(decoder_tables=("meg-tiny",)))


def test_margin_variants_train_with_the_margin_and_the_paper_defaults_without() -> None:
    from meg.bench.paper_meg import _train

    agent, history, seconds = _train("ppo-lagrangian", 1, 0, margin=0.05)
    assert agent.config.cost_margin == 0.05 and len(history) == 1 and seconds > 0
    plain, _, _ = _train("ppo-lagrangian", 1, 0)
    assert plain.config.cost_margin == 0.0 and plain.config.gamma == 0.97


def test_the_device_decodes_with_the_decoder_it_is_given(tmp_path: Path) -> None:
    """Through the real services: the paper-distilled decoder on the device gives exactly the
    image the split engine gives with that decoder, and not the default decoder's image."""
    import meg.models  # noqa: F401
    from meg.models.registry import load_vae
    from meg.recipes.plan import make_plan
    from meg.services.background import ServiceLoop, start_edge
    from meg.services.client import ClientConfig, DeviceClient, DeviceRequest
    from meg.services.edge import EdgeConfig
    from meg.split import GenerationInputs, SplitEngine, SplitPoint, load_pipeline

    pipeline = load_pipeline("meg-tiny")
    plan = make_plan("decoder", steps=2, merge_ratio=0.5, codec_chain="fp16", tome_ratio=0.5)
    request = DeviceRequest(prompt="a red circle on the left", seed=3, width=128, height=128, plan=plan)
    images = {}
    loop = ServiceLoop()
    edge = start_edge(EdgeConfig(model="meg-tiny", port=0), pipeline=pipeline, loop=loop)
    try:
        for decoder in (None, "vae_merge_paper"):
            config = ClientConfig(model="meg-tiny", runtime="torch", fallback=False, device_decoder=decoder,
                                  onnx_dir=tmp_path / "onnx")
            with DeviceClient(edge.address, config) as client:
                images[decoder] = client.generate(request).image
        # the plan chooses the decoder per request (DEVICE_DECODERS index 3: the paper's), eager runtime too
        chosen = make_plan("decoder", steps=2, merge_ratio=0.5, codec_chain="fp16", tome_ratio=0.5, params={"decoder": 3.0})
        for runtime in ("eager", "torch"):
            with DeviceClient(edge.address, ClientConfig(model="meg-tiny", runtime=runtime, fallback=False)) as client:
                result = client.generate(dataclasses.replace(request, plan=chosen))
                assert torch.equal(result.image, images["vae_merge_paper"]) or float(
                    (result.image - images["vae_merge_paper"]).abs().max()) < 1e-5
                assert result.report.plan["params"] == {"decoder": 3.0}
        with (DeviceClient(edge.address, ClientConfig(model="meg-tiny", runtime="eager", fallback=False)) as client,
              pytest.raises(InvalidInputError, match="decoder 7.0 is not one of 0..3")):
            client.generate(dataclasses.replace(request, plan=dataclasses.replace(chosen, params={"decoder": 7.0})))
    finally:
        edge.stop(0)
        loop.close()
    engine = SplitEngine(load_pipeline("meg-tiny"), device_vae=load_vae("meg-tiny", "vae_merge_paper"))
    inputs = GenerationInputs(prompt="a red circle on the left", seed=3, height=128, width=128, steps=2, guidance_scale=2.5)
    crossing = engine.run_edge(inputs, SplitPoint.parse("decoder"), tome_ratio=0.5)
    from meg.split.features import through_link

    received = through_link(crossing["latents"], "merge:0.5,fp16", None, seed=3, keep_merged=True)
    expected = engine.run_device({"latents": received}, inputs, SplitPoint.parse("decoder"))
    assert float((images["vae_merge_paper"] - expected).abs().max()) < 1e-4
    assert float((images[None] - images["vae_merge_paper"]).abs().max()) > 1e-3
    with pytest.raises(InvalidInputError, match="vae_nope"):
        load_vae("meg-tiny", "vae_nope")
