"""The split engine: one text-to-image generation cut into an edge and a device partition.

The stage sequence is text-encode → denoising steps 1…N → decode; a `SplitPoint` cuts it
(see `meg.split.points`). `SplitEngine.run_edge` runs the edge partition and returns the
tensors that cross the cut; `SplitEngine.run_device` takes them (after any codec and
channel) and finishes the image; `SplitEngine.run_full` is the unsplit reference; `SplitEngine.run_img2img` re-noises a
given latent to a strength and denoises the rest (diffusers' img2img), and
`SplitEngine.generate_latents` runs text-to-image with any UNet up to the latent. All
three run the same denoising loop, written out here in the style of diffusers'
``StableDiffusionPipeline.__call__``:

1. encode the prompt (and, with classifier-free guidance, the negative prompt):
   ``prompt_embeds`` [2B, L, E], unconditional rows first;
2. draw the initial latent from ``torch.Generator().manual_seed(seed)``, scaled by the
   scheduler's ``init_noise_sigma``;
3. for each timestep: duplicate the latent for guidance, ``scale_model_input``, UNet,
   ``uncond + g·(cond − uncond)``, ``scheduler.step``;
4. decode: ``latents / scaling_factor`` → VAE decoder → ``(x/2 + 0.5).clamp(0, 1)``.

Each request uses its own copy of the scheduler, so requests never share scheduler
state. A device that continues at step K+1 makes a fresh copy and, for schedulers that
count steps (Euler), calls ``set_begin_index(K)``; DDIM's step is stateless. Stochastic
schedulers get a per-step generator derived from (seed, step index), so the noise of step
i does not depend on which side ran steps before it. Multistep schedulers (DPM-Solver++)
keep a history of model outputs that does not cross the cut; `step:K` refuses them.
"""

from __future__ import annotations

import copy
import inspect
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

import torch

from meg.errors import DeadlineExceededError, InvalidInputError, NonFiniteError, SplitError
from meg.split.batching import StepBatcher
from meg.split.points import SplitPoint
from meg.split.tome import ToMeAdapter, object_lock, unet_lock
from meg.split.unet_stages import (
    UNetState,
    crossing_specs_for_config,
    state_from_tensors,
    state_tensors,
    unet_begin,
    unet_block_names,
    unet_end,
    unet_run_blocks,
)

if TYPE_CHECKING:
    from meg.codecs.merge import MergedLatent
    from meg.split.runtime import DeviceRuntime

__all__ = ["GenerationInputs", "Partitions", "SplitEngine", "TensorSpec", "TextConditioning"]

ProgressFn = Callable[[str, int, int], None]
StopFn = Callable[[], bool]
_CHECKED_MEMORY = 256


@dataclass(frozen=True)
class GenerationInputs:
    """One text-to-image request (the defaults suit `tiny-random`)."""

    prompt: str
    negative_prompt: str = ""
    seed: int = 0
    height: int = 64
    width: int = 64
    steps: int = 4
    guidance_scale: float = 2.5
    """Classifier-free guidance weight; guidance (batch 2B) is on when > 1."""

    @property
    def do_cfg(self) -> bool:
        """Whether classifier-free guidance doubles the UNet batch."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor that crosses the cut."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes_fp16(self) -> int:
        """Raw size in bytes when sent as fp16 (2 bytes per element)."""
        return 2 * self.numel


@dataclass(frozen=True)
class TextConditioning:
    """What the UNet is conditioned on besides the latent and the timestep.

    prompt_embeds: [2B, L, E] (unconditional rows first with guidance).
    pooled_embeds: [2B, P] SDXL pooled text projection, else None.
    time_ids: [2B, 6] SDXL size conditioning (original h, w, crop top, left, target h, w).
    """

    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    @property
    def added(self) -> dict[str, torch.Tensor] | None:
        """The UNet's ``added_cond_kwargs`` (None for SD 1.x/2.x)."""
        if self.pooled_embeds is None or self.time_ids is None:
            return None
        return {"text_embeds": self.pooled_embeds, "time_ids": self.time_ids}

    def crossing(self) -> dict[str, torch.Tensor]:
        """The conditioning tensors that cross a cut (size ids are rebuilt from the request)."""
        out = {"prompt_embeds": self.prompt_embeds}
        if self.pooled_embeds is not None:
            out["pooled_embeds"] = self.pooled_embeds
        return out


