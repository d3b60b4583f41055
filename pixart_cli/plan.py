"""The run plan: every check the configs can answer, made once, before any model loads.

``plan_denoise`` turns the user's ``DenoiseSettings`` and the denoise stage's inputs (the embeddings' shape, and
the conditioning inputs: init latents for image to image) into a ``DenoisePlan``: the concrete seeds, the
``Schedule`` (each default filled from the model's family and configs, the size binned as the pipeline bins it),
and the checked inputs. The stage takes the plan as it is and checks nothing again. ``fit_image`` does the same for
an image about to be encoded (encode-image, generate --image). Reads configs only: no weights load, and nothing
heavier than diffusers' image processor is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file
from pixart_cli.models.source import Model
from pixart_cli.settings import DEFAULT_STRENGTH, SCHEDULERS, DenoiseSettings

# With one step the pipeline returns the scheduler's pred_original_sample (step(...)[1]); these don't give one.
NO_SINGLE_STEP = {"DPMSolverMultistepScheduler", "SASolverScheduler"}


@dataclass(frozen=True)
class Schedule:
    """The run's settings with the model family's defaults filled in, and the size the transformer runs at."""

    steps: int
    timesteps: list[int] | None  # a fixed schedule (one-step models) replaces `steps`
    guidance_scale: float
    scheduler: str  # diffusers class name
    requested_width: int
    requested_height: int
    width: int  # binned (or requested, without a bin table or with --no-binning)
    height: int
    binned: bool
    strength: float | None = None  # image to image: the share of the schedule that runs

    @property
    def total_steps(self) -> int:
        """The schedule's length (a fixed schedule's, else --steps)."""
        return len(self.timesteps) if self.timesteps else self.steps

    @property
    def steps_per_image(self) -> int:
        """Steps that run for each image (image to image runs only the last ones)."""
        return steps_to_run(self.total_steps, self.strength)


@dataclass(frozen=True)
class DenoisePlan:
    """What the denoise stage runs, all checked: settings with a concrete seed, the schedule, one seed per image,
    and the conditioning inputs as data (``init``: image to image's init latents, a ``staged.Latents``)."""

    settings: DenoiseSettings
    schedule: Schedule
    seeds: list[int]
    init: Any = None

    @property
    def images(self) -> int:
        return len(self.seeds)

    def with_init(self, init) -> DenoisePlan:
        """This plan with the init latents made for it (generate --image encodes them after planning)."""
        return dataclasses.replace(self, init=init)


@dataclass(frozen=True)
class RunPlan:
    """A whole one-process run (generate), checked before the first model loads: the prompts, the encode
    settings, the denoise plan, and for image to image the source image with the sizes it is encoded at."""

    prompts: list[str]
    encoding: Any  # settings.EncodeSettings
    denoise: DenoisePlan
    image: Any = None  # image_io.SourceImage
    image_sizes: Schedule | None = None
    decode_batch_size: int | None = None


def steps_to_run(steps: int, strength: float | None) -> int:
    """Steps that run from init latents: diffusers' ``get_timesteps`` arithmetic (all of them without init)."""
    if strength is None:
        return steps
    init_timestep = min(int(steps * strength), steps)
    return steps - max(steps - init_timestep, 0)


def chosen_scheduler(source: Model, choice: str | None) -> str:
    """The diffusers class name of the scheduler: the user's --scheduler, else the model's own (unchecked)."""
    return SCHEDULERS[choice].class_name if choice is not None else source.config("scheduler").get("_class_name", "")


def resolved(settings: DenoiseSettings, source: Model) -> dict:
    """The settings that change an image with each default filled from the model's family and configs: steps,
    timesteps, guidance_scale, scheduler (class name), requested_width, requested_height, binned. Reads configs
    only and imports nothing heavy (scale-out's drivers compare these with a manifest before any model loads)."""
    family = source.family
    return {
        "steps": family.steps if settings.steps is None else settings.steps,
        "timesteps": list(family.timesteps) if settings.steps is None and family.timesteps else None,
        "guidance_scale": float(family.guidance_scale if settings.guidance_scale is None else settings.guidance_scale),
        "scheduler": chosen_scheduler(source, settings.scheduler),
        "requested_width": source.native_size if settings.width is None else settings.width,
        "requested_height": source.native_size if settings.height is None else settings.height,
        "binned": settings.binning and source.bin_table is not None,
    }


def schedule(settings: DenoiseSettings, source: Model, size_from: str | None = None) -> Schedule:
    """Fill each default from the model's family and configs, check what only the model can tell, and bin the
    size as the pipeline does. ``size_from``: the file the size came from (init latents), named in a size error."""
    filled = resolved(settings, source)
    steps, timesteps, scheduler = filled["steps"], filled["timesteps"], filled["scheduler"]
    check_scheduler(source, scheduler)
    if steps == 1 and not timesteps and scheduler in NO_SINGLE_STEP:
        raise PixartError(
            f"--steps 1: {scheduler} cannot take a single step in the PixArt pipeline; "
            "use --steps 2 or more (one-step models such as DMD use their own scheduler)"
        )
    train_steps = source.config("scheduler").get("num_train_timesteps")
    if isinstance(train_steps, int) and steps > train_steps:
        raise PixartError(f"--steps {steps}: this model's scheduler has only {train_steps} timesteps; use fewer")
    requested_width, requested_height = filled["requested_width"], filled["requested_height"]
    check_size(source, requested_width, requested_height, patches=False, size_from=size_from)
    if filled["binned"]:
        from pixart_cli.models.facade import import_diffusers

        PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor
        height, width = PixArtImageProcessor.classify_height_width_bin(
            requested_height, requested_width, source.bin_table
        )
    else:
        height, width = requested_height, requested_width
    check_size(source, width, height, binned=filled["binned"], size_from=size_from)  # the size the transformer runs at
    return Schedule(
        steps,
        timesteps,
        filled["guidance_scale"],
        scheduler,
        requested_width,
        requested_height,
        width,
        height,
        filled["binned"],
        settings.strength,
    )


def check_size(
    source: Model, width: int, height: int, binned: bool = False, patches: bool = True, size_from: str | None = None
) -> None:
    """Within 4x the native size, and (``patches``) a whole number of transformer patches, which the transformer
    needs: otherwise it fails only after the run has done its work."""
    limit = 4 * source.native_size
    multiple = source.vae_scale_factor * int(source.config("transformer").get("patch_size", 2))
    note = "" if size_from is None else f" (the size is the one {size_from} was encoded for)"
    for flag, value in (("--width", width), ("--height", height)):
        if value > limit:
            raise PixartError(
                option=flag,
                value=value,
                reason=f"beyond this model's maximum of {limit} (4x its native {source.native_size})",
                fix=f"use a smaller size{note}",
            )
        if patches and value % multiple:
            where = "the bin it falls in" if binned else "without binning it"
            raise PixartError(
                option=flag,
                value=value,
                reason=f"{where} must be a multiple of {multiple} for this model "
                f"(VAE x{source.vae_scale_factor}, patch {multiple // source.vae_scale_factor})",
                fix=f"use {max(multiple, value // multiple * multiple)}{note}",
            )


def check_scheduler(source: Model, name: str) -> None:
    """A class diffusers has (imports its scheduler modules)."""
    from pixart_cli.models.facade import scheduler_class

    if scheduler_class(name) is None:
        raise PixartError(
            f"--model {source.id}: unknown scheduler class {name!r} in scheduler/scheduler_config.json", EXIT_RUNTIME
        )


# --- encode -------------------------------------------------------------------------------------------------------
def max_sequence_length(settings, source: Model) -> int:
    """Tokens per prompt: the user's, else the model family's."""
    if settings.max_sequence_length is None:
        return source.family.max_sequence_length
    return settings.max_sequence_length


# --- denoise ------------------------------------------------------------------------------------------------------
def plan_denoise(
    settings: DenoiseSettings,
    source: Model,
    prompts: int,
    *,
    embedding_width: int | None = None,
    embeddings_name: str = "embeddings",
    init=None,
    init_size: dict | None = None,
    init_name: str = "--init-latents",
    loras: tuple = (),
) -> DenoisePlan:
    """Every check of a denoise run, once: the seed drawn (when not given), the image count, the embeddings' width
    against the transformer, the schedule and sizes, the init latents (image to image) against all of them, and
    each LoRA against the transformer's skeleton.

    ``init``: a ``staged.Latents`` of init latents, or None; ``init_size``: instead of them, the sizes they will be
    encoded for (generate --image: a ``fit_image`` schedule as a dict; ``with_init`` attaches the latents later);
    ``init_name`` names them in errors (a path, or ``--image``); ``embedding_width``: the embeddings' last
    dimension, checked against the transformer's caption_channels.
    """
    source.check_fit("transformer")  # its config against its weights, before any skeleton of it is built
    if init is not None:
        init_size = init.meta
    settings = with_init_size(settings.with_seed(), init_size, init_name)
    settings.check_total(prompts)
    if embedding_width is not None:
        caption_channels = source.config("transformer").get("caption_channels")
        if caption_channels is not None and embedding_width != caption_channels:
            raise bad_file(
                embeddings_name,
                f"embeddings are {embedding_width} wide but {source.id} takes {caption_channels}; "
                "encode with the same model family",
            )
    planned = schedule(settings, source, size_from=None if init is None else init_name)
    images = prompts * settings.num_images
    if init is not None:
        check_init(init, planned, source, init_name, images)
    check_steps(planned)
    if loras:  # a LoRA that does not fit stops here, before any weights load (and before T5 runs, in generate)
        from pixart_cli.models.lora import check_loras_for_model

        check_loras_for_model(list(loras), source)
    return DenoisePlan(settings, planned, [settings.seed + index for index in range(images)], init)


def with_init_size(
    settings: DenoiseSettings, init_meta: dict | None, option: str = "--init-latents"
) -> DenoiseSettings:
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


def check_init(init, plan: Schedule, source: Model, path: str, images: int) -> None:
    """The init latents must suit this transformer and VAE, and this run's size and image count. Configs only."""
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


def check_steps(plan: Schedule) -> None:
    """At least one step must run: diffusers' int(steps x strength) rounds down."""
    if plan.strength is not None and plan.steps_per_image < 1:
        raise PixartError(
            f"--strength {plan.strength}: with {plan.total_steps} steps, "
            "int(steps x strength) = 0 steps would run; raise --strength or --steps"
        )


# --- decode -------------------------------------------------------------------------------------------------------
def check_latents(latents, source: Model, path: str, batch_size: int | None = None) -> None:
    """Latents (a ``staged.Latents``) must match this VAE's channels and scale; checked on its config before the
    weights load. ``batch_size``: decode's --batch-size."""
    if batch_size is not None and batch_size < 1:
        raise PixartError(f"--batch-size {batch_size}: must be at least 1")
    source.check_fit("vae")
    channels = source.config("vae").get("latent_channels", 4)
    found = latents.latents.shape[1]
    if found != channels:
        raise bad_file(path, f"latents have {found} channels but the VAE of {source.id} takes {channels}")
    scale = source.vae_scale_factor
    height, width = latents.meta["height"], latents.meta["width"]
    decoded_size = (latents.latents.shape[2] * scale, latents.latents.shape[3] * scale)
    if decoded_size != (height, width):
        raise bad_file(
            path,
            f"latents {list(latents.latents.shape)} do not decode to the recorded "
            f"{width}x{height} with this VAE (x{scale})",
        )
    # The size decode resizes to is bounded as --width/--height are in denoise: a file cannot ask for more.
    limit = 4 * source.native_size
    for key in ("requested_width", "requested_height", "width", "height"):
        if latents.meta[key] > limit:
            raise bad_file(
                path,
                f"meta.{key} is {latents.meta[key]}, beyond this model's maximum of {limit} "
                f"(4x its native {source.native_size}); not a file pixart wrote for it",
            )


# --- encode-image -------------------------------------------------------------------------------------------------
def check_size_options(width: int | None, height: int | None) -> None:
    """--width/--height of an image to encode: positive multiples of 8, as denoise takes them (checked before the
    image is read)."""
    DenoiseSettings(width=width, height=height)


def fit_image(image, source: Model, width: int | None = None, height: int | None = None, binning: bool = True):
    """The requested size (--width/--height, else the image's own rounded down to a multiple of 8) and the size the
    transformer will run at (its bin), computed exactly as denoise computes them. Reads configs only.

    ``image``: a ``image_io.SourceImage``. Returns the ``Schedule`` of that size (``requested_width/height``,
    ``width/height`` binned, ``binned``).
    """
    check_size_options(width, height)
    source.check_fit("vae")
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
    except PixartError as error:  # a size of the image's own that the model cannot take: named as the image's
        flag = error.option
        if flag not in given or given[flag] is not None:
            raise
        side = flag.removeprefix("--")
        used = "" if own[flag] == requested[flag] else f" (used as {requested[flag]}, rounded down to a multiple of 8)"
        raise PixartError(
            f"{image.option} {image.path}: its {side} {own[flag]}{used}: {error.reason}; "
            f"pass {flag} {error.fix.removeprefix('use ')}",
            error.exit_code,
        ) from None


# --- generate -------------------------------------------------------------------------------------------------
def plan_run(
    prompts,
    encoding,
    denoising: DenoiseSettings,
    source: Model,
    *,
    image=None,
    loras: tuple = (),
    decode_batch_size: int | None = None,
) -> RunPlan:
    """Every check of a generate run, before T5 loads: prompts, seeds and totals, the image's sizes (image to
    image), the schedule, the text encoder's width against the transformer, and the LoRAs' fit."""
    from pixart_cli.settings import check_prompts

    prompts = check_prompts(prompts)
    for component in ("tokenizer", "text_encoder", "vae"):  # the transformer's in plan_denoise: before T5 loads
        source.check_fit(component)
    sizes = None if image is None else fit_image(image, source, denoising.width, denoising.height, denoising.binning)
    denoise_plan = plan_denoise(
        denoising,
        source,
        len(prompts),
        embedding_width=source.config("text_encoder").get("d_model"),
        embeddings_name=f"--model {source.id}",
        init_size=None if sizes is None else dataclasses.asdict(sizes),
        init_name="--image",
        loras=loras,
    )
    return RunPlan(prompts, encoding, denoise_plan, image, sizes, decode_batch_size)
