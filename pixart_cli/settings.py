"""What a run asks for, checked in one place. No torch here: bad options fail before anything heavy loads.

``EncodeSettings`` and ``DenoiseSettings`` are built once at the edge (the CLI, a test, a script) and validated
on construction, so every stage function receives values it can trust. ``None`` means "not given": the model's
family fills it in when the model is known (``models.Family``).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from pixart_cli.errors import PixartError

MAX_SEED = 2**32 - 1
# Bounds that keep a typo from running for hours or overflowing: schedulers are trained on 1000 timesteps, and
# guidance far beyond any published setting only amplifies the difference between the two CFG branches until
# fp16 overflows (the result is NaN, a black image).
MAX_STEPS = 1000
MAX_GUIDANCE = 100.0
MAX_SEQUENCE_LENGTH = 4096
# Characters in one prompt: T5 reads at most MAX_SEQUENCE_LENGTH tokens (a few characters each) and cuts the rest;
# each image's manifest line holds its prompt, within scale.manifest.MAX_LINE_BYTES.
MAX_PROMPT_CHARS = 32_768
# Images in one run: every image's latents stay in RAM until the run writes them (0.25 MB each at 1024², fp32),
# and one run of more is better split with --prompts-file chunks or scale-out (README).
MAX_IMAGES = 10_000
PRECISIONS = ("full", "8bit", "4bit")
# Image to image: how much of the schedule runs from the init latents (1: all of it, from the first timestep).
# diffusers' img2img pipelines default to 0.8.
DEFAULT_STRENGTH = 0.8
# Inpainting: the mask's edge softened by a Gaussian blur of this radius in pixels before it is downsampled (0: a
# hard edge, diffusers' default; A1111 defaults to 4). The latent mask is binarized as diffusers' mask processor
# does, so the blur mostly softens the seam where --keep-unmasked pastes the source pixels back.
DEFAULT_MASK_BLUR = 0
MAX_MASK_BLUR = 256
# Perturbed-attention guidance (PixArtSigmaPAGPipeline): 0 is off. diffusers' docs use 3.0.
DEFAULT_PAG_SCALE = 0.0
MAX_PAG_SCALE = 100.0
MAX_PAG_LAYERS = 64
# --lora FILE:SCALE and --controlnet FILE:SCALE: published settings are 0-2; far beyond, the fused weights or the
# adapter's residuals overflow fp16 (NaN after all the work) or a float conversion (1e300).
MAX_ADAPTER_SCALE = 100.0


@dataclass(frozen=True)
class SchedulerChoice:
    """A --scheduler name: the diffusers class built with ``from_config`` and A1111's name for it."""

    cli_name: str
    class_name: str
    sampler_name: str


SCHEDULERS = {
    choice.cli_name: choice
    for choice in (
        SchedulerChoice("dpm++", "DPMSolverMultistepScheduler", "DPM++ 2M"),
        SchedulerChoice("sa-solver", "SASolverScheduler", "SA-Solver"),
        SchedulerChoice("ddim", "DDIMScheduler", "DDIM"),
        SchedulerChoice("euler", "EulerDiscreteScheduler", "Euler"),
        SchedulerChoice("euler-a", "EulerAncestralDiscreteScheduler", "Euler a"),
        SchedulerChoice("lcm", "LCMScheduler", "LCM"),
        SchedulerChoice("ddpm", "DDPMScheduler", "DDPM"),
    )
}


def sampler_name(class_name: str) -> str:
    """A1111's sampler name for a diffusers scheduler class (the class name itself when unknown)."""
    return next((c.sampler_name for c in SCHEDULERS.values() if c.class_name == class_name), class_name)


def _check_int(flag: str, value: int | None, low: int, high: int, what: str = "") -> None:
    if value is not None and not low <= value <= high:
        raise PixartError(f"{flag} {value}: must be between {low} and {high}{what}")


