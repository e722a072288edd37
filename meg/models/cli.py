"""`meg train ...` and `meg eval ...`: train the meg-tiny family and measure it."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from meg.models.registry import MODELS_ROOT
from meg.models.sr_cli import sr_diffusion, sr_light
from meg.models.training import CAPTION_STYLES, DECODER_LOSSES

__all__ = ["eval_group", "train"]

_STAGE_ORDER = ("data", "vae", "text", "teacher", "distill", "judge", "decoder", "small")


def _session(work_dir: Path, model_dir: Path, device: str, smoke: bool, progress: bool = True, budget: str = "cpu", threads: int = 0):
    import torch

    from meg.models.family import FamilyConfig
    from meg.models.training import Session, TrainConfig

    if threads:
        torch.set_num_threads(threads)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model_dir.mkdir(parents=True, exist_ok=True)
    return Session(
        work_dir=work_dir,
        model_dir=model_dir,
        family=FamilyConfig.smoke() if smoke else FamilyConfig.gpu() if budget == "gpu" else FamilyConfig(),
        train=TrainConfig.smoke() if smoke else TrainConfig.gpu() if budget == "gpu" else TrainConfig(),
        device=torch.device(device),
        progress=progress,
    )


def _where_options(fn):
    """Options of every training command: folders, device, threads."""
    fn = click.option("--work-dir", type=click.Path(path_type=Path), default=Path("runs/meg-tiny"), show_default=True,
                      help="Checkpoints, loss logs and loss-curve PNGs.")(fn)  # fmt: skip
    fn = click.option("--model-dir", type=click.Path(path_type=Path), default=MODELS_ROOT / "meg-tiny", show_default=True,
                      help="Where the trained components are written (diffusers folders).")(fn)  # fmt: skip
    fn = click.option("--device", type=click.Choice(["auto", "cpu", "cuda"]), default="auto", show_default=True)(fn)
    fn = click.option("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default).")(fn)
    return fn


def _options(fn):
    fn = _where_options(fn)
    fn = click.option("--tiny", "smoke", is_flag=True, help="Miniature models and a few steps (smoke test).")(fn)
    fn = click.option("--budget", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
                      help="cpu: the family sized to retrain on a 2-core CPU in < 90 min; gpu: the larger family "
                           "of the shipped weights.")(fn)  # fmt: skip
    return fn


@click.group()
def train() -> None:
    """Train the meg-tiny family: data, vae, text, teacher, distill, decoder, small, judge, or all.

    Every stage resumes from its checkpoint in --work-dir and reads earlier stages'
    components from --model-dir.
    """


def _make_stage_command(name: str) -> click.Command:
    @_options
    def command(work_dir: Path, model_dir: Path, device: str, smoke: bool, threads: int, budget: str) -> None:
        from meg.models.stages import run_stage

        session = _session(work_dir, model_dir, device, smoke, budget=budget, threads=threads)
        elapsed = run_stage(session, name)
        click.echo(f"{name}: {elapsed:.1f} s on {session.device}; wrote {model_dir}")

    command.__doc__ = f"Train stage '{name}'."
    return click.command(name=name)(command)


for _name in _STAGE_ORDER:
    train.add_command(_make_stage_command(_name))


def _recorded_session(work_dir: Path, model_dir: Path, device: str, threads: int):
    """A session with the family's own recorded configs (training.json; fields the record
    lacks take the defaults) that leaves the recorded configs as they were."""
    from dataclasses import fields

    from meg.models.family import FamilyConfig
    from meg.models.training import TrainConfig

    path = model_dir / "training.json"
    if not path.exists():
        raise click.BadParameter(f"{str(model_dir)!r} holds no training.json (train the family first)", param_hint="--model-dir")
    recorded = json.loads(path.read_text())

    def build(cls, values: dict):
        names = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items() if k in names})

    session = _session(work_dir, model_dir, device, smoke=False, threads=threads)
    session.family, session.train = build(FamilyConfig, recorded["family"]), build(TrainConfig, recorded["train"])
    session.record_configs = False
    return session


def _continue_options(fn):
    fn = click.option("--lr", type=float, default=5e-5, show_default=True)(fn)
    fn = click.option("--batch", type=int, default=16, show_default=True)(fn)
    fn = click.option("--steps", type=int, default=600, show_default=True)(fn)
    return _where_options(fn)


@train.command(name="decoder-continue")
@_continue_options
@click.option("--crop", type=click.IntRange(min=8), default=128, show_default=True, help="Crop side in pixels (multiple of 8).")
@click.option("--loss", type=click.Choice(DECODER_LOSSES), default="absolute", show_default=True)
@click.option("--pool", type=int, default=1024, show_default=True, help="Fresh scenes encoded, and as many student samples of their captions.")
def decoder_continue(work_dir: Path, model_dir: Path, device: str, threads: int, steps: int, batch: int, lr: float, crop: int, loss: str, pool: int) -> None:
    """Continue training the family's merge-aware decoder (vae_merge) on a CPU-sized budget.

    Keeps the family's recorded configs in training.json and records the continuation under
    "decoder_continue"; measure with `meg eval decoder`.
    """
    from meg.models.stages import continue_decoder

    if crop % 8:
        raise click.BadParameter(f"crop must be a multiple of 8, got {crop}", param_hint="--crop")
    session = _recorded_session(work_dir, model_dir, device, threads)
    if crop > session.family.image_size:
        raise click.BadParameter(f"crop {crop} is larger than the family's {session.family.image_size}-px images", param_hint="--crop")
    elapsed = continue_decoder(session, steps=steps, batch=batch, crop=crop, lr=lr, loss=loss, pool=pool)
    click.echo(f"decoder-continue: {elapsed:.1f} s on {session.device}; wrote {model_dir / 'vae_merge'}")


@train.command(name="decoder-paper")
@_continue_options
@click.option("--crop", type=click.IntRange(min=8), default=64, show_default=True, help="Crop side in pixels (multiple of 8).")
@click.option("--prompts", type=click.IntRange(min=1), default=384, show_default=True,
              help="Fresh training-distribution captions; each is generated at every step count and at the reference's.")  # fmt: skip
@click.option("--min-steps", type=click.IntRange(min=1), default=4, show_default=True, help="Fewest edge steps L (paper: 4).")
@click.option("--max-steps", type=click.IntRange(min=1), default=11, show_default=True, help="Most edge steps L (paper: 11).")
@click.option("--reference-steps", type=click.IntRange(min=1), default=12, show_default=True, help="Steps of the target image (paper: 12).")
@click.option("--ratio-high", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="Merge ratio ~ U(0, this), clipped to 0.75 (paper: 1); 0 trains on channel noise alone.")  # fmt: skip
@click.option("--sigma", type=(float, float), default=(0.05, 0.32), show_default=True, help="Channel noise σ ~ U(lo, hi) (paper: 0.05 0.32).")
@click.option("--tome-ratio", type=click.FloatRange(0, 0.74), default=0.5, show_default=True, help="ToMe ratio inside the edge UNet (paper: 0.5).")
@click.option("--init", default="vae", show_default=True, help="Decoder folder to start from (paper: the stock decoder, vae).")
@click.option("--out", default="vae_merge_paper", show_default=True, help="Folder the decoder is written to, inside the model folder.")
def decoder_paper(work_dir: Path, model_dir: Path, device: str, threads: int, steps: int, batch: int, lr: float, crop: int, prompts: int,
                  min_steps: int, max_steps: int, reference_steps: int, ratio_high: float, sigma: tuple[float, float], tome_ratio: float,
                  init: str, out: str) -> None:  # fmt: skip
    """Distil a merge-aware decoder as MEG's paper does (target: the 12-step reference image).

    Each sample draws L ~ U{min..max steps}, a merge ratio and a channel σ; the decoder
    sees the L-step edge latent through merge → noise → unmerge and learns the reference
    image. Seeded; recorded in training.json under OUT; compare with `meg eval decoders`.
    """
    from meg.models.stages import distil_decoder_paper

    if crop % 8:
        raise click.BadParameter(f"crop must be a multiple of 8, got {crop}", param_hint="--crop")
    if min_steps > max_steps or max_steps > reference_steps:
        raise click.BadParameter(f"need min-steps {min_steps} <= max-steps {max_steps} <= reference-steps {reference_steps}")
    if not 0 <= sigma[0] <= sigma[1]:
        raise click.BadParameter(f"sigma range {sigma} must satisfy 0 <= lo <= hi", param_hint="--sigma")
    session = _recorded_session(work_dir, model_dir, device, threads)
    if crop > session.family.image_size:
        raise click.BadParameter(f"crop {crop} is larger than the family's {session.family.image_size}-px images", param_hint="--crop")
    if not (model_dir / init).is_dir():
        raise click.BadParameter(f"{str(model_dir / init)!r} is not a decoder folder", param_hint="--init")
    elapsed = distil_decoder_paper(session, steps=steps, batch=batch, crop=crop, lr=lr, prompts=prompts, step_range=(min_steps, max_steps),
                                   reference_steps=reference_steps, ratio_high=ratio_high, sigma=sigma, tome_ratio=tome_ratio,
                                   init=init, out=out)  # fmt: skip
    click.echo(f"decoder-paper: {elapsed:.1f} s on {session.device}; wrote {model_dir / out}")


@train.command(name="teacher-continue")
@_continue_options
@click.option("--min-snr", type=float, default=0.0, show_default=True, help="Min-SNR-γ loss weighting (0: off).")
@click.option("--scenes", type=int, default=16_384, show_default=True, help="Fresh training-distribution scenes to train on.")
@click.option("--captions", type=click.Choice(CAPTION_STYLES), default="templates", show_default=True,
              help="templates: the family's caption templates; augmented: many more phrasings (meg.models.paraphrase).")  # fmt: skip
@click.option("--captions-per-scene", type=int, default=None, help="Captions drawn per scene (default: the recorded training config's).")
@click.option("--object-weight", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Extra loss weight of latent pixels covered by objects (0: plain loss).")  # fmt: skip
@click.option("--scene-seed", type=int, default=505, show_default=True, help="Seed offset of the fresh scenes and their captions.")
def teacher_continue(work_dir: Path, model_dir: Path, device: str, threads: int, steps: int, batch: int, lr: float, min_snr: float, scenes: int,
                     captions: str, captions_per_scene: int | None, object_weight: float, scene_seed: int) -> None:  # fmt: skip
    """Continue training the family's teacher UNet (text encoder frozen) on a CPU-sized budget.

    Keeps the family's recorded configs in training.json and records the continuation under
    "teacher_continue"; measure with `meg eval fidelity --unet teacher`.
    """
    from meg.models.stages import continue_teacher

    session = _recorded_session(work_dir, model_dir, device, threads)
    elapsed = continue_teacher(session, steps=steps, batch=batch, lr=lr, min_snr=min_snr, scenes=scenes, captions=captions,
                               captions_per_scene=captions_per_scene, object_weight=object_weight, scene_seed=scene_seed)  # fmt: skip
    click.echo(f"teacher-continue: {elapsed:.1f} s on {session.device}; wrote {model_dir / 'teacher_unet'}")


@train.command(name="distill-continue")
@_continue_options
@click.option("--targets", default="unet,small_unet", show_default=True, help="Comma-separated students: unet, small_unet.")
@click.option("--trajectories", type=click.IntRange(min=1), default=2048, show_default=True,
              help="Fresh teacher trajectories (one per fresh scene's caption), shared by the targets.")  # fmt: skip
@click.option("--captions", type=click.Choice(CAPTION_STYLES), default="augmented", show_default=True)
@click.option("--scene-seed", type=int, default=707, show_default=True, help="Seed offset of the fresh scenes and their captions.")
def distill_continue(work_dir: Path, model_dir: Path, device: str, threads: int, steps: int, batch: int, lr: float, targets: str,
                     trajectories: int, captions: str, scene_seed: int) -> None:  # fmt: skip
    """Continue distilling the family's students from its current teacher on a CPU-sized budget.

    Each target continues from its shipped weights on fresh teacher trajectories; recorded
    under "distill_continue" / "small_continue"; measure with `meg eval fidelity`.
    """
    from meg.models.stages import DISTILL_TARGETS, continue_distill

    names = tuple(t.strip() for t in targets.split(",") if t.strip())
    if not names or any(t not in DISTILL_TARGETS for t in names):
        raise click.BadParameter(f"targets must be among {', '.join(DISTILL_TARGETS)}, got {targets!r}", param_hint="--targets")
    session = _recorded_session(work_dir, model_dir, device, threads)
    elapsed = continue_distill(session, targets=names, steps=steps, batch=batch, lr=lr, trajectories=trajectories, captions=captions,
                               scene_seed=scene_seed)  # fmt: skip
    click.echo(f"distill-continue: {elapsed:.1f} s on {session.device}; wrote {', '.join(str(model_dir / t) for t in names)}")


@train.command(name="all")
@_options
@click.option("--skip-eval", is_flag=True, help="Do not measure the family after training.")
@click.option("--from-stage", type=click.Choice(_STAGE_ORDER), default="data", show_default=True)
def train_all(work_dir: Path, model_dir: Path, device: str, smoke: bool, threads: int, budget: str, skip_eval: bool, from_stage: str) -> None:
    """Every stage in order, then the family's measurements and model cards."""
    from meg.models.cards import write_cards
    from meg.models.stages import run_stage

    session = _session(work_dir, model_dir, device, smoke, budget=budget, threads=threads)
    t0 = time.perf_counter()
    for name in _STAGE_ORDER[_STAGE_ORDER.index(from_stage):]:
        elapsed = run_stage(session, name)
        click.echo(f"{name}: {elapsed:.1f} s")
    import torch

    session.record("all", wall_s=round(time.perf_counter() - t0, 1), threads=torch.get_num_threads(), cpu=_cpu_name())
    if not skip_eval:
        from meg.models.cards import evaluate_family

        evaluate_family(model_dir, device=str(session.device), n_prompts=session.train.n_eval_prompts)
    write_cards(model_dir)
    click.echo(f"all stages: {time.perf_counter() - t0:.1f} s on {session.device}")


