"""Measure a trained family (eval.json) and write its model cards (README.md per folder)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from meg.models.evaluate import (
    decoder_mse,
    evaluate_fidelity,
    ground_truth_fidelity,
    read_prompt_set,
)

__all__ = ["evaluate_family", "save_grid", "write_cards"]


def save_grid(images: torch.Tensor, captions: list[str], path: Path, *, columns: int = 8) -> None:
    """A PNG grid of images [N,3,H,W] in [0,1] with wrapped captions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(images)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(1.9 * columns, 2.3 * rows), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < n:
            ax.imshow(images[k].permute(1, 2, 0).clamp(0, 1).numpy())
            cap = captions[k]
            ax.set_title("\n".join(cap[i : i + 30] for i in range(0, min(len(cap), 90), 30)), fontsize=5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def evaluate_family(model_dir: Path, *, device: str = "cpu", n_prompts: int = 200, seed: int = 0) -> dict:
    """Every measurement of the family in `model_dir`; written to model_dir/eval.json."""
    name = str(model_dir)
    training = json.loads((model_dir / "training.json").read_text())
    fam = training["family"]
    sets = {k: read_prompt_set(model_dir / "prompts" / f"{k}.txt") for k in ("heldout", "indist")}
    if (model_dir / "prompts" / "independent.jsonl").exists():
        sets["independent"] = read_prompt_set(model_dir / "prompts" / "independent.jsonl")
    sets = {k: (texts[:n_prompts], specs[:n_prompts]) for k, (texts, specs) in sets.items()}
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(model_dir / "vae", torch_dtype=torch.float32)
    results: dict[str, Any] = {
        "judge_on_renders": {k: ground_truth_fidelity(t, seed=seed, specs=s).to_dict() for k, (t, s) in sets.items()},
        "judge_on_vae_reconstructions": {k: ground_truth_fidelity(t, seed=seed, vae=vae, specs=s).to_dict() for k, (t, s) in sets.items()},
    }
    runs = [("teacher", int(fam["teacher_steps"]))] + [("student", n) for n in (1, 2, 4, 8)] + [("small", 4)]
    fidelity: dict = {}
    grids: dict = {}
    for unet, steps in runs:
        for set_name, (prompts, specs) in sets.items():
            t0 = time.perf_counter()
            r: dict[str, Any] = evaluate_fidelity(name, prompts, steps=steps, unet=unet, seed=seed, device=device, specs=specs)
            images = r.pop("_images")
            r["wall_s"] = round(time.perf_counter() - t0, 2)
            fidelity[f"{unet}/{steps}/{set_name}"] = r
            if set_name == "heldout" and (unet, steps) in (("teacher", int(fam["teacher_steps"])), ("student", 4), ("student", 1)):
                grids[f"{unet}-{steps}"] = images[:16]
    results["fidelity"] = fidelity
    if (model_dir / "vae_merge").exists():
        results["decoder"] = decoder_mse(name, ratio=0.5, sigma=0.1, n=min(128, n_prompts), seed=seed, device=device)
    (model_dir / "eval.json").write_text(json.dumps(results, indent=1) + "\n")
    for key, images in grids.items():
        save_grid(images, sets["heldout"][0][:16], model_dir / f"samples-{key}.png")
    return results


def _fmt_losses(entry: dict) -> str:
    losses = entry.get("final_losses", {})
    return ", ".join(f"{k} {v:.4g}" for k, v in losses.items()) or "—"


def _stage_line(training: dict, stage: str) -> str:
    e = training.get(stage, {})
    if not e:
        return f"- {stage}: not trained"
    line = (f"- {stage}: {e.get('steps', '—')} steps, {e.get('time_s', e.get('wall_s', '—'))} s on {e.get('device', '—')}; "
            f"final losses: {_fmt_losses(e)}")  # fmt: skip
    if stage == "decoder_continue":
        line += (f" (continued from `decoder` by `meg train decoder-continue`: batch {e.get('batch')}, {e.get('crop')}-px crops, "
                 f"lr {e.get('lr')}, {e.get('loss')} loss, {e.get('pool')} latents)")  # fmt: skip
    elif stage == "teacher_continue":
        line += (f" (continued from `teacher` by `meg train teacher-continue`: batch {e.get('batch')}, lr {e.get('lr')}, "
                 f"min-SNR {e.get('min_snr')}, {e.get('scenes')} fresh scenes, {e.get('captions', 'templates')} captions"
                 f" ×{e.get('captions_per_scene', 4)}, object loss weight {e.get('object_weight', 0.0)}, text encoder frozen)")  # fmt: skip
    elif stage == "vae_merge_paper":
        line += (f" (`meg train decoder-paper`: from the stock decoder, target the {e.get('reference_steps')}-step reference image, "
                 f"L ~ U{{{e.get('step_range', ['?', '?'])[0]}…{e.get('step_range', ['?', '?'])[1]}}}, merge ratio U(0, {e.get('ratio_high')}) "
                 f"clipped at 0.75, σ ~ U({', '.join(str(x) for x in e.get('sigma', []))}), ToMe {e.get('tome_ratio')} in the edge "
                 f"UNet; batch {e.get('batch')}, {e.get('crop')}-px crops, lr {e.get('lr')}, {e.get('prompts')} prompts)")  # fmt: skip
    elif stage in ("distill_continue", "small_continue"):
        line += (f" (continued from `{stage.removesuffix('_continue')}` by `meg train distill-continue` on the current teacher: "
                 f"batch {e.get('batch')}, lr {e.get('lr')}, {e.get('trajectories')} fresh trajectories of {e.get('captions')} captions)")  # fmt: skip
    return line


_STAGES = ("data", "vae", "text", "teacher", "distill", "small", "decoder", "vae_merge_paper", "judge")


def _with_continuation(stage: str, training: dict) -> tuple[str, ...]:
    """`stage`, then its `meg train STAGE-continue` record if the family has one."""
    return (stage, f"{stage}_continue") if f"{stage}_continue" in training else (stage,)


def _stages(training: dict) -> tuple[str, ...]:
    """The stages of a family's record, each optional continuation right after its stage."""
    return tuple(x for s in _STAGES for x in _with_continuation(s, training))


def _tuned_lines(training: dict) -> list[str]:
    """The guidance scales `meg eval tune` chose on validation prompts, as card lines."""
    lines = []
    for key, t in training.get("tuned", {}).items():
        tried = ", ".join(f"{g}: {v:.3f}" for g, v in t["fidelity"].items())
        lines.append(f"{key.split('_')[0].capitalize()} guidance {t['value']:g} was chosen on {t['n']} `{t['prompts']}` prompts "
                     f"(held-out pairs, disjoint from the reported sets; fidelity at {t['steps']} steps — {tried}).")  # fmt: skip
    return [*lines, ""] if lines else []


def write_cards(model_dir: Path) -> None:
    """README.md model cards for the family and each component folder."""
    training = json.loads((model_dir / "training.json").read_text())
    evaluation = json.loads((model_dir / "eval.json").read_text()) if (model_dir / "eval.json").exists() else {}
    fam, cfg = training["family"], training["train"]
    fid = evaluation.get("fidelity", {})

    def f(key: str) -> str:
        r = fid.get(key)
        return f"{r['fidelity']:.3f}" if r else "not measured"

    data = training.get("data", {})
    data_text = (
        f"{data.get('n_scenes', '—')} procedural scenes (seed {cfg['seed']}, `meg.models.world`), "
        f"{data.get('captions', '—')} paraphrased captions over a {data.get('vocabulary', '—')}-token vocabulary; "
        "colour–shape pairs in `meg.models.world.HELDOUT_PAIRS` never occur in training."
    )
    def exact(key: str) -> str:
        r = fid.get(key)
        return f"{r['exact']:.2f}" if r else "—"

    quality_rows = [
        "| UNet | steps | held-out prompts | in-distribution prompts | independent writer's prompts | all attributes right (held-out / independent) |",
        "|---|---|---|---|---|---|",
    ]
    for unet, steps in [("teacher", fam["teacher_steps"]), ("student", 1), ("student", 2), ("student", 4), ("student", 8), ("small", 4)]:
        quality_rows.append(f"| {unet} | {steps} | {f(f'{unet}/{steps}/heldout')} | {f(f'{unet}/{steps}/indist')} | "
                            f"{f(f'{unet}/{steps}/independent')} | {exact(f'{unet}/{steps}/heldout')} / {exact(f'{unet}/{steps}/independent')} |")  # fmt: skip
    teacher_key = f"teacher/{fam['teacher_steps']}"
    attribute_rows = ["| UNet | steps | set | colour | shape | size | position |", "|---|---|---|---|---|---|---|"]
    for key in (f"{teacher_key}/heldout", f"{teacher_key}/independent", "student/4/heldout", "student/4/independent",
                "student/1/heldout", "student/1/independent"):  # fmt: skip
        if key in fid:
            acc = fid[key]["attribute_accuracy"]
            unet, steps, set_name = key.split("/")
            attribute_rows.append(f"| {unet} | {steps} | {set_name} | " + " | ".join(f"{acc.get(a, float('nan')):.3f}" for a in ("colour", "shape", "size", "position")) + " |")
    gt = evaluation.get("judge_on_renders", {})
    rec = evaluation.get("judge_on_vae_reconstructions", {})
    dec = evaluation.get("decoder", {})
    stage_s = sum(float(training.get(s, {}).get("wall_s", 0)) for s in _STAGES)
    run = training.get("all", {})
    total_s = float(run.get("wall_s", stage_s))
    where = training.get("teacher", {}).get("device", "—")
    if run.get("cpu"):
        where = f"{run['cpu']}, {run.get('threads', '?')} torch threads" if where == "cpu" else where
    shared = ", ".join(f"{k} {training[k]['time_s']:.0f} s" for k in ("render", "latents", "trajectories") if k in training)
    top = [
        f"# {fam['name']}",
        "",
        "A small latent-diffusion text-to-image family trained from scratch by `meg train all` on the "
        "project's procedural shapes world (128×128 RGB). Same classes and code paths as Stable Diffusion.",
        "",
        f"**Data.** {data_text}",
        "",
        "**Components.** `tokenizer` (word level) + `text_encoder` (CLIPTextModel), `vae` (AutoencoderKL ×8, 4 latent "
        "channels), `teacher_unet` (DDIM, CFG), `unet` (few-step student, LCMScheduler), `vae_merge` (merge-aware "
        "decoder), `vae_merge_paper` (merge-aware decoder distilled as MEG's paper does), `small_unet` (device UNet), `judge` (feature network of the judge's distribution distance).",
        "",
        f"**Training time.** {total_s:.0f} s ({total_s / 60:.1f} min) for `meg train all` on {where} (measured wall time of the "
        f"whole run; shared inputs inside the stages: {shared or '—'}).",
        "",
        "**Prompt fidelity** (judge: `meg eval fidelity`; mean fraction of requested attributes met):",
        "",
        *quality_rows,
        "",
        "The independent writer's prompts (`prompts/independent.jsonl`, `meg eval write-prompts --seed 4242`) are phrased by "
        "`meg.models.prompt_writer`, whose constructions no training caption uses; they carry their ground truth, which the judge "
        "scores against (what was tried to close the gap, and what did not help: `docs/meg-tiny-generalisation.md`). "
        "Accuracy per requested attribute:",
        "",
        *attribute_rows,
        "",
        *_tuned_lines(training),
        f"Judge on ground-truth renders: held-out {gt.get('heldout', {}).get('fidelity', float('nan')):.3f}, "
        f"in-distribution {gt.get('indist', {}).get('fidelity', float('nan')):.3f}, "
        f"independent {gt.get('independent', {}).get('fidelity', float('nan')):.3f}"
        + (f"; on the same renders passed through the VAE (the ceiling of any latent model with this autoencoder): "
           f"held-out {rec.get('heldout', {}).get('fidelity', float('nan')):.3f}, "
           f"in-distribution {rec.get('indist', {}).get('fidelity', float('nan')):.3f}, "
           f"independent {rec.get('independent', {}).get('fidelity', float('nan')):.3f}." if rec else "."),
        "",
    ]
    if dec:
        top += [
            f"**Merge-aware decoder** (merge ratio {dec['ratio']}, σ = {dec['sigma']}, {dec['n']} student latents): image MSE "
            f"vs the clean reference {dec['mse_merge_aware']:.5f} vs {dec['mse_stock']:.5f} for the stock decoder "
            f"({100 * dec['reduction']:.1f}% lower).",
            "",
        ]
    top += ["**Stages.**", ""] + [_stage_line(training, s) for s in _stages(training)]
    if "cpu_estimate" in training:
        top += ["", f"**CPU estimate.** {training['cpu_estimate']['text']}"]
    (model_dir / "README.md").write_text("\n".join(top) + "\n")
    per_folder = {
        "tokenizer": ("data", "Word-level tokenizer over the world's vocabulary (canonical words, synonyms, filler words); any other word becomes [UNK] and is reported by `meg.models.captions.unknown_words` and `meg eval prompt`."),
        "text_encoder": ("text", "CLIPTextModel pre-trained to predict the attribute pairs a caption mentions, then fine-tuned with the teacher."),
        "vae": ("vae", f"AutoencoderKL, channels {fam['vae_channels']}; reconstruction MSE {training.get('vae', {}).get('reconstruction_mse', float('nan')):.5f} (images in [0,1])."),
        "teacher_unet": ("teacher", f"ε-prediction UNet {fam['unet_channels']}, EMA weights; DDIM {fam['teacher_steps']} steps, guidance {fam['teacher_guidance']}. Held-out fidelity {f('teacher/' + str(fam['teacher_steps']) + '/heldout')}."),
        "unet": ("distill", f"Few-step student: consistency distillation on teacher PF-ODE trajectories, for guidance {fam['student_guidance']}, LCMScheduler. Held-out fidelity 1/2/4/8 steps: {f('student/1/heldout')} / {f('student/2/heldout')} / {f('student/4/heldout')} / {f('student/8/heldout')}."),
        "small_unet": ("small", f"Device UNet {fam['small_channels']}, distilled like the student from scratch. Held-out fidelity at 4 steps: {f('small/4/heldout')}."),
        "vae_merge": ("decoder", "VAE with the decoder fine-tuned on merged (ratio U(0, 0.75)) + noisy (σ U(0.05, 0.3)) latents." + (f" MSE reduction at ratio 0.5, σ 0.1: {100 * dec['reduction']:.1f}%." if dec else "")),
        "vae_merge_paper": ("vae_merge_paper", "VAE with the decoder distilled as MEG's paper does: the L-step edge latent "
                            "(L ~ U{4…11}, ToMe 0.5 in the edge UNet) merged, noised and unmerged, against the stock decoder's "
                            "image of the 12-step reference latent. Its MSE against the 12-step reference next to the other "
                            "decoders: docs/reproduction.md."),
        "judge": ("judge", "Feature network (5 strided convs, 128-d features) of the judge's Fréchet distance, trained to predict scene content from renders."),
    }
    for folder, (stage, text) in per_folder.items():
        if (model_dir / folder).exists():
            lines = [f"# {fam['name']} / {folder}", "", text, "", f"Data: {data_text}", "", "Training:",
                     *(_stage_line(training, s) for s in _with_continuation(stage, training))]  # fmt: skip
            (model_dir / folder / "README.md").write_text("\n".join(lines) + "\n")
