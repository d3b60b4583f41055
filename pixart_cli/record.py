"""What made an output, in one record. Every file's metadata is derived from a ``RunRecord``:

- the embeddings file's and the latents file's ``meta`` (``EMBEDDINGS``, ``LATENTS``);
- an image's settings (PNG text chunk, EXIF) and its A1111 ``parameters`` text (``IMAGE``, ``image_metadata``);
- the manifest's identity of an image, which ``--resume`` compares (``IDENTITY``, ``identity``);
- the settings ``compare`` names when two latents files differ (``COMPARED``);
- the key of an embedding-cache entry and what an entry must match (``CACHE_KEY``, ``CACHE_CHECKED``).

A new setting that changes an image is one field here and one line in each mapping it belongs to. Mappings are
(name in the output, field of the record); their order is the order of the keys written. The settings of a
conditioning input or an opt-in guidance join LATENTS, IMAGE and IDENTITY as a group only where they act
(``IMAGE_TO_IMAGE``, ``INPAINTING``, ``PAG``), so that files and manifests without them read as before.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

GENERATOR = "pixart-cli"


@dataclass(frozen=True)
class RunRecord:
    """Every setting that changed an output, with the model's defaults filled in."""

    # the model and the numbers it ran in
    model: str
    revision: str | None = None
    family: str | None = None
    dtype: str | None = None  # fp32, fp16 or bf16, as resolved
    # encode
    prompts: list = field(default_factory=list)  # one per row: in latents, one per image
    negative_prompt: str = ""
    max_sequence_length: int | None = None
    clean_caption: bool | None = None
    text_encoder_precision: str | None = None  # full, 8bit or 4bit
    # denoise
    seeds: list = field(default_factory=list)  # one per image
    steps: int | None = None
    timesteps: list | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None  # diffusers class name
    height: int | None = None  # the size the transformer ran at (binned)
    width: int | None = None
    requested_height: int | None = None  # the size decode restores
    requested_width: int | None = None
    binned: bool | None = None
    plan: str | None = None  # the memory plan: resident or streamed
    compiled: bool | None = None
    step_cache: str | None = None  # only when it skipped work
    loras: list = field(default_factory=list)  # {file, sha256, scale} each
    # image to image
    strength: float | None = None
    steps_run: int | None = None
    source_image: dict | None = None  # {name, sha256} of the image the init latents came from
    # ControlNet
    control: dict | None = None  # {image: {name, sha256} of the edge map (or None), latents_sha256}
    controlnet: dict | None = None  # {file, weights_sha256} of the adapter (controlnet_file's digest)
    controlnet_scale: float | None = None  # the factor of the adapter's skips
    # inpainting
    mask: dict | None = None  # {name, sha256} of the mask image
    mask_blur: int | None = None  # pixels
    keep_unmasked: bool | None = None  # decode pastes the source pixels back outside the mask
    # perturbed-attention guidance
    pag_scale: float | None = None
    pag_layers: list | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> RunRecord:
        """The record a validated file's meta holds (fields it lacks stay unknown: None)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in meta.items() if key in names})

    def replace(self, **changes) -> RunRecord:
        return dataclasses.replace(self, **changes)

    @property
    def image_to_image(self) -> bool:
        return self.strength is not None

    @property
    def controlled(self) -> bool:
        return self.controlnet is not None

    @property
    def inpainting(self) -> bool:
        return self.mask is not None

    @property
    def pag(self) -> bool:
        return self.pag_scale is not None

    def groups(self) -> dict:
        """The groups that act in this record (their settings are written)."""
        acting = {"image_to_image": IMAGE_TO_IMAGE, "inpainting": INPAINTING, "pag": PAG, "controlled": CONTROLNET}
        return {name: group for name, group in acting.items() if getattr(self, name)}


def _pairs(*names) -> tuple:
    return tuple(name if isinstance(name, tuple) else (name, name) for name in names)


EMBEDDINGS = _pairs(
    "model",
    "revision",
    "family",
    "dtype",
    "prompts",
    "negative_prompt",
    "max_sequence_length",
    "clean_caption",
    "text_encoder_precision",
)
LATENTS = _pairs(
    "model",
    "revision",
    "family",
    "dtype",
    "prompts",
    "negative_prompt",
    "seeds",
    "steps",
    "timesteps",
    "guidance_scale",
    "scheduler",
    "height",
    "width",
    "requested_height",
    "requested_width",
    "binned",
    "plan",
    "compiled",
    "step_cache",
    "clean_caption",
    "max_sequence_length",
    "text_encoder_precision",
    "loras",
)
IMAGE_TO_IMAGE = _pairs("strength", "steps_run", "source_image")  # in latents and images, for image to image only
# In latents, images and the --resume identity, for ControlNet runs only (so that files and manifests of runs
# without one stay as they were)
CONTROLNET = _pairs("control", "controlnet", "controlnet_scale")
INPAINTING = _pairs("mask", "mask_blur", "keep_unmasked")  # image to image with a mask
PAG = _pairs("pag_scale", "pag_layers")  # perturbed-attention guidance
IMAGE = _pairs(
    "model",
    "revision",
    "family",
    "negative_prompt",
    "steps",
    "timesteps",
    "guidance_scale",
    "scheduler",
    "dtype",
    "clean_caption",
    "max_sequence_length",
    "text_encoder_precision",
    "binned",
    "loras",
    "step_cache",
    "compiled",
)
# image i's own values, after the shared ones
IMAGE_SIZES = _pairs(("width", "requested_width"), ("height", "requested_height"))
IMAGE_DENOISED_SIZES = _pairs(("denoise_width", "width"), ("denoise_height", "height"))
# What --resume compares with a manifest line; --dtype as given (auto depends on each process's device)
IDENTITY = _pairs(
    "model",
    "revision",
    "loras",
    "steps",
    "timesteps",
    "guidance_scale",
    ("width", "requested_width"),
    ("height", "requested_height"),
    ("binning", "binned"),
    "scheduler",
    "step_cache",
    ("compile", "compiled"),
    "dtype",
    "max_sequence_length",
    "clean_caption",
    ("precision", "text_encoder_precision"),
)
# Latents settings that change the result: compare names each that differs between two files
COMPARED = (
    "steps",
    "timesteps",
    "guidance_scale",
    "scheduler",
    "dtype",
    "text_encoder_precision",
    "clean_caption",
    "max_sequence_length",
    "negative_prompt",
    "step_cache",
    "compiled",
    "loras",
    "strength",
    "source_image",
    "control",
    "controlnet",
    "controlnet_scale",
    "mask",
    "mask_blur",
    "keep_unmasked",
    "pag_scale",
    "pag_layers",
    "seeds",
)
# An embedding-cache entry: its key (with the text encoder's config beside it) and what an entry file must match
CACHE_KEY = _pairs(
    "model",
    "revision",
    "negative_prompt",
    "max_sequence_length",
    "clean_caption",
    "dtype",
    ("precision", "text_encoder_precision"),
)
CACHE_CHECKED = _pairs(
    "model", "dtype", "max_sequence_length", "negative_prompt", "clean_caption", "text_encoder_precision"
)


def derive(record: RunRecord, mapping: tuple) -> dict:
    """The mapping's keys with the record's values, in the mapping's order."""
    return {name: getattr(record, source) for name, source in mapping}