def _cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), or the platform's processor string."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


@click.group(name="eval")
def eval_group() -> None:
    """Measure a model family: prompt fidelity, decoder MSE, the judge itself."""


@eval_group.command()
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), required=True,
              help="One prompt per line, or a .jsonl set with each prompt's ground truth (meg eval write-prompts).")  # fmt: skip
@click.option("--steps", type=int, default=4, show_default=True)
@click.option("--unet", type=click.Choice(["student", "teacher"]), default="student", show_default=True)
@click.option("--guidance", type=float, default=None, help="Guidance scale (default: the one the UNet was trained for).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--grid", "grid_path", type=click.Path(path_type=Path), default=None, help="PNG of the first 16 images.")
def fidelity(model: str, prompts_path: Path, steps: int, unet: str, guidance: float | None, seed: int, device: str,
             json_path: Path | None, grid_path: Path | None) -> None:  # fmt: skip
    """Generate one image per prompt and judge it (per-attribute accuracy, fidelity, FSD)."""
    from rich.console import Console
    from rich.table import Table

    from meg.models.captions import unknown_words
    from meg.models.evaluate import evaluate_fidelity, read_prompt_set

    prompts, specs = read_prompt_set(prompts_path)
    for p in prompts:
        if unknown := unknown_words(p):
            click.echo(f"warning: words outside the model's vocabulary in {p!r}: {', '.join(unknown)}", err=True)
    result: dict[str, Any] = evaluate_fidelity(model, prompts, steps=steps, unet=unet, guidance_scale=guidance, seed=seed, device=device,
                                               specs=specs)  # fmt: skip
    images = result.pop("_images")
    table = Table(title=f"{model} {unet}, {steps} steps, guidance {result['guidance_scale']}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("prompts", str(result["n_prompts"]))
    table.add_row("prompt fidelity", f"{result['fidelity']:.3f}")
    table.add_row("all attributes right", f"{result['exact']:.3f}")
    for k, v in result["attribute_accuracy"].items():  # type: ignore[union-attr]
        table.add_row(f"{k} accuracy", f"{v:.3f}")
    if "fsd" in result:
        table.add_row("FSD (generated vs rendered)", f"{result['fsd']:.2f}")
        table.add_row("FSD (rendered vs rendered)", f"{result['fsd_real_vs_real']:.2f}")
    Console().print(table)
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1) + "\n")
    if grid_path:
        from meg.models.cards import save_grid

        save_grid(images[:16], prompts[:16], grid_path)


