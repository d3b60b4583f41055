"""The run plan: every check the configs can answer, made once, before any model loads.

``plan_denoise`` turns the user's ``DenoiseSettings`` and the denoise stage's inputs (the embeddings' shape, and
the conditioning inputs: init latents for image to image, a mask for inpainting, control latents and the ControlNet) into a
``DenoisePlan``: the concrete seeds, the
``Schedule`` (each default filled from the model's family and configs, the size binned as the pipeline bins it),
and the checked inputs. The stage takes the plan as it is and checks nothing again. ``fit_image`` does the same for
an image about to be encoded (encode-image, generate --image). Reads configs only: no weights load, and nothing
heavier than diffusers' image processor is imported.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pixart_cli import conditioning
from pixart_cli.conditioning import (
    check_control,
    check_controlnet_pair,
    check_init,
    check_mask_options,
    with_control_size,
    with_init_size,
)
from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file
from pixart_cli.models.source import Model
from pixart_cli.settings import SCHEDULERS, DenoiseSettings, MaskSettings

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
    pag_scale: float | None = None  # perturbed-attention guidance (None: off)
    pag_layers: list | None = None  # its layers: the user's, else diffusers' default

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
    and the conditioning inputs as data (``init``: image to image's init latents, a ``staged.Latents``; ``mask``:
    inpainting's ``staged.Mask``, or until it is made from a mask image, the checked ``mask_request``; ``control``:
    a ControlNet's control latents, a ``staged.ControlLatents``, with ``controlnet``, the adapter file checked
    against the model, a ``controlnet_file.ControlNetFile``)."""

    settings: DenoiseSettings
    schedule: Schedule
    seeds: list[int]
    init: Any = None
    control: Any = None
    controlnet: Any = None
    mask: Any = None
    mask_request: conditioning.MaskRequest | None = None

    @property
    def images(self) -> int:
        return len(self.seeds)

    def with_init(self, init) -> DenoisePlan:
        """This plan with the init latents made for it (generate --image encodes them after planning)."""
        return dataclasses.replace(self, init=init)

    def with_control(self, control) -> DenoisePlan:
        """This plan with the control latents made for it (generate --control-image encodes them after planning)."""
        return dataclasses.replace(self, control=control)

    def with_mask(self, mask) -> DenoisePlan:
        """This plan with the mask made from its ``mask_request`` (stages/encode_mask.py)."""
        return dataclasses.replace(self, mask=mask, mask_request=None)


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
    control_image: Any = None  # image_io.SourceImage: the edge map of a ControlNet
    control_sizes: Schedule | None = None


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
    timesteps, guidance_scale, scheduler (class name), requested_width, requested_height, binned, pag_scale and
    pag_layers (None without perturbed-attention guidance). Reads configs
    only and imports nothing heavy (scale-out's drivers compare these with a manifest before any model loads)."""
    family = source.family
    pag_layers = None
    if settings.pag:
        from pixart_cli.models.pag import default_layers

        pag_layers = list(default_layers() if settings.pag_layers is None else settings.pag_layers)
    return {
        "steps": family.steps if settings.steps is None else settings.steps,
        "timesteps": list(family.timesteps) if settings.steps is None and family.timesteps else None,
        "guidance_scale": float(family.guidance_scale if settings.guidance_scale is None else settings.guidance_scale),
        "scheduler": chosen_scheduler(source, settings.scheduler),
        "requested_width": source.native_size if settings.width is None else settings.width,
        "requested_height": source.native_size if settings.height is None else settings.height,
        "binned": settings.binning and source.bin_table is not None,
        "pag_scale": float(settings.pag_scale) if settings.pag else None,
        "pag_layers": pag_layers,
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
        filled["pag_scale"],
        filled["pag_layers"],
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
    control=None,
    control_size: dict | None = None,
    control_name: str = "--control",
    controlnet=None,
    control_options: tuple[str, str] = ("--control", "--controlnet"),
    mask=None,
    mask_name: str | None = None,
    masking: MaskSettings = MaskSettings(),
    source_image=None,
) -> DenoisePlan:
    """Every check of a denoise run, once: the seed drawn (when not given), the image count, the embeddings' width
    against the transformer, the schedule and sizes, the conditioning inputs (init latents, a mask, control
    latents) against all of them, perturbed-attention guidance, the ControlNet file and each LoRA against the
    transformer's skeleton.

    ``init``: a ``staged.Latents`` of init latents, or None; ``init_size``: instead of them, the sizes they will be
    encoded for (generate --image: a ``fit_image`` schedule as a dict; ``with_init`` attaches the latents later);
    ``init_name`` names them in errors (a path, or ``--image``); ``embedding_width``: the embeddings' last
    dimension, checked against the transformer's caption_channels. ``control``/``control_size``/``control_name``:
    the same for a ControlNet's control latents (``with_control``); ``controlnet``: the --controlnet value, a
    ``controlnet_file.ControlNetSpec``, checked here and kept in the plan; ``control_options``: the two flags'
    names in errors. Inpainting: ``mask``, a ``staged.Mask`` (a mask file) or an ``image_io.SourceImage`` (a mask
    image, made into the plan's ``mask_request``), named ``mask_name``; ``source_image``: generate's --image, whose
    pixels --keep-unmasked pastes back.
    """
    source.check_fit("transformer")  # its config against its weights, before any skeleton of it is built
    check_mask_options(mask, masking, init is not None or init_size is not None, init_name, mask_name)
    if init is not None:
        init_size = init.meta
    if control is not None:
        control_size = control.meta
    check_controlnet_pair(controlnet, control_size is not None, control_options, settings.step_cache)
    checked = None
    if controlnet is not None:  # the model's family, every key and shape, before any weights load
        from pixart_cli.files.controlnet_file import check_controlnet

        checked = check_controlnet(controlnet, source, control_options[1])
    settings = with_init_size(settings.with_seed(), init_size, init_name)
    settings = with_control_size(settings, control_size, control_name, init_size, init_name)
    settings.check_total(prompts)
    if embedding_width is not None:
        caption_channels = source.config("transformer").get("caption_channels")
        if caption_channels is not None and embedding_width != caption_channels:
            raise bad_file(
                embeddings_name,
                f"embeddings are {embedding_width} wide but {source.id} takes {caption_channels}; "
                "encode with the same model family",
            )
    size_from = init_name if init is not None else control_name if control is not None else None
    planned = schedule(settings, source, size_from=size_from)
    images = prompts * settings.num_images
    if init is not None:
        check_init(init, planned, source, init_name, images)
    if control is not None:
        check_control(control, planned, source, control_name, images)
    check_steps(planned)
    if loras:  # a LoRA that does not fit stops here, before any weights load (and before T5 runs, in generate)
        from pixart_cli.models.lora import check_loras_for_model

        check_loras_for_model(list(loras), source)
    conditioning.check_pag(planned.pag_scale, planned.pag_layers, source)
    seeds = [settings.seed + index for index in range(images)]
    planned_inputs = {"init": init, "control": control, "controlnet": checked}
    if mask is None:
        return DenoisePlan(settings, planned, seeds, **planned_inputs)
    target = dict(init_size) if source_image is None else {**init_size, "source_image": source_image.record()}
    made, request = conditioning.plan_mask(mask, mask_name, masking, planned, source, target, init_name, source_image)
    return DenoisePlan(settings, planned, seeds, **planned_inputs, mask=made, mask_request=request)


def check_steps(plan: Schedule) -> None:
    """At least one step must run: diffusers' int(steps x strength) rounds down."""
    if plan.strength is not None and plan.steps_per_image < 1:
        raise PixartError(
            f"--strength {plan.strength}: with {plan.total_steps} steps, "
            "int(steps x strength) = 0 steps would run; raise --strength or --steps"
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
    control_image=None,
    controlnet=None,
    mask=None,
    mask_name: str | None = None,
    masking: MaskSettings = MaskSettings(),
) -> RunPlan:
    """Every check of a generate run, before T5 loads: prompts, seeds and totals, the image's sizes (image to
    image), the mask against the image (inpainting), the control image's (ControlNet: the generation size, as the
    image's or else as asked), the schedule, the text encoder's width against the transformer, perturbed-attention
    guidance, the ControlNet's and the LoRAs' fit."""
    from pixart_cli.settings import check_prompts

    prompts = check_prompts(prompts)
    for component in ("tokenizer", "text_encoder", "vae"):  # the transformer's in plan_denoise: before T5 loads
        source.check_fit(component)
    width, height, binning = denoising.width, denoising.height, denoising.binning
    sizes = None if image is None else fit_image(image, source, width, height, binning)
    if sizes is not None:  # the control image is sized as the start image is
        width, height = sizes.requested_width, sizes.requested_height
    control_sizes = None if control_image is None else fit_image(control_image, source, width, height, binning)
    denoise_plan = plan_denoise(
        denoising,
        source,
        len(prompts),
        embedding_width=source.config("text_encoder").get("d_model"),
        embeddings_name=f"--model {source.id}",
        init_size=None if sizes is None else dataclasses.asdict(sizes),
        init_name="--image",
        loras=loras,
        control_size=None if control_sizes is None else dataclasses.asdict(control_sizes),
        control_name="--control-image",
        controlnet=controlnet,
        control_options=("--control-image", "--controlnet"),
        mask=mask,
        mask_name=mask_name,
        masking=masking,
        source_image=image,
    )
    return RunPlan(prompts, encoding, denoise_plan, image, sizes, decode_batch_size, control_image, control_sizes)


def plan_encode_mask(mask, image, source: Model, width: int | None, height: int | None, binning: bool, blur: int):
    """encode-mask: the sizes of the image's init latents (as ``fit_image``: the same --width/--height/--no-binning
    as encode-image), the mask checked against the image and for a white area. Returns the ``Schedule`` of sizes."""
    sizes = fit_image(image, source, width, height, binning)
    conditioning.check_grid(mask, image.size, f"--image {image.path}")
    latent = conditioning.mask_image_coverage(mask, image.size, sizes, blur, source.vae_scale_factor)
    conditioning.check_coverage(latent, mask.option, str(mask.path), sizes, mask.pixels)
    return sizes