def embeddings_meta(record: RunRecord) -> dict:
    return derive(record, EMBEDDINGS)


def _acting(record: RunRecord) -> dict:
    return {name: value for group in record.groups().values() for name, value in derive(record, group).items()}


def latents_meta(record: RunRecord) -> dict:
    return {**derive(record, LATENTS), **_acting(record)}


def identity(record: RunRecord, dtype_word: str) -> dict:
    """The manifest's ``options`` of an image: the settings --resume requires to be the same now."""
    return {**derive(record, IDENTITY), **_acting(record), "dtype": dtype_word}


def cache_key(record: RunRecord, text_encoder_config: dict) -> dict:
    return {**derive(record, CACHE_KEY), "text_encoder": text_encoder_config}


def image_metadata(record: RunRecord, index: int) -> tuple[str, dict]:
    """(A1111 "parameters" text, JSON settings) for image ``index`` of a run."""
    settings = {**derive(record, IMAGE), **_acting(record)}
    settings.update(
        prompt=record.prompts[index],
        seed=record.seeds[index],
        **derive(record, IMAGE_SIZES),
        **derive(record, IMAGE_DENOISED_SIZES),
        generator=GENERATOR,
    )
    from pixart_cli.settings import sampler_name

    sampler = sampler_name(str(record.scheduler))
    parameters = (
        f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n"
        f"Steps: {settings['steps']}, Sampler: {sampler}, CFG scale: {settings['guidance_scale']}, "
        f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
        f"Model: {settings['model']}"
    )
    if record.image_to_image:  # as A1111 writes it
        parameters += f", Denoising strength: {settings['strength']}"
    if record.controlled:  # as A1111's ControlNet extension writes it
        adapter = record.controlnet
        parameters += (
            f', ControlNet 0: "Model: {adapter.get("file")} [{str(adapter.get("weights_sha256"))[:10]}], '
            f'Weight: {record.controlnet_scale}"'
        )
    if record.inpainting:  # as A1111 writes it
        parameters += f", Mask blur: {record.mask_blur}"
    if record.pag:
        parameters += f", PAG scale: {record.pag_scale:g}"
    if record.step_cache is not None:  # approximate: a reader must know the image is not the exact one
        parameters += f", Step cache: {record.step_cache}"
    if record.text_encoder_precision not in (None, "full"):  # a quantized T5 gives other embeddings
        parameters += f", Text encoder: {record.text_encoder_precision}"
    return parameters, settings


