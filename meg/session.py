"""A multi-round preview–refine session on the device (DiffusionX, PAPERS.md §3), over a
`meg.services.client.DeviceClient` (so it lives above the recipe layer).

The session keeps every round (prompt, seed, preview latent, preview image and its time);
`PreviewSession.preview` renders a round with the device's previewer, `PreviewSession.final`
sends the last preview to the edge for refinement (`meg.recipes.preview_refine`). Every
error leaves the rounds as they were: a bad prompt adds no round, a refused or failed
refine keeps the session open for another `final` or more rounds; when the edge is lost,
`final` returns the last preview, marked unrefined.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import torch

from meg.errors import InvalidInputError
from meg.recipes.plan import Plan
from meg.recipes.preview_refine import (
    PreviewRefineConfig,
    PreviewRefineRecipe,
    check_prompt,
    preview_engine,
    preview_refine_plan,
)
from meg.recipes.registry import recipe_by_name
from meg.split.engine import GenerationInputs

__all__ = ["PreviewRound", "PreviewSession", "SessionResult"]


@dataclass(frozen=True)
class PreviewRound:
    """One prompt round: what the user typed and what the device showed."""

    prompt: str
    seed: int
    latent: torch.Tensor
    """[1, C, h, w] preview latent (what goes up on `final`)."""
    image: torch.Tensor
    """[1, 3, H, W] float32 in [0, 1]."""
    preview_s: float
    """Measured time of the preview (denoise + decode) on this machine."""


@dataclass(frozen=True)
class SessionResult:
    """The session's final image, whether the edge refined it, and the request's report."""

    image: torch.Tensor
    refined: bool
    report: Any
    """`meg.recipes.report.GenerationReport` of the refine request."""
    rounds: int


@dataclass
class PreviewSession:
    """Rounds of previews on the device, then one refine on the edge.

    Args:
        client: a `meg.services.client.DeviceClient` connected to the edge.
        pipeline: the device's pipeline (the family's text encoder, VAE, scheduler).
        model: the family whose small UNet previews (None: the pipeline's UNet).
        seed: every round's seed (a fixed seed keeps the layout across rounds).
    """

    client: Any
    pipeline: Any
    model: str | None = None
    seed: int = 0
    config: PreviewRefineConfig = field(default_factory=PreviewRefineConfig)
    device_profile: str = "jetson-agx-orin"
    rounds: list[PreviewRound] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.engine, self.previewer = preview_engine(self.pipeline, self.model)

    def preview(self, prompt: str, *, edit_strength: float | None = None) -> PreviewRound:
        """Render ``prompt`` with the previewer and keep it as the latest round.

        With ``edit_strength`` (and an earlier round), the previous preview is re-noised to
        that strength and denoised for the edited prompt (img2img on the previewer:
        ``int(edit_strength · preview_steps)`` steps), so the layout carries over and the
        round costs fewer steps; without it the round is previewed from scratch.

        Raises:
            InvalidInputError: empty prompt or words the model does not know, or an edit
                strength leaving no step (no round added).
        """
        check_prompt(prompt, self.engine.tokenizer)
        inputs = GenerationInputs(prompt=prompt, seed=self.seed, steps=self.config.preview_steps,
                                  height=self.engine.native_size_px, width=self.engine.native_size_px)
        started = time.perf_counter()
        if edit_strength is not None and self.rounds:
            latent = self.engine.run_img2img(inputs, self.rounds[-1].latent, edit_strength,
                                             unet=self.engine.device_unet)
        else:
            latent = self.engine.generate_latents(inputs, unet=self.engine.device_unet)
        with torch.no_grad():
            image = self.engine.decode(self.engine.device_vae, latent)
        current = PreviewRound(prompt, self.seed, latent, image, time.perf_counter() - started)
        self.rounds.append(current)
        return current

    def final(self, *, strength: float | None = None, plan: Plan | None = None) -> SessionResult:
        """Refine the last preview on the edge (strength: ``plan``'s, else ``strength``, else
        the config's default).

        Raises:
            InvalidInputError: no preview yet, or the edge refused the request (the rounds stay).
        """
        from meg.services.client import DeviceRequest

        if not self.rounds:
            raise InvalidInputError("final before any preview: type a prompt first", field="session.rounds")
        last = self.rounds[-1]
        if plan is None:
            plan = preview_refine_plan(strength=strength if strength is not None else self.config.strength,
                                       steps=self.config.refine_steps)
        recipe = recipe_by_name(PreviewRefineRecipe.name)
        assert isinstance(recipe, PreviewRefineRecipe)
        request_id = uuid.uuid4().hex
        recipe.stage_preview(request_id, last.latent)
        request = DeviceRequest(prompt=last.prompt, seed=last.seed, recipe=recipe.name, plan=plan,
                                request_id=request_id, device_profile=self.device_profile,
                                width=self.engine.native_size_px, height=self.engine.native_size_px)
        try:
            result = self.client.generate(request)
        finally:
            recipe.take_staged(request_id)  # a request refused before its device half ran
        refined = bool(result.report.extra.get("preview_refine", {}).get("refined", False))
        return SessionResult(result.image, refined, result.report, len(self.rounds))
