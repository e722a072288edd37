"""Every training stage runs end to end on a CPU at smoke scale, resumes, and is seeded."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from meg.models import registry
from meg.models.cards import write_cards
from meg.models.family import FamilyConfig, build_vae
from meg.models.stages import run_stage
from meg.models.training import Session, TrainConfig

STAGES = ("data", "vae", "text", "teacher", "distill", "judge", "decoder", "small")


def _session(root: Path) -> Session:
    train = replace(TrainConfig.smoke(), n_scenes=16, n_trajectories=4, trajectory_batch=4, n_eval_prompts=4)
    return Session(work_dir=root / "work", model_dir=root / "model", family=FamilyConfig.smoke(), train=train, progress=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Session:
    torch.set_num_threads(1)
    session = _session(tmp_path_factory.mktemp("family"))
    for stage in STAGES:
        run_stage(session, stage)
    return session


def test_all_stages_write_loadable_components(trained: Session) -> None:
    model = trained.model_dir
    for part in ("tokenizer", "text_encoder", "vae", "teacher_unet", "unet", "scheduler", "small_unet", "vae_merge", "judge"):
        assert (model / part).is_dir(), part
    for stage in ("vae", "text", "teacher", "distill", "decoder", "small", "judge"):
        assert (trained.work_dir / stage / "loss.png").stat().st_size > 1000
        assert (trained.work_dir / stage / "checkpoint.pt").exists()
    pipe = registry.load_pipeline(str(model))
    g = torch.Generator().manual_seed(0)
    image = pipe("a red circle", num_inference_steps=1, guidance_scale=2.5, generator=g, output_type="pt", height=128, width=128).images
    assert image.shape == (1, 3, 128, 128) and torch.isfinite(image).all()
    teacher = registry.load_pipeline(str(model), unet="teacher", merge_decoder=False)
    assert type(teacher.scheduler).__name__ == "DDIMScheduler"
    write_cards(model)
    card = (model / "README.md").read_text()
    assert "teacher: 4 steps" in card and "not measured" in card
    assert (model / "unet" / "README.md").exists()


def test_a_finished_stage_resumes_without_training_again(trained: Session) -> None:
    before = load_file(trained.model_dir / "teacher_unet" / "diffusion_pytorch_model.safetensors")
    history_len = len((trained.work_dir / "teacher" / "loss.png").read_bytes())
    run_stage(trained, "teacher")  # the checkpoint says all steps are done
    after = load_file(trained.model_dir / "teacher_unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert history_len > 0


def test_stages_are_seeded(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    a, b = _session(tmp_path / "a"), _session(tmp_path / "b")
    for s in (a, b):
        run_stage(s, "data")
        run_stage(s, "text")
    wa = load_file(a.model_dir / "text_encoder" / "model.safetensors")
    wb = load_file(b.model_dir / "text_encoder" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_lists_every_stage() -> None:
    from meg.cli import cli

    result = CliRunner().invoke(cli, ["train", "--help"])
    assert result.exit_code == 0
    for stage in (*STAGES, "all"):
        assert stage in result.output
    result = CliRunner().invoke(cli, ["eval", "prompt", "a crimson disc next to a giraffe"])
    assert result.exit_code == 0
    assert "colour=red shape=circle" in result.output and "giraffe" in result.output


def test_random_crops_are_the_named_windows() -> None:
    from meg.models.stages import _random_crops

    x = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    crops, corners = _random_crops(x, 8, torch.Generator().manual_seed(0), align=2)
    assert crops.shape == (2, 3, 8, 8)
    for i, (y, c) in enumerate(corners.tolist()):
        assert y % 2 == 0 and c % 2 == 0 and 0 <= y <= 8 and 0 <= c <= 8
        assert torch.equal(crops[i], x[i, :, y : y + 8, c : c + 8])


def test_default_budget_is_cpu_sized() -> None:
    # the family retrains on a 2-core CPU: fully convolutional VAE on crops, min-SNR teacher
    family, train = FamilyConfig(), TrainConfig()
    vae = build_vae(family)
    assert not family.vae_mid_attention and vae.config.mid_block_add_attention is False
    assert train.vae_crop < family.image_size and train.decoder_crop < family.image_size
    assert train.teacher_min_snr > 0


def test_training_budget_is_an_option_named_budget() -> None:
    # "recipe" names the paper systems (`meg demo --recipe`), not a training budget
    from meg.cli import cli

    for command in ("all", "teacher"):
        result = CliRunner().invoke(cli, ["train", command, "--help"])
        assert result.exit_code == 0 and "--budget [cpu|gpu]" in result.output and "--recipe" not in result.output


def test_guidance_is_tuned_on_validation_prompts_only(trained: Session) -> None:
    from meg.cli import cli

    model = str(trained.model_dir)
    assert (trained.model_dir / "prompts" / "val.txt").exists()
    refused = CliRunner().invoke(cli, ["eval", "tune", "--model", model, "--prompts", "heldout"])
    assert refused.exit_code != 0 and "reported set" in refused.output
    before = registry.default_guidance(model, "teacher")
    result = CliRunner().invoke(cli, ["eval", "tune", "--model", model, "--guidance", "1.5,9", "--n", "2"])
    assert result.exit_code == 0, result.output
    tuned = json.loads((trained.model_dir / "training.json").read_text())["tuned"]["teacher_guidance"]
    assert tuned["value"] in (1.5, 9.0) and set(tuned["fidelity"]) == {"1.5", "9"} and tuned["prompts"] == "val"
    assert registry.default_guidance(model, "teacher") == tuned["value"] != before
    assert registry.default_guidance(model, "student") == FamilyConfig.smoke().student_guidance


def test_gpu_budget_is_the_config_of_the_shipped_weights() -> None:
    from dataclasses import asdict

    shipped = json.loads((registry.model_dir("meg-tiny") / "training.json").read_text())
    for config, recorded in ((FamilyConfig.gpu(), shipped["family"]), (TrainConfig.gpu(), shipped["train"])):
        for key, value in asdict(config).items():
            if key in recorded:
                assert recorded[key] == (list(value) if isinstance(value, tuple) else value), key


def test_frozen_text_teacher_and_absolute_decoder_loss(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    session = _session(tmp_path)
    session.train = replace(session.train, teacher_text_lr=0.0, decoder_loss="absolute")
    for stage in ("data", "vae", "text"):
        run_stage(session, stage)
    text_before = load_file(session.model_dir / "text_encoder" / "model.safetensors")
    run_stage(session, "teacher")
    text_after = load_file(session.model_dir / "text_encoder" / "model.safetensors")
    assert all(torch.equal(text_before[k], text_after[k]) for k in text_before)
    assert (session.model_dir / "teacher_unet").is_dir()
    run_stage(session, "decoder")
    assert (session.model_dir / "vae_merge").is_dir()
    with pytest.raises(ValueError, match="relative_l1"):
        replace(session.train, decoder_loss="relative_l1")


def test_decoder_continue_trains_vae_merge_and_keeps_the_recorded_configs(trained: Session, tmp_path: Path) -> None:
    import shutil

    from meg.cli import cli

    model = tmp_path / "model"
    shutil.copytree(trained.model_dir, model)
    before_json = json.loads((model / "training.json").read_text())
    del before_json["train"]["decoder_loss"]  # a record older than a config field keeps its configs as recorded
    (model / "training.json").write_text(json.dumps(before_json))
    before = load_file(model / "vae_merge" / "diffusion_pytorch_model.safetensors")
    args = ["train", "decoder-continue", "--model-dir", str(model), "--work-dir", str(tmp_path / "work"), "--device", "cpu",
            "--steps", "3", "--batch", "2", "--crop", "32", "--pool", "3", "--loss", "relative"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    after = load_file(model / "vae_merge" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)
    recorded = json.loads((model / "training.json").read_text())
    assert recorded["train"] == before_json["train"] and recorded["family"] == before_json["family"]
    assert recorded["decoder"] == before_json["decoder"]
    cont = recorded["decoder_continue"]
    assert cont["steps"] == 3 and cont["pool"] == 6 and cont["loss"] == "relative" and cont["crop"] == 32
    write_cards(model)
    assert "decoder-continue" in (model / "vae_merge" / "README.md").read_text()
    for bad, name in (("30", "multiple of 8"), ("256", "larger than")):
        refused = CliRunner().invoke(cli, [*args[:-6], "--crop", bad])
        assert refused.exit_code != 0 and name in refused.output and bad in refused.output


def test_teacher_continue_trains_the_teacher_only_and_keeps_the_recorded_configs(trained: Session, tmp_path: Path) -> None:
    import shutil

    from meg.cli import cli

    model = tmp_path / "model"
    shutil.copytree(trained.model_dir, model)
    before_json = json.loads((model / "training.json").read_text())
    teacher = load_file(model / "teacher_unet" / "diffusion_pytorch_model.safetensors")
    text = load_file(model / "text_encoder" / "model.safetensors")
    args = ["train", "teacher-continue", "--model-dir", str(model), "--work-dir", str(tmp_path / "work"), "--device", "cpu",
            "--steps", "3", "--batch", "2", "--scenes", "5", "--min-snr", "5", "--captions", "augmented", "--captions-per-scene", "2",
            "--object-weight", "2"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    after = load_file(model / "teacher_unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(teacher[k], after[k]) for k in teacher)
    text_after = load_file(model / "text_encoder" / "model.safetensors")
    assert all(torch.equal(text[k], text_after[k]) for k in text)
    recorded = json.loads((model / "training.json").read_text())
    assert recorded["train"] == before_json["train"] and recorded["teacher"] == before_json["teacher"]
    cont = recorded["teacher_continue"]
    assert cont["steps"] == 3 and cont["scenes"] == 5 and cont["min_snr"] == 5.0
    assert (cont["captions"], cont["captions_per_scene"], cont["object_weight"]) == ("augmented", 2, 2.0)
    write_cards(model)
    card = (model / "README.md").read_text()
    assert card.index("- teacher:") < card.index("- teacher_continue: 3 steps") < card.index("- distill:")
    pipe = registry.load_pipeline(str(model), unet="teacher", merge_decoder=False)
    image = pipe("a red circle", num_inference_steps=2, guidance_scale=4.0, output_type="pt", height=128, width=128).images
    assert torch.isfinite(image).all()


def test_distill_continue_trains_both_students_from_the_teacher_and_keeps_the_recorded_configs(trained: Session, tmp_path: Path) -> None:
    import shutil

    from meg.cli import cli

    model = tmp_path / "model"
    shutil.copytree(trained.model_dir, model)
    before_json = json.loads((model / "training.json").read_text())
    names = {f: f"{f}/diffusion_pytorch_model.safetensors" for f in ("unet", "small_unet", "teacher_unet")}
    before = {f: load_file(model / p) for f, p in names.items()}
    args = ["train", "distill-continue", "--model-dir", str(model), "--work-dir", str(tmp_path / "work"), "--device", "cpu",
            "--steps", "2", "--batch", "2", "--trajectories", "3"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    after = {f: load_file(model / p) for f, p in names.items()}
    for folder in ("unet", "small_unet"):
        assert any(not torch.equal(before[folder][k], after[folder][k]) for k in before[folder]), folder
    assert all(torch.equal(before["teacher_unet"][k], after["teacher_unet"][k]) for k in before["teacher_unet"])
    recorded = json.loads((model / "training.json").read_text())
    assert recorded["train"] == before_json["train"] and recorded["distill"] == before_json["distill"]
    assert recorded["distill_continue"]["trajectories"] == 3 and recorded["small_continue"]["steps"] == 2
    assert recorded["trajectories_continue"]["n"] == 3
    write_cards(model)
    card = (model / "README.md").read_text()
    assert card.index("- distill:") < card.index("- distill_continue: 2 steps") < card.index("- small:") < card.index("- small_continue:")
    bad = CliRunner().invoke(cli, [*args[:-2], "--targets", "vae"])
    assert bad.exit_code != 0 and "targets must be among" in bad.output
