"""Every training stage runs end to end on a CPU at smoke scale, resumes, and is seeded."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from meg.models import registry
from meg.models.cards import write_cards
from meg.models.family import FamilyConfig
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