def source_image_of(init_meta: dict, key: str = "source_image") -> dict | None:
    """What the outputs record of the image that init (or control, ``key`` "control_image") latents came from: its
    {name, sha256}, when the file (untrusted) holds exactly such a record of short strings; else None."""
    recorded = init_meta.get(key)
    fields = ("name", "sha256")
    if (
        isinstance(recorded, dict)
        and set(recorded) == set(fields)
        and all(isinstance(recorded[key], str) and len(recorded[key]) <= 1024 for key in fields)
    ):
        return {key: recorded[key] for key in fields}
    return None


# --- building one ---------------------------------------------------------------------------------------------
def for_encode(source, dtype: str, prompts: list[str], encoding, max_sequence_length: int) -> RunRecord:
    """The record of an encode run (``encoding``: settings.EncodeSettings; ``source``: models.source.Model)."""
    return RunRecord(
        model=source.recorded,
        revision=source.revision,
        family=source.family.name,
        dtype=dtype,
        prompts=list(prompts),
        negative_prompt=encoding.negative_prompt,
        max_sequence_length=max_sequence_length,
        clean_caption=encoding.clean_caption,
        text_encoder_precision=encoding.precision,
    )


def for_denoise(
    encoded: RunRecord,
    source,
    dtype: str,
    num_images: int,
    filled: dict,
    seeds: list[int],
    *,
    compiled: bool,
    step_cache: str | None,
    loras: list[dict],
    memory_plan: str | None = None,
    source_image: dict | None = None,
    control: dict | None = None,
    controlnet: dict | None = None,
    controlnet_scale: float | None = None,
    inpainting: dict | None = None,
) -> RunRecord:
    """The record of a denoise run from its embeddings' record. ``filled``: the schedule's values
    (``dataclasses.asdict(plan.Schedule)``, or ``plan.resolved`` where no size is binned yet); ``step_cache``: the
    one that acts (``step_cache.acting``); ``inpainting``: {mask, mask_blur, keep_unmasked} (``inpainting_of``)."""
    strength = filled.get("strength")
    steps_run = None
    if strength is not None:
        from pixart_cli.plan import steps_to_run

        steps_run = steps_to_run(len(filled["timesteps"]) if filled["timesteps"] else filled["steps"], strength)
    return encoded.replace(
        model=source.recorded,
        revision=source.revision,
        family=source.family.name,
        dtype=dtype,
        prompts=[prompt for prompt in encoded.prompts for _ in range(num_images)],
        seeds=list(seeds),
        steps=filled["steps"],
        timesteps=filled["timesteps"],
        guidance_scale=filled["guidance_scale"],
        scheduler=filled["scheduler"],
        height=filled.get("height"),
        width=filled.get("width"),
        requested_height=filled["requested_height"],
        requested_width=filled["requested_width"],
        binned=filled["binned"],
        plan=memory_plan,
        compiled=compiled,
        step_cache=step_cache,
        loras=loras,
        strength=strength,
        steps_run=steps_run,
        source_image=source_image if strength is not None else None,
        control=control,
        controlnet=controlnet,
        controlnet_scale=controlnet_scale,
        pag_scale=filled.get("pag_scale"),
        pag_layers=filled.get("pag_layers"),
        **({} if inpainting is None else inpainting),
    )


def inpainting_of(mask) -> dict:
    """What the outputs record of an inpainting mask (a ``staged.Mask``): the mask image's {name, sha256}, the
    blur and whether decode pastes the source back."""
    return {"mask": mask.meta["mask"], "mask_blur": mask.meta["mask_blur"], "keep_unmasked": mask.keeps_unmasked}