@dataclass(frozen=True)
class Partitions:
    """The two sides of one split as runnable objects and stage lists.

    ``edge(inputs, tome_ratio=…, on_progress=…, should_stop=…)`` returns the crossing
    tensors; ``device(crossing, inputs, runtime=…)`` returns the image. ``edge_stages`` /
    ``device_stages`` name the stages each side runs, e.g. ``["text_encode", "step:1"]``,
    ``["step:2", …, "decode"]``; a UNet cut shows as ``"step:1[:B]"`` / ``"step:1[B:]"``.
    """

    split: SplitPoint
    edge: Callable[..., dict[str, torch.Tensor]]
    device: Callable[..., torch.Tensor]
    edge_stages: tuple[str, ...]
    device_stages: tuple[str, ...]


class SplitEngine:
    """Runs a Stable-Diffusion-style pipeline split at any `SplitPoint`.

    Args:
        pipeline: a diffusers pipeline with ``unet``, ``vae``, ``text_encoder``,
            ``tokenizer`` and ``scheduler`` (SD 1.x/2.x layout), plus ``text_encoder_2`` and
            ``tokenizer_2`` for SDXL; e.g. from `load_pipeline`.
        device_unet: the UNet the device uses for its steps (default: the pipeline's).
        device_vae: the VAE the device decodes with (default: the pipeline's).
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        device_unet: Any | None = None,
        device_vae: Any | None = None,
    ) -> None:
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
        embed_type = pipeline.unet.config.addition_embed_type
        if embed_type != ("text_time" if self.is_sdxl else None):
            raise SplitError(
                f"{type(pipeline).__name__} with UNet addition_embed_type={embed_type!r} is not "
                "supported; the split engine runs SD 1.x/2.x and SDXL layouts"
            )
        self.pipeline = pipeline
        self.unet = pipeline.unet
        self.vae = pipeline.vae
        self.text_encoder = pipeline.text_encoder
        self.tokenizer = pipeline.tokenizer
        self.text_encoder_2: Any = getattr(pipeline, "text_encoder_2", None)
        self.tokenizer_2: Any = getattr(pipeline, "tokenizer_2", None)
        self.scheduler = pipeline.scheduler
        self.device_unet = device_unet if device_unet is not None else pipeline.unet
        self.device_vae = device_vae if device_vae is not None else pipeline.vae
        self.vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.native_size_px = int(self.unet.config.sample_size) * self.vae_scale_factor
        """Image side the UNet was built for; requests that give no size get it."""
        self.tome = ToMeAdapter(self.unet)
        self.batcher: StepBatcher | None = None
        """Step-level batching of the edge UNet across requests (`enable_batching`); None: off."""
        self._multistep = hasattr(self.scheduler, "model_outputs") or getattr(self.scheduler, "order", 1) != 1
        self._checked: OrderedDict[tuple[GenerationInputs, SplitPoint], None] = OrderedDict()
        self._checked_lock = threading.Lock()

    # ------------------------------------------------------------------ description
    @property
    def unet_blocks(self) -> list[str]:
        """Cuttable UNet blocks; ``unet:B`` cuts before block B."""
        return unet_block_names(self.unet)

    def split_points(self, steps: int) -> list[SplitPoint]:
        """Every split point this pipeline has for ``steps`` denoising steps."""
        points = [SplitPoint("device")]
        points += [SplitPoint("step", k) for k in range(1, steps)]
        points += [SplitPoint("decoder"), SplitPoint("image")]
        points += [SplitPoint("unet", b) for b in range(1, len(self.unet_blocks))]
        return points

    def stages(self, steps: int) -> list[str]:
        """The unsplit stage sequence: ``text_encode, step:1 … step:N, decode``."""
        return ["text_encode", *(f"step:{i}" for i in range(1, steps + 1)), "decode"]

    def partitions(self, split: SplitPoint, inputs: GenerationInputs) -> Partitions:
        """The edge and device partitions of ``split`` for ``steps = inputs.steps``."""
        self.check(inputs, split)
        stages = self.stages(inputs.steps)
        cut = {"device": 0, "decoder": inputs.steps + 1, "image": inputs.steps + 2}.get(split.kind, split.index + 1)
        if split.kind == "unet":
            edge, device = ["text_encode", f"step:1[:{split.index}]"], [f"step:1[{split.index}:]", *stages[2:]]
        else:
            edge, device = stages[:cut], stages[cut:]
        return Partitions(
            split=split,
            edge=lambda inputs, **kwargs: self.run_edge(inputs, split, **kwargs),
            device=lambda crossing, inputs, **kwargs: self.run_device(crossing, inputs, split, **kwargs),
            edge_stages=tuple(edge),
            device_stages=tuple(device),
        )

    def check(self, inputs: GenerationInputs, split: SplitPoint) -> None:
        """Raise `InvalidInputError`/`SplitError` naming the bad value.

        Every public entry point calls this; a pair that passed is remembered (the last
        `_CHECKED_MEMORY` pairs), so one request is validated once per side however many
        of the engine's methods it goes through.
        """
        key = (inputs, split)
        with self._checked_lock:
            if key in self._checked:
                self._checked.move_to_end(key)
                return
        self._validate(inputs, split)
        with self._checked_lock:
            self._checked[key] = None
            while len(self._checked) > _CHECKED_MEMORY:
                self._checked.popitem(last=False)

    def _validate(self, inputs: GenerationInputs, split: SplitPoint) -> None:
        if not isinstance(inputs.prompt, str):
            raise InvalidInputError(f"prompt must be a string, got {type(inputs.prompt).__name__}", field="prompt")
        if inputs.steps < 1:
            raise InvalidInputError(f"steps {inputs.steps} must be >= 1", field="steps")
        for name in ("height", "width"):
            value = getattr(inputs, name)
            if value <= 0 or value % self.vae_scale_factor:
                raise InvalidInputError(
                    f"{name} {value} must be a positive multiple of {self.vae_scale_factor}", field=name
                )
        if inputs.guidance_scale < 0:
            raise InvalidInputError(f"guidance_scale {inputs.guidance_scale} must be >= 0", field="guidance_scale")
        split.validate(steps=inputs.steps, unet_blocks=len(self.unet_blocks))
        if split.kind == "step" and self._multistep:
            raise SplitError(
                f"split {split} needs a single-step scheduler; {type(self.scheduler).__name__} "
                "keeps a history of model outputs",
                field="split",
            )

    def latent_shape(self, inputs: GenerationInputs) -> tuple[int, int, int, int]:
        """(B, C, h, w) of the latent, B = 1."""
        f = self.vae_scale_factor
        return (1, self.unet.config.in_channels, inputs.height // f, inputs.width // f)

    def crossing(self, split: SplitPoint, inputs: GenerationInputs) -> list[TensorSpec]:
        """The tensors that cross ``split`` for ``inputs``, in the order `run_edge` returns them.

        ``device`` crosses nothing; ``decoder`` the latent; ``step:K`` the latent and the text
        embeddings; ``image`` the image; ``unet:B`` the step's input latent, the text
        embeddings, the hidden state, the time embedding and every pending skip tensor.
        For SDXL the text embeddings include ``pooled_embeds`` [2B, P]; the size ids are
        rebuilt from the request on the device.
        """
        self.check(inputs, split)
        latent = TensorSpec("latents", self.latent_shape(inputs), self.unet.dtype)
        batch = 2 if inputs.do_cfg else 1
        text = [
            TensorSpec(
                "prompt_embeds",
                (batch, self.tokenizer.model_max_length, self.unet.config.cross_attention_dim),
                self.text_encoder.dtype,
            )
        ]
        if self.is_sdxl:
            text.append(
                TensorSpec("pooled_embeds", (batch, self.text_encoder_2.config.projection_dim), self.text_encoder_2.dtype)
            )
        if split.kind == "device":
            return []
        if split.kind == "decoder":
            return [latent]
        if split.kind == "step":
            return [latent, *text]
        if split.kind == "image":
            return [TensorSpec("image", (1, 3, inputs.height, inputs.width), torch.float32)]
        state = _state_specs(
            _freeze(self.unet.config), latent.shape[-2:], split.index, batch, text[0].shape[1]
        )
        return [latent, *text] + [TensorSpec(n, shape, self.unet.dtype) for n, (shape, _) in state.items()]

    # ------------------------------------------------------------------ stages
    def encode_prompt(self, inputs: GenerationInputs) -> torch.Tensor:
        """[2B, L, E] (uncond then cond) with guidance, else [B, L, E]."""
        return self.encode_text(inputs).prompt_embeds

    def encode_text(self, inputs: GenerationInputs) -> TextConditioning:
        """Text conditioning of the UNet, unconditional rows first with guidance.

        SD: the text encoder's last hidden state. SDXL (as diffusers' SDXL pipeline): both
        encoders' penultimate hidden states concatenated, the second encoder's pooled
        projection, and the size conditioning; an empty negative prompt gives zero
        unconditional embeddings when the pipeline has ``force_zeros_for_empty_prompt``.
        """
        prompts = [inputs.negative_prompt, inputs.prompt] if inputs.do_cfg else [inputs.prompt]
        if not self.is_sdxl:
            with torch.no_grad():
                return TextConditioning(self.text_encoder(self._token_ids(self.tokenizer, prompts))[0])
        hidden, pooled = [], None
        with torch.no_grad():
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(self._token_ids(tokenizer, prompts), output_hidden_states=True)
                if pooled is None and out[0].ndim == 2:
                    pooled = out[0]
                hidden.append(out.hidden_states[-2])
        embeds = torch.cat(hidden, dim=-1)
        if pooled is None:
            raise SplitError("SDXL pipeline has no text encoder with a pooled projection")
        if inputs.do_cfg and inputs.negative_prompt == "" and self.pipeline.config.get("force_zeros_for_empty_prompt"):
            embeds[0].zero_()
            pooled[0].zero_()
        return self.conditioning(embeds, pooled, inputs)

    def conditioning(
        self, prompt_embeds: torch.Tensor, pooled_embeds: torch.Tensor | None, inputs: GenerationInputs
    ) -> TextConditioning:
        """Rebuild the conditioning from crossing tensors (SDXL size ids come from ``inputs``)."""
        if not self.is_sdxl:
            return TextConditioning(prompt_embeds)
        if pooled_embeds is None:
            raise InvalidInputError("SDXL conditioning needs 'pooled_embeds'", field="pooled_embeds")
        # original size, crop top-left, target size: an uncropped image of the asked size
        ids = [inputs.height, inputs.width, 0, 0, inputs.height, inputs.width]
        time_ids = torch.tensor([ids], dtype=pooled_embeds.dtype, device=pooled_embeds.device)
        return TextConditioning(prompt_embeds, pooled_embeds, time_ids.repeat(pooled_embeds.shape[0], 1))

    def _token_ids(self, tokenizer: Any, prompts: list[str]) -> torch.Tensor:
        with object_lock(tokenizer):  # engines over one pipeline share its tokenizer
            ids = tokenizer(
                prompts,
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
        return ids.to(self.text_encoder.device)

    def new_scheduler(self, inputs: GenerationInputs, *, begin_step: int = 0) -> Any:
        """A private scheduler copy with timesteps set, positioned at ``begin_step``."""
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(inputs.steps, device=self.unet.device)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(begin_step * scheduler.order)
        return scheduler

    def initial_latents(self, inputs: GenerationInputs, scheduler: Any) -> torch.Tensor:
        """x_T ~ N(0, σ_init²) drawn on CPU from the request seed: [1, C, h, w]."""
        generator = torch.Generator("cpu").manual_seed(inputs.seed)
        noise = torch.randn(self.latent_shape(inputs), generator=generator, dtype=torch.float32)
        return (noise * scheduler.init_noise_sigma).to(self.unet.device, self.unet.dtype)

    def _model_input(self, scheduler: Any, latents: torch.Tensor, t: torch.Tensor, inputs: GenerationInputs) -> torch.Tensor:
        x = torch.cat([latents] * 2) if inputs.do_cfg else latents
        return scheduler.scale_model_input(x, t)

    @staticmethod
    def _guide(noise_pred: torch.Tensor, inputs: GenerationInputs) -> torch.Tensor:
        if not inputs.do_cfg:
            return noise_pred
        uncond, cond = noise_pred.chunk(2)
        return uncond + inputs.guidance_scale * (cond - uncond)

    def _scheduler_step(
        self, scheduler: Any, noise_pred: torch.Tensor, t: torch.Tensor, latents: torch.Tensor, i: int, inputs: GenerationInputs
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"return_dict": False}
        if _accepts_generator(type(scheduler)):
            # Derived from (seed, step) so either side draws the same noise for step i.
            kwargs["generator"] = torch.Generator("cpu").manual_seed((inputs.seed * 1_000_003 + i + 1) % 2**63)
        return scheduler.step(noise_pred, t, latents, **kwargs)[0]

    def enable_batching(self, *, max_batch: int, max_wait_s: float) -> StepBatcher:
        """Share the edge UNet's calls of concurrent `run_edge` requests (see `meg.split.batching`);
        each request's result stays its unbatched result. Returns the batcher (its `stats`)."""
        if self.batcher is not None:
            self.batcher.close()
        self.batcher = StepBatcher(self.unet, self.tome, max_batch=max_batch, max_wait_s=max_wait_s)
        return self.batcher

    def disable_batching(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
            self.batcher = None

    def _batch_session(self) -> AbstractContextManager[None]:
        return self.batcher.session() if self.batcher is not None else nullcontext()

    def _edge_unet(self, x: torch.Tensor, t: torch.Tensor, cond: TextConditioning, tome_ratio: float,
                   generator: torch.Generator, latent_hw: tuple[int, int]) -> torch.Tensor:  # fmt: skip
        """One edge UNet call: through the step batcher when batching is on, else directly."""
        if self.batcher is not None:
            return self.batcher.call(x, t, cond.prompt_embeds, cond.added, tome_ratio=tome_ratio, generator=generator)
        with self.tome.applied(tome_ratio, generator=generator, latent_hw=latent_hw):
            return self._unet_call(self.unet, x, t, cond)

    def _unet_call(self, unet: Any, x: torch.Tensor, t: torch.Tensor, cond: TextConditioning) -> torch.Tensor:
        # Positional: tomesd's size hook reads args[0].
        return unet(x, t, cond.prompt_embeds, added_cond_kwargs=cond.added, return_dict=False)[0]

    def decode(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, h, w] UNet-space latent → [B, 3, H, W] float32 image in [0, 1]."""
        z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
        shift = getattr(vae.config, "shift_factor", None)
        if shift:
            z = z + shift
        image = vae.decode(z, return_dict=False)[0]
        return (image / 2 + 0.5).clamp(0, 1).float()

    # ------------------------------------------------------------------ reference
    def run_full(self, inputs: GenerationInputs) -> torch.Tensor:
        """The unsplit generation with the pipeline's own UNet and VAE: [1, 3, H, W] in [0, 1]."""
        self.check(inputs, SplitPoint("device"))
        with torch.no_grad():
            cond = self.encode_text(inputs)
            scheduler = self.new_scheduler(inputs)
            latents = self.initial_latents(inputs, scheduler)
            for i, t in enumerate(scheduler.timesteps):
                x = self._model_input(scheduler, latents, t, inputs)
                # Per step, like the edge: never while another request has ToMe patched in.
                with unet_lock(self.unet):
                    noise = self._unet_call(self.unet, x, t, cond)
                latents = self._scheduler_step(scheduler, self._guide(noise, inputs), t, latents, i, inputs)
            return self.decode(self.vae, latents)

    # ------------------------------------------------------------------ img2img
    @staticmethod
    def img2img_steps(steps: int, strength: float) -> int:
        """Denoising steps img2img runs at ``strength`` out of a ``steps`` schedule:
        ``min(int(steps · strength), steps)`` (diffusers' ``get_timesteps``)."""
        return min(int(steps * strength), steps)

    def run_img2img(
        self,
        inputs: GenerationInputs,
        init_latents: torch.Tensor,
        strength: float,
        *,
        unet: Any | None = None,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> torch.Tensor:
        """Re-noise ``init_latents`` to ``strength`` and denoise the rest: the refined latent.

        diffusers' ``StableDiffusionImg2ImgPipeline`` semantics, given the latent instead of
        the image (its VAE encoding is the caller's):

        1. set the ``inputs.steps`` schedule and keep its last ``n = int(steps · strength)``
           timesteps (``t_start = steps − n``; counting schedulers begin at ``t_start``);
        2. draw noise from ``torch.Generator().manual_seed(inputs.seed)`` and
           ``scheduler.add_noise(init_latents, noise, t_first)``;
        3. denoise the ``n`` kept steps exactly as `run_full` does (guidance, per-step seeds
           by absolute step index).

        Args:
            init_latents: [1, C, h, w] UNet-space latent (already × ``scaling_factor``).
            strength: 0 < strength ≤ 1; at least one step must remain.
            unet: the UNet that denoises (default: the pipeline's; the device passes its own).
        Returns:
            [1, C, h, w] latent in the UNet's dtype.
        Raises:
            InvalidInputError: strength out of range or leaving no step, or a latent of the
                wrong shape, dtype or with non-finite values.
        """
        self.check(inputs, SplitPoint("device"))
        if not (0.0 < strength <= 1.0) or not math.isfinite(strength):
            raise InvalidInputError(f"strength {strength!r} must be in (0, 1]", field="strength")
        kept = self.img2img_steps(inputs.steps, strength)
        if kept < 1:
            raise InvalidInputError(
                f"strength {strength} leaves no step of {inputs.steps} (needs >= {1 / inputs.steps:.3g})",
                field="strength",
            )
        expected = self.latent_shape(inputs)
        if tuple(init_latents.shape) != expected:
            raise InvalidInputError(
                f"init latent has shape {tuple(init_latents.shape)}, expected {expected}", field="init_latents"
            )
        if not init_latents.is_floating_point():
            raise InvalidInputError(f"init latent has dtype {init_latents.dtype}, expected a float", field="init_latents")
        if not bool(torch.isfinite(init_latents).all()):
            raise NonFiniteError("init latent holds NaN or Inf", field="init_latents")
        denoiser = unet if unet is not None else self.unet
        progress = on_progress or (lambda stage, done, total: None)
        t_start = inputs.steps - kept
        with torch.no_grad():
            cond = self.encode_text(inputs)
            scheduler = self.new_scheduler(inputs, begin_step=t_start)
            timesteps = scheduler.timesteps[t_start * scheduler.order :]
            generator = torch.Generator("cpu").manual_seed(inputs.seed)
            noise = torch.randn(expected, generator=generator, dtype=torch.float32)
            latents = init_latents.to(denoiser.device, denoiser.dtype)
            latents = scheduler.add_noise(latents, noise.to(latents.device, latents.dtype), timesteps[:1])
            for j, t in enumerate(timesteps):
                if should_stop is not None and should_stop():
                    raise DeadlineExceededError(f"img2img stopped before step {j + 1} of {kept}")
                x = self._model_input(scheduler, latents, t, inputs)
                with unet_lock(denoiser):
                    noise_pred = self._unet_call(denoiser, x, t, cond)
                latents = self._scheduler_step(scheduler, self._guide(noise_pred, inputs), t, latents, t_start + j, inputs)
                progress("denoise", j + 1, kept)
            return latents

    def generate_latents(
        self,
        inputs: GenerationInputs,
        *,
        unet: Any | None = None,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> torch.Tensor:
        """Text-to-image up to the final latent with ``unet`` (default: the pipeline's):
        [1, C, h, w]; with the pipeline's UNet it is the latent `run_full` decodes."""
        self.check(inputs, SplitPoint("device"))
        denoiser = unet if unet is not None else self.unet
        progress = on_progress or (lambda stage, done, total: None)
        with torch.no_grad():
            cond = self.encode_text(inputs)
            scheduler = self.new_scheduler(inputs)
            latents = self.initial_latents(inputs, scheduler).to(denoiser.device, denoiser.dtype)
            batched = self.batcher is not None and denoiser is self.unet
            with self._batch_session() if batched else nullcontext():
                for i, t in enumerate(scheduler.timesteps):
                    if should_stop is not None and should_stop():
                        raise DeadlineExceededError(f"generation stopped before step {i + 1} of {inputs.steps}")
                    x = self._model_input(scheduler, latents, t, inputs)
                    if batched:
                        assert self.batcher is not None
                        noise_pred = self.batcher.call(x, t, cond.prompt_embeds, cond.added)
                    else:
                        with unet_lock(denoiser):
                            noise_pred = self._unet_call(denoiser, x, t, cond)
                    latents = self._scheduler_step(scheduler, self._guide(noise_pred, inputs), t, latents, i, inputs)
                    progress("denoise", i + 1, inputs.steps)
            return latents

    # ------------------------------------------------------------------ edge
    def run_edge(
        self,
        inputs: GenerationInputs,
        split: SplitPoint,
        *,
        tome_ratio: float = 0.0,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
    ) -> dict[str, torch.Tensor]:
        """Run the edge partition; return the crossing tensors by name (see `crossing`).

        Args:
            tome_ratio: ToMe merge ratio for the edge UNet, 0 ≤ ratio < 0.75.
            on_progress: called as ``(stage, done, total)`` with stage ``"text_encode"``,
                ``"denoise"``, ``"unet_blocks"`` or ``"decode"``.
            should_stop: polled before every step; when it returns True the work stops
                with `DeadlineExceededError`.

        Raises:
            DeadlineExceededError: ``should_stop()`` turned True.
        """
        self.check(inputs, split)
        self.tome.check_ratio(tome_ratio)
        progress = on_progress or (lambda stage, done, total: None)

        def stop_point(where: str) -> None:
            if should_stop is not None and should_stop():
                raise DeadlineExceededError(f"edge work for split {split} stopped {where}")

        if split.kind == "device":
            return {}
        with torch.no_grad():
            stop_point("before text encoding")
            cond = self.encode_text(inputs)
            progress("text_encode", 1, 1)
            scheduler = self.new_scheduler(inputs)
            latents = self.initial_latents(inputs, scheduler)
            latent_hw = (int(latents.shape[-2]), int(latents.shape[-1]))
            tome_generator = torch.Generator("cpu").manual_seed(inputs.seed)
            if split.kind == "unet":
                stop_point("before step 1")
                t = scheduler.timesteps[0]
                x = self._model_input(scheduler, latents, t, inputs)
                with self.tome.applied(tome_ratio, generator=tome_generator, latent_hw=latent_hw):
                    state = unet_begin(self.unet, x, t, cond.prompt_embeds, cond.added)
                    state = unet_run_blocks(self.unet, state, cond.prompt_embeds, 0, split.index)
                progress("unet_blocks", split.index, len(self.unet_blocks))
                return {"latents": latents, **cond.crossing(), **state_tensors(state)}
            edge_steps = split.index if split.kind == "step" else inputs.steps
            with self._batch_session():
                for i, t in enumerate(scheduler.timesteps[:edge_steps]):
                    stop_point(f"before step {i + 1} of {inputs.steps}")
                    x = self._model_input(scheduler, latents, t, inputs)
                    noise = self._edge_unet(x, t, cond, tome_ratio, tome_generator, latent_hw)
                    latents = self._scheduler_step(scheduler, self._guide(noise, inputs), t, latents, i, inputs)
                    progress("denoise", i + 1, edge_steps)
            if split.kind == "step":
                return {"latents": latents, **cond.crossing()}
            if split.kind == "decoder":
                return {"latents": latents}
            stop_point("before decoding")
            image = self.decode(self.vae, latents)
            progress("decode", 1, 1)
            return {"image": image}

    # ------------------------------------------------------------------ device
    def run_device(
        self,
        crossing: Mapping[str, torch.Tensor | MergedLatent],
        inputs: GenerationInputs,
        split: SplitPoint,
        *,
        runtime: DeviceRuntime | None = None,
    ) -> torch.Tensor:
        """Finish the image from the crossing tensors: [1, 3, H, W] float32 in [0, 1].

        ``crossing["latents"]`` may be a `MergedLatent` (decoder split); it is unmerged
        (by the runtime when one is given). With a ``runtime``, full UNet steps and the
        decoder run in it; the rest of a step cut at ``unet:B`` runs in torch on
        ``device_unet``. Without one, everything runs in torch on ``device_unet`` /
        ``device_vae``.

        Raises:
            InvalidInputError: a crossing tensor is missing or has the wrong shape or dtype.
            NonFiniteError: a crossing tensor holds NaN or Inf.
        """
        self.check(inputs, split)
        tensors = self._checked_crossing(crossing, inputs, split)
        with torch.no_grad():
            if split.kind == "image":
                return tensors["image"].float()
            if split.kind == "decoder":
                return self._device_decode(tensors["latents"], runtime)
            if runtime is not None and self.is_sdxl:
                raise SplitError(
                    f"split {split} runs UNet steps on the device; DeviceRuntime.unet takes no "
                    "SDXL added conditioning, so run it without a runtime",
                    field="split",
                )
            if split.kind == "device":
                cond = self.encode_text(inputs)
                scheduler = self.new_scheduler(inputs)
                latents = self.initial_latents(inputs, scheduler)
                begin = 0
            else:
                pooled = tensors.get("pooled_embeds")
                cond = self.conditioning(
                    self._to_unet(tensors["prompt_embeds"]), None if pooled is None else self._to_unet(pooled), inputs
                )
                begin = split.index if split.kind == "step" else 0
                scheduler = self.new_scheduler(inputs, begin_step=begin)
                latents = self._to_unet(tensors["latents"])
            if split.kind == "unet":
                state = state_from_tensors({k: self._to_unet(v) for k, v in tensors.items()})
                latents = self._finish_first_step(scheduler, latents, cond, state, split.index, inputs)
                begin = 1
            for i in range(begin, inputs.steps):
                t = scheduler.timesteps[i]
                x = self._model_input(scheduler, latents, t, inputs)
                if runtime is not None:
                    noise = runtime.unet(x, t.reshape(1).expand(x.shape[0]), cond.prompt_embeds)
                else:
                    with unet_lock(self.device_unet):
                        noise = self._unet_call(self.device_unet, x, t, cond)
                latents = self._scheduler_step(scheduler, self._guide(noise, inputs), t, latents, i, inputs)
            return self._device_decode(latents, runtime)

    def _finish_first_step(
        self, scheduler: Any, latents: torch.Tensor, cond: TextConditioning, state: UNetState, boundary: int, inputs: GenerationInputs
    ) -> torch.Tensor:
        t = scheduler.timesteps[0]
        # scale_model_input also advances nothing for DDIM and initialises Euler's step
        # index; its result is not needed (the edge already ran the UNet's input side).
        self._model_input(scheduler, latents, t, inputs)
        with unet_lock(self.device_unet):
            state = unet_run_blocks(self.device_unet, state, cond.prompt_embeds, boundary, len(self.unet_blocks))
            noise = unet_end(self.device_unet, state)
        return self._scheduler_step(scheduler, self._guide(noise, inputs), t, latents, 0, inputs)

    def _device_decode(self, latents: torch.Tensor | MergedLatent, runtime: DeviceRuntime | None) -> torch.Tensor:
        if runtime is not None:
            from meg.codecs.merge import latent_to_tokens, unmerge_latent

            grouping = runtime.grouping
            if not isinstance(latents, torch.Tensor) and latents.grouping != grouping:
                # the runtime's graph unmerges tokens of its own grouping: regroup in torch
                latents = unmerge_latent(latents.tokens, latents.gather_index, latents.latent_shape, latents.grouping)
            if isinstance(latents, torch.Tensor):
                tokens = latent_to_tokens(latents, grouping)
                gather_index = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
                b, c, h, w = (int(d) for d in latents.shape)
                return runtime.decode_latent(tokens, gather_index, (b, c, h, w)).float()
            return runtime.decode_latent(latents.tokens, latents.gather_index, latents.latent_shape).float()
        if not isinstance(latents, torch.Tensor):
            from meg.codecs.merge import unmerge_latent

            latents = unmerge_latent(latents.tokens, latents.gather_index, latents.latent_shape, latents.grouping)
        return self.decode(self.device_vae, latents)

    def _to_unet(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device_unet.device, self.device_unet.dtype)

    def _checked_crossing(
        self, crossing: Mapping[str, Any], inputs: GenerationInputs, split: SplitPoint
    ) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for spec in self.crossing(split, inputs):
            if spec.name not in crossing:
                raise InvalidInputError(f"crossing tensor {spec.name!r} missing for split {split}", field=spec.name)
            value = crossing[spec.name]
            shape = tuple(value.latent_shape) if hasattr(value, "latent_shape") else tuple(value.shape)
            if shape != spec.shape:
                raise InvalidInputError(
                    f"crossing tensor {spec.name!r} has shape {shape}, expected {spec.shape}", field=spec.name
                )
            if isinstance(value, torch.Tensor) and not value.is_floating_point():
                raise InvalidInputError(f"crossing tensor {spec.name!r} has dtype {value.dtype}", field=spec.name)
            values = value if isinstance(value, torch.Tensor) else value.tokens
            if not bool(torch.isfinite(values).all()):
                # A NaN anywhere in the UNet input spreads to the whole image.
                raise NonFiniteError(f"crossing tensor {spec.name!r} holds NaN or Inf", field=spec.name)
            out[spec.name] = value
        return out


_ACCEPTS_GENERATOR: dict[type, bool] = {}


def _accepts_generator(scheduler_type: type) -> bool:
    if scheduler_type not in _ACCEPTS_GENERATOR:
        step = getattr(scheduler_type, "step")  # noqa: B009 - schedulers are untyped
        _ACCEPTS_GENERATOR[scheduler_type] = "generator" in inspect.signature(step).parameters
    return _ACCEPTS_GENERATOR[scheduler_type]


def _freeze(config: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    def frozen(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        if isinstance(value, Mapping):
            return tuple(sorted((k, frozen(v)) for k, v in value.items()))
        return value

    return tuple(sorted((k, frozen(v)) for k, v in config.items()))


@cache
def _state_specs(
    frozen_config: tuple[tuple[str, Any], ...], latent_hw: tuple[int, int], boundary: int, batch: int, text_len: int
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    config = {k: v for k, v in frozen_config if not k.startswith("_")}
    return crossing_specs_for_config(config, latent_hw=latent_hw, boundary=boundary, batch=batch, text_len=text_len)