@dataclass(frozen=True)
class EncodeSettings:
    """How prompts become embeddings (the negative prompt, token length, cleaning, T5 precision, cache)."""

    negative_prompt: str = ""
    max_sequence_length: int | None = None
    clean_caption: bool = True
    precision: str = "full"
    cache: Path | None = None
    cache_option: str = "--cache"  # what named the cache folder, for its errors: --cache or PIXART_CACHE

    def __post_init__(self):
        if not isinstance(self.negative_prompt, str):
            raise PixartError(f"--negative-prompt {self.negative_prompt!r}: must be text")
        if len(self.negative_prompt) > MAX_PROMPT_CHARS:
            raise PixartError(
                f"--negative-prompt is {len(self.negative_prompt):,} characters, beyond the {MAX_PROMPT_CHARS:,} "
                f"pixart takes (T5 reads at most {MAX_SEQUENCE_LENGTH} tokens of it); shorten it"
            )
        _check_int("--max-sequence-length", self.max_sequence_length, 1, MAX_SEQUENCE_LENGTH)
        if self.precision not in PRECISIONS:
            raise PixartError(f"--text-encoder-precision {self.precision!r}: use {', '.join(PRECISIONS)}")
        if self.clean_caption:
            import importlib.util

            missing = [
                name
                for name, module in (("beautifulsoup4", "bs4"), ("ftfy", "ftfy"))
                if importlib.util.find_spec(module) is None
            ]
            if missing:
                # diffusers would silently skip cleaning and give another image than the pipeline's default.
                raise PixartError(
                    f"caption cleaning needs {' and '.join(missing)}: pip install "
                    f"{' '.join(missing)}, or pass --no-clean-caption"
                )


def check_prompts(prompts) -> list[str]:
    """At least one prompt, each with some text."""
    prompts = list(prompts)
    if not prompts:
        raise PixartError("PROMPT: give at least one prompt, or --prompts-file FILE")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PixartError(f"PROMPT #{index + 1} is empty; give some text to draw")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PixartError(
                f"PROMPT #{index + 1} is {len(prompt):,} characters, beyond the {MAX_PROMPT_CHARS:,} pixart takes "
                f"(T5 reads at most {MAX_SEQUENCE_LENGTH} tokens of it); shorten it"
            )
    return prompts


