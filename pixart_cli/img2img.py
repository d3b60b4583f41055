"""Image to image, staged like the rest: an image becomes init latents (the VAE encoder only), and denoise starts
from them part-way through the schedule.

It follows diffusers' img2img pipelines (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, 0.42):
1. latents = ``retrieve_latents(vae.encode(image), generator)`` (sample_mode "sample") x ``vae.config.scaling_factor``,
   the image first resized and center-cropped to the size the transformer runs at (VaeImageProcessor, "crop");
2. ``get_timesteps``: init_timestep = min(int(steps * strength), steps), t_start = max(steps - init_timestep, 0),
   timesteps = scheduler.timesteps[t_start * order:], and scheduler.set_begin_index(t_start * order);
3. ``prepare_latents``: noise = randn_tensor(shape, generator), latents = scheduler.add_noise(init, noise,
   timesteps[:1]); no multiplication by init_noise_sigma, as add_noise puts them at that timestep's noise level;
4. the usual loop over the remaining timesteps.

Two choices of ours, because the stages run apart:
- The VAE's posterior is sampled, as diffusers does, from a CPU generator seeded ``SAMPLE_SEED``: an image always
  encodes to the same latents, on any device. (The posterior's spread is tiny; the image's identity matters.)
- The noise of step 3 is the txt2img noise of the same seed: image i gets seed + i, from a CPU generator.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pixart_cli import artifacts, memory
from pixart_cli.errors import PixartError, bad_file
from pixart_cli.models import Model
from pixart_cli.runtime import RunContext
from pixart_cli.settings import DEFAULT_STRENGTH, DenoiseSettings

SAMPLE_SEED = 0  # the VAE posterior's sample (see the module's notes)


# --- encode-image: image -> init latents -----------------------------------------------------------------------
def fit(
    image: artifacts.SourceImage,
    source: Model,
    width: int | None = None,
    height: int | None = None,
    binning: bool = True,
):
    """The requested size (--width/--height, else the image's own rounded down to a multiple of 8) and the size the
    transformer will run at (its bin), computed exactly as denoise computes them. Reads configs only.

    Returns denoise's ``Schedule``: ``requested_width/height``, ``width/height`` (binned) and ``binned``.
    """
    from pixart_cli.denoise import schedule

    check_size_options(width, height)
    own = dict(zip(("--width", "--height"), image.size))
    given = {"--width": width, "--height": height}
    # A side not given is the image's own, rounded down to a multiple of 8: when that is out of bounds, the image
    # is what to change (or that side's flag), so the line names the image.
    limit = 4 * source.native_size
    for flag, value in given.items():
        if value is not None:
            continue
        side = flag.removeprefix("--")
        if own[flag] < 8:
            extent = "wide" if side == "width" else "high"
            raise PixartError(
                f"{image.option} {image.path}: it is {own[flag]} pixels {extent}; give an image at least 8 "
                f"pixels {extent}, or pass {flag}"
            )
        if own[flag] // 8 * 8 > limit:
            raise PixartError(
                f"{image.option} {image.path}: its {side} {own[flag]} is beyond this model's maximum of {limit} "
                f"(4x its native {source.native_size}); pass {flag} to scale it down"
            )
    requested = {flag: own[flag] // 8 * 8 if value is None else value for flag, value in given.items()}
    try:
        return schedule(
            DenoiseSettings(width=requested["--width"], height=requested["--height"], binning=binning), source
        )
    except PixartError as error:  # a size check of denoise's, about a side the image gave: named as the image's
        flag, _, rest = str(error).partition(" ")
        if flag not in given or given[flag] is not None:
            raise
        reason = rest.partition(": ")[2].replace("; use ", f"; pass {flag} ")
        side = flag.removeprefix("--")
        used = "" if own[flag] == requested[flag] else f" (used as {requested[flag]}, rounded down to a multiple of 8)"
        raise PixartError(
            f"{image.option} {image.path}: its {side} {own[flag]}{used}: {reason}", error.exit_code
        ) from None


def check_size_options(width: int | None, height: int | None) -> None:
    """--width/--height of an image to encode: positive multiples of 8, as denoise takes them (checked before the
    image is read)."""
    DenoiseSettings(width=width, height=height)


def encode_image(
    image: artifacts.SourceImage,
    ctx: RunContext,
    width: int | None = None,
    height: int | None = None,
    binning: bool = True,
) -> artifacts.Latents:
    """An image -> init latents [1, C, H/8, W/8] at the size the transformer will run at. Loads only the VAE, and
    keeps only its encoder on the device."""
    import torch

    from pixart_cli.lean import import_diffusers
    from pixart_cli.vae_decoder import encoder_skeleton, load_vae_half

    PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor

    # 1. The sizes, from the configs
    source = ctx.model
    sizes = fit(image, source, width, height, binning)

    # 2. Full or tiled for the budget (the decoder's estimate: the encoder's activations are no larger), then the
    #    VAE's encoder only
    meter = ctx.meter("encode-image")
    budget, context = ctx.budget()
    config = source.config("vae")
    skeleton = memory.meta_model(encoder_skeleton, config, ctx.dtype)
    chosen = dataclasses.replace(
        memory.plan_decode(
            budget,
            context,
            memory.parameter_bytes(skeleton),
            config["block_out_channels"][0],
            sizes.height,
            sizes.width,
            ctx.dtype.itemsize,
        ),
        stage="encode-image",
    )
    del skeleton
    ctx.note(chosen.describe())
    with meter.phase("load"):
        vae = load_vae_half(source, config, ctx, chosen.tile, "encoder")

    # 3. Resize and center-crop to the binned size, as diffusers' image processor does, then encode
    processor = PixArtImageProcessor(vae_scale_factor=source.vae_scale_factor)
    ctx.advance("encode-image", 0, 1)
    with meter.phase("compute"), torch.inference_mode():
        pixels = processor.preprocess(image.pixels, height=sizes.height, width=sizes.width, resize_mode="crop")
        posterior = vae.encode(pixels.to(ctx.device, ctx.dtype)).latent_dist
        latents = (posterior.sample(torch.Generator("cpu").manual_seed(SAMPLE_SEED)) * vae.config.scaling_factor).cpu()
    ctx.advance("encode-image", 1, 1)
    scaling_factor = float(vae.config.scaling_factor)
    del vae, posterior
    ctx.free()
    meter.finish(chosen.name if not chosen.tile else f"tiled-{chosen.tile}", ctx.reports)
    from pixart_cli.denoise import check_finite

    check_finite(latents, ctx.dtype_name)

    # 4. What denoise checks the latents against, and what the outputs record about their source
    meta = {
        "model": source.recorded,
        "revision": source.revision,
        "family": source.family.name,
        "dtype": ctx.dtype_name,
        "prompts": [""],  # decode can show the start image; it has no prompt
        "seeds": [SAMPLE_SEED],
        "sample": "latent_dist.sample",
        "vae_scaling_factor": scaling_factor,
        "height": sizes.height,
        "width": sizes.width,
        "requested_height": sizes.requested_height,
        "requested_width": sizes.requested_width,
        "binned": sizes.binned,
        "source_image": image.record(),
    }
    return artifacts.Latents(latents, meta)


# --- denoise --init-latents: checks before any weights load ------------------------------------------------------
def settings_for(settings: DenoiseSettings, init_meta: dict | None, option: str = "--init-latents") -> DenoiseSettings:
    """The run's settings with the init latents' size (what they were encoded for) and the default strength.

    Without init latents, ``--strength`` is an error. A --width/--height that differs from the init's is one too.
    """
    if init_meta is None:
        if settings.strength is not None:
            raise PixartError(f"--strength {settings.strength}: only for image to image; give {option} FILE too")
        return settings
    requested = (init_meta["requested_width"], init_meta["requested_height"])
    differing = [
        f"{flag} {value}"
        for flag, value, encoded in (
            ("--width", settings.width, requested[0]),
            ("--height", settings.height, requested[1]),
        )
        if value is not None and value != encoded
    ]
    if differing:
        raise PixartError(
            f"{' '.join(differing)}: the image was encoded for {requested[0]}x{requested[1]}; leave "
            f"{'it' if len(differing) == 1 else 'them'} out, or encode the image again at that size"
        )
    strength = DEFAULT_STRENGTH if settings.strength is None else settings.strength
    return dataclasses.replace(
        settings,
        width=requested[0],
        height=requested[1],
        strength=strength,
        binning=settings.binning and bool(init_meta.get("binned", True)),
    )


@contextmanager
def sized_by(init: artifacts.Latents | None, path: str):
    """A size error of the block names the init latents the size came from."""
    try:
        yield
    except PixartError as error:
        if init is None or not str(error).startswith(("--width", "--height")):
            raise
        raise PixartError(f"{error} (the size is the one {path} was encoded for)", error.exit_code) from error


def steps_to_run(steps: int, strength: float | None) -> int:
    """Steps that run from init latents: diffusers' ``get_timesteps`` arithmetic (all of them without init)."""
    if strength is None:
        return steps
    init_timestep = min(int(steps * strength), steps)
    return steps - max(steps - init_timestep, 0)


def check_init(init: artifacts.Latents | None, plan, source: Model, path: str, images: int) -> None:
    """The init latents must suit this transformer and VAE, and this run's size and image count. Configs only."""
    if init is None:
        return
    latents, meta = init.latents, init.meta
    channels = source.config("transformer").get("in_channels", 4)
    if latents.shape[1] != channels:
        raise bad_file(
            path,
            f"init latents have {latents.shape[1]} channels but the transformer of {source.id} "
            f"takes {channels}; encode the image with the same model family",
        )
    recorded, expected = meta.get("vae_scaling_factor"), source.config("vae").get("scaling_factor")
    if isinstance(recorded, float) and isinstance(expected, float) and abs(recorded - expected) > 1e-6:
        raise bad_file(
            path,
            f"init latents come from another VAE (scaling factor {recorded:g}; {source.id}'s is "
            f"{expected:g}); encode the image with the same model family",
        )
    scale = source.vae_scale_factor
    size = (latents.shape[3] * scale, latents.shape[2] * scale)
    if size != (plan.width, plan.height):
        raise bad_file(
            path,
            f"init latents are {size[0]}x{size[1]} but this run denoises at {plan.width}x"
            f"{plan.height}; encode the image with the same model and --width/--height/--no-binning",
        )
    if latents.shape[0] not in (1, images):
        raise bad_file(
            path,
            f"holds {latents.shape[0]} init latents for {images} images; give one (it starts every "
            "image) or one per image",
        )
    check_steps(plan)


def check_steps(plan) -> None:
    """At least one step must run: diffusers' int(steps x strength) rounds down."""
    if plan.strength is not None and plan.steps_per_image < 1:
        steps = len(plan.timesteps) if plan.timesteps else plan.steps
        raise PixartError(
            f"--strength {plan.strength}: with {steps} steps, "
            "int(steps x strength) = 0 steps would run; raise --strength or --steps"
        )


def meta_for(init: artifacts.Latents | None, plan) -> dict:
    """What the latents and images record of an image-to-image run (nothing for text to image)."""
    if init is None:
        return {}
    # The init file is untrusted: only a {name, sha256} record of short strings is passed on to the outputs.
    recorded = init.meta.get("source_image")
    fields = ("name", "sha256")
    source_image = (
        {key: recorded[key] for key in fields}
        if isinstance(recorded, dict)
        and set(recorded) == set(fields)
        and all(isinstance(recorded[key], str) and len(recorded[key]) <= 1024 for key in fields)
        else None
    )
    return {"strength": plan.strength, "steps_run": plan.steps_per_image, "source_image": source_image}


# --- the start of the loop --------------------------------------------------------------------------------------
@dataclass
class Start:
    """Where the loop starts (sampling.sample_latents' ``start_latents`` and ``begin_index``): the init latents
    noised to the first remaining timestep, and that timestep's index in the scheduler's whole schedule."""

    latents: Any  # [B, C, h, w] on the device
    begin_index: int


def set_full_schedule(scheduler, steps: int, timesteps: list[int] | None, device) -> None:
    """The whole schedule, as the pipeline's retrieve_timesteps sets it (a fixed schedule replaces ``steps``)."""
    if timesteps:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def start(
    scheduler, steps: int, timesteps: list[int] | None, strength: float, init, generators, device, dtype
) -> Start:
    """diffusers' get_timesteps then prepare_latents, on ``scheduler`` (left at the start's begin index).

    init: [B, C, h, w] init latents, one row per image; generators: one CPU generator per row (the txt2img noise).
    """
    from diffusers.utils.torch_utils import randn_tensor

    set_full_schedule(scheduler, steps, timesteps, device)
    total = len(timesteps) if timesteps else steps  # the num_inference_steps that get_timesteps is given
    init_timestep = min(int(total * strength), total)
    t_start = max(total - init_timestep, 0)
    begin_index = t_start * scheduler.order
    remaining = scheduler.timesteps[begin_index:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    init = init.to(device=device, dtype=dtype)
    noise = randn_tensor(init.shape, generator=generators, device=device, dtype=dtype)
    latents = scheduler.add_noise(init, noise, remaining[:1].repeat(init.shape[0]))
    return Start(latents, begin_index)