@eval_group.command()
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--unet", type=click.Choice(["student", "teacher"]), default="teacher", show_default=True)
@click.option("--steps", type=int, default=None, help="Sampling steps (default: the family's teacher / student steps).")
@click.option("--guidance", "candidates", default="3,4,5,6,7.5", show_default=True, help="Comma-separated guidance scales to try.")
@click.option("--prompts", "prompt_set", default="val", show_default=True, help="Prompt file of the family (prompts/NAME.txt) to choose on.")
@click.option("--n", type=int, default=200, show_default=True, help="Prompts used.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def tune(model: str, unet: str, steps: int | None, candidates: str, prompt_set: str, n: int, device: str) -> None:
    """Choose a UNet's guidance scale on validation prompts (never on the reported sets).

    Records the choice under "tuned" in the family's training.json; `default_guidance`
    (and so every pipeline default and `meg eval fidelity`) uses it from then on.
    """
    from rich.console import Console
    from rich.table import Table

    from meg.models import registry
    from meg.models.evaluate import evaluate_fidelity, read_prompt_set

    if prompt_set in ("heldout", "indist", "independent"):
        raise click.BadParameter(f"{prompt_set!r} is a reported set; choose settings on another (e.g. val)", param_hint="--prompts")
    folder = registry.model_dir(model)
    path = folder / "prompts" / f"{prompt_set}.txt"
    prompts, specs = read_prompt_set(path if path.exists() else path.with_suffix(".jsonl"))
    prompts, specs = prompts[:n], specs[:n]
    training = json.loads((folder / "training.json").read_text())
    fam = training["family"]
    n_steps = steps or int(fam["teacher_steps"] if unet == "teacher" else fam["student_steps"])
    scores: dict[str, float] = {}
    for value in (float(v) for v in candidates.split(",")):
        r = evaluate_fidelity(model, prompts, steps=n_steps, unet=unet, guidance_scale=value, device=device, specs=specs)
        scores[f"{value:g}"] = round(float(r["fidelity"]), 4)
    best = max(scores, key=lambda k: scores[k])
    table = Table(title=f"{model} {unet}, {n_steps} steps, {len(prompts)} {prompt_set} prompts")
    table.add_column("guidance")
    table.add_column("fidelity", justify="right")
    for k, v in scores.items():
        table.add_row(k + (" *" if k == best else ""), f"{v:.3f}")
    Console().print(table)
    training.setdefault("tuned", {})[f"{unet}_guidance"] = {"value": float(best), "steps": n_steps, "prompts": prompt_set,
                                                            "n": len(prompts), "fidelity": scores}  # fmt: skip
    (folder / "training.json").write_text(json.dumps(training, indent=1, default=str))


@eval_group.command()
@click.argument("prompt")
def prompt(prompt: str) -> None:
    """How the world reads PROMPT: canonical form and unknown words."""
    from meg.models.captions import parse_prompt

    spec = parse_prompt(prompt)
    click.echo(f"canonical: {spec.canonical()}")
    for i, o in enumerate(spec.objects):
        click.echo(f"object {i}: colour={o.colour} shape={o.shape} size={o.size} position={o.position}")
    click.echo(f"background: texture={spec.texture} colour={spec.bg_colour}")
    if spec.unknown_words:
        click.echo(f"warning: words outside the vocabulary (the model cannot use them): {', '.join(spec.unknown_words)}", err=True)
        sys.exit(0)


@eval_group.command(name="judge")
@click.option("--prompts", "prompts_path", type=click.Path(path_type=Path), default=MODELS_ROOT / "meg-tiny" / "prompts" / "heldout.txt")
@click.option("--seed", type=int, default=0)
def judge_check(prompts_path: Path, seed: int) -> None:
    """The judge on ground-truth renders of each prompt (should score ≥ 0.95)."""
    from meg.models.evaluate import ground_truth_fidelity, read_prompt_set

    prompts, specs = read_prompt_set(prompts_path)
    report = ground_truth_fidelity(prompts, seed=seed, specs=specs)
    click.echo(json.dumps(report.to_dict(), indent=1))


@eval_group.command(name="write-prompts")
@click.option("--n", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--seed", type=int, default=4242, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), required=True, help="A .jsonl file: each prompt with its ground truth.")
def write_prompts(n: int, seed: int, out: Path) -> None:
    """Write a prompt set with the independent evaluation writer (meg.models.prompt_writer)."""
    from meg.models.prompt_writer import save_prompt_set, write_prompt_set

    if out.suffix != ".jsonl":
        raise click.BadParameter(f"the set keeps each prompt's ground truth: name a .jsonl file, got {str(out)!r}", param_hint="--out")
    save_prompt_set(write_prompt_set(n, seed), out)
    click.echo(f"wrote {n} prompts to {out}")


@eval_group.command()
@click.option("--model", default="meg-tiny", show_default=True)
@click.option("--ratio", type=float, default=0.5, show_default=True)
@click.option("--sigma", type=float, default=0.1, show_default=True)
@click.option("--n", type=int, default=128, show_default=True)
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
def decoder(model: str, ratio: float, sigma: float, n: int, device: str) -> None:
    """Image MSE vs the clean reference after merge + noise: stock vs merge-aware decoder."""
    from meg.models.evaluate import decoder_mse

    click.echo(json.dumps(decoder_mse(model, ratio=ratio, sigma=sigma, n=n, device=device), indent=1))


@train.command(name="estimate")
@click.option("--model-dir", type=click.Path(path_type=Path), default=MODELS_ROOT / "meg-tiny", show_default=True,
              help="The family whose training budget is estimated; the estimate is recorded in its training.json.")  # fmt: skip
@click.option("--steps", type=int, default=2, show_default=True, help="Measured steps per stage.")
@click.option("--threads", type=int, default=2, show_default=True)
def estimate(model_dir: Path, steps: int, threads: int) -> None:
    """Estimate `meg train all` on this machine's CPU from a measured slice.

    Runs every stage at full model size and full batch for --steps steps on a small data
    slice, then scales each measured part to the recorded budget (steps, scenes,
    trajectories). Prints a table and records it as "cpu_estimate" (an estimate, not a run).
    """
    import json
    import tempfile
    from dataclasses import replace

    import torch
    from rich.console import Console
    from rich.table import Table

    from meg.models.stages import run_stage
    from meg.models.training import TrainConfig

    torch.set_num_threads(threads)
    full = TrainConfig()
    small = replace(full, n_scenes=256, n_trajectories=64, trajectory_batch=64, n_eval_prompts=4, vae_steps=steps,
                    text_steps=steps, teacher_steps=steps, distill_steps=steps, small_steps=steps, decoder_steps=steps,
                    judge_steps=steps, warmup_steps=1, checkpoint_every=10_000)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        session = _session(Path(tmp) / "work", Path(tmp) / "model", "cpu", False, progress=False)
        session.train = small
        for name in _STAGE_ORDER:
            run_stage(session, name)
        measured = json.loads((session.model_dir / "training.json").read_text())
    rows = [("data", measured["data"]["time_s"] * full.n_scenes / small.n_scenes)]
    rows.append(("latents", measured["latents"]["time_s"] * full.n_scenes / small.n_scenes))
    rows.append(("trajectories", measured["trajectories"]["time_s"] * full.n_trajectories / small.n_trajectories))
    budget = {"vae": full.vae_steps, "text": full.text_steps, "teacher": full.teacher_steps, "distill": full.distill_steps,
              "small": full.small_steps, "decoder": full.decoder_steps, "judge": full.judge_steps}  # fmt: skip
    for name, n in budget.items():
        rows.append((name, measured[name]["time_s"] / steps * n))
    total = sum(t for _, t in rows)
    table = Table(title=f"CPU estimate of meg train all ({threads} threads; {steps} measured steps per stage)")
    table.add_column("part")
    table.add_column("estimated s", justify="right")
    for name, t in rows:
        table.add_row(name, f"{t:.0f}")
    table.add_row("total", f"{total:.0f} ({total / 60:.0f} min)")
    Console().print(table)
    text = (f"Estimated, not run: {total / 60:.0f} min for `meg train all` on this CPU with {threads} threads "
            f"(each stage measured for {steps} steps at full model size and batch, scaled to the recorded budget).")  # fmt: skip
    path = model_dir / "training.json"
    data = json.loads(path.read_text())
    data["cpu_estimate"] = {"total_s": round(total), "parts_s": {n: round(t) for n, t in rows}, "threads": threads, "text": text}
    path.write_text(json.dumps(data, indent=1, default=str))
    from meg.models.cards import write_cards

    write_cards(model_dir)


train.add_command(sr_light)
train.add_command(sr_diffusion)