@dataclass(frozen=True)
class DenoiseSettings:
    """How embeddings become latents. ``seed`` None draws a random one (``with_seed``) before the run."""

    steps: int | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    binning: bool = True
    num_images: int = 1
    scheduler: str | None = None
    batch_size: int | None = None
    compile: bool = False  # torch.compile the transformer (opt-in: not bit-identical to eager)
    strength: float | None = None  # image to image only (init latents given): None is DEFAULT_STRENGTH there
    step_cache: str | None = None  # opt-in, approximate: "fbc:THRESHOLD" or "taylorseer:INTERVAL" (step_cache.py)
    pag_scale: float | None = None  # perturbed-attention guidance: None is DEFAULT_PAG_SCALE (off)
    pag_layers: tuple[str, ...] | None = None  # None: diffusers' default for PixArt-Σ (models/pag.py)

    def __post_init__(self):
        self._check_pag()
        if self.step_cache is not None:
            from pixart_cli.models import step_caching

            object.__setattr__(self, "step_cache", step_caching.check(self.step_cache))  # canonical, as recorded
        if self.strength is not None and not (math.isfinite(self.strength) and 0 < self.strength <= 1):
            raise PixartError(
                f"--strength {self.strength}: must be above 0 and at most 1 (1 runs every step "
                f"from the noised image; default {DEFAULT_STRENGTH:g})"
            )
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise PixartError(
                f"--scheduler {self.scheduler!r}: unknown; use one of {', '.join(SCHEDULERS)} "
                "(default: the model's own)"
            )
        if self.batch_size is not None and self.batch_size < 1:
            raise PixartError(f"--batch-size {self.batch_size}: must be at least 1")
        _check_int("--steps", self.steps, 1, MAX_STEPS)
        if self.guidance_scale is not None and not (
            math.isfinite(self.guidance_scale) and 0 <= self.guidance_scale <= MAX_GUIDANCE
        ):
            raise PixartError(
                f"--guidance-scale {self.guidance_scale}: must be a number from 0 to {MAX_GUIDANCE:g} "
                "(≤1 turns guidance off)"
            )
        _check_int("--seed", self.seed, 0, MAX_SEED)
        for flag, value in (("--width", self.width), ("--height", self.height)):
            if value is not None and (value < 8 or value % 8):
                raise PixartError(f"{flag} {value}: must be a positive multiple of 8")
        _check_int("--num-images", self.num_images, 1, MAX_IMAGES)

    def _check_pag(self) -> None:
        if self.pag_scale is not None and not (math.isfinite(self.pag_scale) and 0 <= self.pag_scale <= MAX_PAG_SCALE):
            raise PixartError(
                f"--pag-scale {self.pag_scale}: must be a number from 0 to {MAX_PAG_SCALE:g} (0 turns perturbed-"
                "attention guidance off; diffusers' docs use 3)"
            )
        if self.pag_layers is None:
            return
        import re

        layers = tuple(self.pag_layers)
        if not layers or len(layers) > MAX_PAG_LAYERS:
            raise PixartError(f"--pag-layers: give 1 to {MAX_PAG_LAYERS} layer names, e.g. blocks.1,blocks.14")
        for layer in layers:
            if not isinstance(layer, str) or not layer.strip() or len(layer) > 200:
                raise PixartError(
                    f"--pag-layers {','.join(map(str, layers))!r}: each layer is a name such as blocks.14 "
                    "(comma-separated, no empty entries)"
                )
            try:
                re.compile(layer)
            except re.error as error:
                raise PixartError(
                    f"--pag-layers {layer!r}: not a layer name or pattern ({error}); use names such as blocks.14"
                ) from None
        if not self.pag:
            raise PixartError(
                f"--pag-layers {','.join(layers)}: only with perturbed-attention guidance; give --pag-scale above 0"
            )
        object.__setattr__(self, "pag_layers", layers)

    @property
    def pag(self) -> bool:
        """Whether perturbed-attention guidance is on (as PAGMixin.do_perturbed_attention_guidance: scale > 0)."""
        return (DEFAULT_PAG_SCALE if self.pag_scale is None else self.pag_scale) > 0

    def with_seed(self) -> DenoiseSettings:
        """These settings with a concrete seed: the given one, else a random one (shown and recorded), low enough
        that every image of a run (seed + i) has a valid seed too."""
        if self.seed is not None:
            return self
        return replace(self, seed=secrets.randbelow(MAX_SEED + 1 - MAX_IMAGES))

    def check_total(self, prompts: int) -> None:
        """The run's image count (prompts x --num-images) within the bound of one run."""
        total = prompts * self.num_images
        if total > MAX_IMAGES:
            raise PixartError(
                f"--num-images {self.num_images}: {prompts} prompt(s) x {self.num_images} = {total} "
                f"images, over the {MAX_IMAGES} one run holds; split the prompts into several runs"
            )
        # the last image's seed must be one --seed accepts, so that every image can be made again alone
        if self.seed is not None and self.seed + total - 1 > MAX_SEED:
            raise PixartError(
                f"--seed {self.seed}: image {total} would get seed {self.seed + total - 1}, above {MAX_SEED}; "
                f"use a seed of at most {MAX_SEED - total + 1}"
            )


@dataclass(frozen=True)
class MaskSettings:
    """How a mask image becomes a mask (inpainting): its edge blur, and whether decode pastes the source image's
    pixels back outside it. ``None``: not given (``blur`` is DEFAULT_MASK_BLUR, ``keep_unmasked`` is on)."""

    blur: int | None = None
    keep_unmasked: bool | None = None

    def __post_init__(self):
        _check_int("--mask-blur", self.blur, 0, MAX_MASK_BLUR, " pixels (0: a hard edge)")

    @property
    def given(self) -> list[str]:
        """The flags given, as the user wrote them (for the error when there is no mask)."""
        return [
            flag
            for flag, given in (
                (f"--mask-blur {self.blur}", self.blur is not None),
                ("--keep-unmasked" if self.keep_unmasked else "--no-keep-unmasked", self.keep_unmasked is not None),
            )
            if given
        ]

    @property
    def blur_px(self) -> int:
        return DEFAULT_MASK_BLUR if self.blur is None else self.blur

    @property
    def keep(self) -> bool:
        return True if self.keep_unmasked is None else self.keep_unmasked
