"""The checks of denoise's conditioning inputs, made once by plan.py before any model loads: image to image's init
latents, ControlNet's control latents, an inpainting mask (a mask image, or a mask file from `pixart encode-mask`)
against the run it joins, perturbed-attention guidance against the model, and decode's latents against the VAE. Init and control latents were each
encoded for a size (``requested_width``/``requested_height`` in their meta, binned or not): the run takes that size
unless --width/--height say otherwise, which is an error, and the two must agree. Configs and data only; nothing
here imports plan.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pixart_cli.errors import PixartError, bad_file
from pixart_cli.models.source import FAMILIES
from pixart_cli.settings import DEFAULT_STRENGTH, DenoiseSettings, MaskSettings


# --- image to image ------------------------------------------------------------------------------------------------
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
    settings = _take_size(settings, init_meta, "the image", "the image")
    return dataclasses.replace(settings, strength=DEFAULT_STRENGTH if settings.strength is None else settings.strength)


def _take_size(settings: DenoiseSettings, meta: dict, encoded: str, again: str) -> DenoiseSettings:
    """The settings with the size latents were encoded for (``meta``'s requested size and binning); a
    --width/--height that differs is an error naming what was ``encoded`` and what to encode ``again``."""
    requested = (meta["requested_width"], meta["requested_height"])
    differing = [
        f"{flag} {value}"
        for flag, value, size in (
            ("--width", settings.width, requested[0]),
            ("--height", settings.height, requested[1]),
        )
        if value is not None and value != size
    ]
    if differing:
        raise PixartError(
            f"{' '.join(differing)}: {encoded} was encoded for {requested[0]}x{requested[1]}; leave "
            f"{'it' if len(differing) == 1 else 'them'} out, or encode {again} again at that size"
        )
    return dataclasses.replace(
        settings,
        width=requested[0],
        height=requested[1],
        binning=settings.binning and bool(meta.get("binned", True)),
    )


def check_init(init, plan, source, path: str, images: int) -> None:
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


# --- ControlNet ---------------------------------------------------------------------------------------------------
def with_control_size(
    settings: DenoiseSettings,
    control_meta: dict | None,
    name: str,
    init_meta: dict | None = None,
    init_name: str = "--init-latents",
) -> DenoiseSettings:
    """The run's settings with the size the control latents were encoded for (as ``with_init_size``). With init
    latents too, both must have been encoded for one size (``with_init_size`` has set it already)."""
    if control_meta is None:
        return settings
    requested = (control_meta["requested_width"], control_meta["requested_height"])
    if init_meta is not None:
        init_requested = (init_meta["requested_width"], init_meta["requested_height"])
        if init_requested != requested:
            raise bad_file(
                name,
                f"the control image was encoded for {requested[0]}x{requested[1]} but the init image ({init_name}) "
                f"for {init_requested[0]}x{init_requested[1]}; encode the control image again with --width "
                f"{init_requested[0]} --height {init_requested[1]}",
            )
    return _take_size(settings, control_meta, f"the control image ({name})", "the control image")


def check_control(control, plan, source, path: str, images: int) -> None:
    """The control latents must suit this transformer and VAE (α's: the adapter works on its latents), this run's
    size and its image count. Configs only."""
    latents, meta = control.latents, control.meta
    channels = source.config("transformer").get("in_channels", 4)
    if latents.shape[1] != channels:
        raise bad_file(
            path,
            f"control latents have {latents.shape[1]} channels but the transformer of {source.id} takes {channels}; "
            "encode the control image with the same model",
        )
    recorded, expected = meta.get("vae_scaling_factor"), source.config("vae").get("scaling_factor")
    if isinstance(recorded, float) and isinstance(expected, float) and abs(recorded - expected) > 1e-6:
        raise bad_file(
            path,
            f"control latents come from another VAE (scaling factor {recorded:g}; {source.id}'s is {expected:g}); "
            "encode the control image with the same model",
        )
    scale = source.vae_scale_factor
    size = (latents.shape[3] * scale, latents.shape[2] * scale)
    if size != (plan.width, plan.height):
        raise bad_file(
            path,
            f"control latents are {size[0]}x{size[1]} but this run denoises at {plan.width}x{plan.height}; encode "
            "the control image with the same model and --width/--height/--no-binning",
        )
    if latents.shape[0] not in (1, images):
        raise bad_file(
            path,
            f"holds {latents.shape[0]} control latents for {images} images; give one (it steers every image) or "
            "one per image",
        )


def check_controlnet_pair(controlnet, has_control: bool, options: tuple[str, str], step_cache: str | None) -> None:
    """A ControlNet needs its condition and the condition its ControlNet (``options``: the two flags' names, e.g.
    ("--control", "--controlnet")); a step cache skips the blocks the adapter feeds, so it is refused with one."""
    control_option, controlnet_option = options
    if controlnet is not None and not has_control:
        made = " (an edge map encoded by `pixart encode-control`)" if control_option == "--control" else ""
        raise PixartError(
            f"{controlnet_option} {controlnet.path}: needs a control image; give {control_option} FILE too{made}"
        )
    if controlnet is None and has_control:
        raise PixartError(f"{control_option}: a control image steers a ControlNet; give {controlnet_option} FILE too")
    if controlnet is not None and step_cache is not None:
        raise PixartError(
            f"--step-cache {step_cache}: not with {controlnet_option} (the cache skips the transformer blocks the "
            "adapter adds to); leave one out"
        )


# --- inpainting ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskRequest:
    """A mask image checked for a run, to be made into its mask (``stages.encode_mask``; it loads no model):
    the image (mode L), its blur, the grid it is scaled to (the source image's size), and the source image whose
    pixels decode pastes back (--keep-unmasked; None: nothing is pasted)."""

    image: Any  # image_io.SourceImage
    blur: int
    grid: tuple[int, int]
    source: Any = None


def plan_mask(
    mask,
    name: str,
    masking: MaskSettings,
    planned,
    source,
    target: dict,
    target_name: str,
    source_image,
) -> tuple:
    """(the mask, None) for a mask file, checked against the init latents (``target``: their meta); (None, its
    ``MaskRequest``) for a mask image, checked against their source image's size and for a white area."""
    from pixart_cli.files import staged

    scale = source.vae_scale_factor
    if isinstance(mask, staged.Mask):
        latent_shape = (planned.height // scale, planned.width // scale)
        check_mask_file(mask, target, latent_shape, name, target_name, masking)
        return (mask if masking.keep else mask.without_overlay()), None
    grid = source_image.size if source_image is not None else source_size(target)
    check_grid(mask, grid, target_name if source_image is None else f"--image {source_image.path}")
    if masking.keep and source_image is None:
        refuse_keep_without_pixels(name, target_name)
    latent = mask_image_coverage(mask, grid, planned, masking.blur_px, scale)
    check_coverage(latent, mask.option, name, planned, mask.pixels)
    return None, MaskRequest(mask, masking.blur_px, tuple(grid), source_image if masking.keep else None)


def source_size(init_meta: dict) -> tuple[int, int]:
    """The source image's (width, height) that init latents record (encode-image), else their requested size."""
    recorded = init_meta.get("source_size")
    if (
        isinstance(recorded, list)
        and len(recorded) == 2
        and all(isinstance(side, int) and not isinstance(side, bool) and 1 <= side <= 65536 for side in recorded)
    ):
        return recorded[0], recorded[1]
    return init_meta["requested_width"], init_meta["requested_height"]


def check_mask_options(mask, masking: MaskSettings, has_init: bool, init_option: str, mask_name: str) -> None:
    """A mask needs an image to repaint; the mask's options need a mask."""
    if mask is None:
        if masking.given:
            raise PixartError(f"{' '.join(masking.given)}: only for inpainting; give --mask MASK too")
        return
    if not has_init:
        raise PixartError(
            f"--mask {mask_name}: inpainting repaints part of an image; give {init_option} FILE too (the image the "
            "mask was drawn on)"
        )


def check_grid(mask, grid: tuple[int, int], grid_name: str) -> None:
    """A mask image is scaled to the source image's size (``grid``): it must have that image's aspect ratio (within
    a pixel), or its white area would land elsewhere."""
    width, height = mask.size
    if abs(width * grid[1] - height * grid[0]) >= max(width, grid[0]):
        raise PixartError(
            option=mask.option,
            value=mask.path,
            reason=f"it is {width}x{height}, which does not scale to {grid_name}'s {grid[0]}x{grid[1]} (another "
            "aspect ratio)",
            fix=f"give a mask of {grid[0]}x{grid[1]} pixels (or a scaled copy: white repaints, black keeps)",
        )


def check_coverage(latent_mask, option: str, name: str, sizes, pixels=None) -> None:
    """An all-black mask (nothing to repaint) is refused, as is one whose white area no latent pixel takes up; an
    all-white one repaints everything, as image to image does, and is allowed. ``pixels``: the mask image (PIL)."""
    if bool(latent_mask.any()):
        return
    black = pixels is None or pixels.getextrema()[1] == 0
    reason = (
        "it is all black: there is nothing to repaint (white repaints, black keeps)"
        if black
        else f"its white area is too small or thin to cover one 8x8 block of the {sizes.width}x{sizes.height} the "
        "transformer runs at (after scaling and --mask-blur), so nothing would be repainted"
    )
    raise PixartError(
        option=option,
        value=name,
        reason=reason,
        fix="paint the area to repaint white (to repaint the whole image, leave out --mask: image to image)"
        if black
        else "paint a larger area white",
    )


def mask_image_coverage(mask, grid: tuple[int, int], sizes, blur: int, scale: int):
    """The latent mask a mask image gives (``models/masking.py``), for checking before the run."""
    from pixart_cli.models import masking

    return masking.latent_mask(masking.on_grid(mask.pixels, grid, blur), sizes.width, sizes.height, scale)


def check_mask_file(mask, target: dict, latent_shape, path: str, target_name: str, masking: MaskSettings) -> None:
    """A mask file (``staged.Mask``) against the init latents it masks: made for the same sizes and source image,
    with a white area, and with the pixels --keep-unmasked pastes back when it is on. ``target``: the init
    latents' meta (or, in generate, the image's sizes and record)."""
    if masking.blur is not None:
        raise PixartError(
            f"--mask-blur {masking.blur}: {path} was made with --mask-blur {mask.meta['mask_blur']} by encode-mask; "
            "leave it out, or make the mask file again"
        )
    meta = mask.meta
    keys = ("width", "height", "requested_width", "requested_height")
    if any(meta[key] != target.get(key) for key in keys) or list(mask.mask.shape[2:]) != list(latent_shape):
        raise bad_file(
            path,
            f"the mask is for {meta['requested_width']}x{meta['requested_height']} (run at {meta['width']}x"
            f"{meta['height']}), but {target_name} is for {target.get('requested_width')}x"
            f"{target.get('requested_height')} (run at {target.get('width')}x{target.get('height')}); make the "
            "mask with the same model, --width/--height and --no-binning as the image",
        )
    made_for, encoded = _sha256(meta.get("source_image")), _sha256(target.get("source_image"))
    if made_for is not None and encoded is not None and made_for != encoded:
        raise bad_file(
            path,
            f"the mask was made for the image {_name(meta)} (sha256 {made_for[:12]}…), but {target_name} comes from "
            f"{_name(target)} (sha256 {encoded[:12]}…); make both from the same image",
        )
    if masking.keep and not mask.keeps_unmasked:
        raise bad_file(
            path,
            "holds no source pixels for --keep-unmasked to paste back; make it with `pixart encode-mask MASK "
            "--image IMG`, or pass --no-keep-unmasked",
        )
    check_coverage(mask.mask, "--mask", path, _Sizes(meta["width"], meta["height"]))


def refuse_keep_without_pixels(mask_name: str, init_name: str) -> None:
    """denoise --mask IMAGE: init latents hold no pixels to paste back."""
    raise PixartError(
        f"--mask {mask_name}: --keep-unmasked (the default) pastes the source image's pixels back after decode, and "
        f"{init_name} holds only latents; make a mask file with `pixart encode-mask {mask_name} --image IMG` and "
        "give that, or pass --no-keep-unmasked"
    )


class _Sizes:
    def __init__(self, width: int, height: int):
        self.width, self.height = width, height


def _sha256(record) -> str | None:
    return record.get("sha256") if isinstance(record, dict) and isinstance(record.get("sha256"), str) else None


def _name(meta: dict) -> str:
    record = meta.get("source_image")
    return str(record.get("name")) if isinstance(record, dict) else "(unknown)"


# --- perturbed-attention guidance -------------------------------------------------------------------------------
def check_pag(pag_scale: float | None, pag_layers, source) -> None:
    """PAG follows PixArtSigmaPAGPipeline: PixArt-Σ models only, and every --pag-layers entry must name a
    self-attention layer of the transformer (checked on its skeleton on the meta device). ``pag_scale`` None: off;
    ``pag_layers``: resolved (the user's, else diffusers' default)."""
    if pag_scale is None:
        return
    from pixart_cli.models import pag

    family = source.family.name
    if family not in pag.FAMILIES:
        why = {
            "alpha": "diffusers has no PAG pipeline for PixArt-α",
            "lcm": "this is PixArt-LCM, a distilled PixArt-α run without guidance, which diffusers' PAG does not cover",
            "dmd": "this is PixArt-DMD, a one-step distilled PixArt-α, which diffusers' PAG does not cover",
        }.get(family, f"its family is {family}")
        raise PixartError(
            option="--pag-scale",
            value=pag_scale,
            reason=f"perturbed-attention guidance follows diffusers' PixArtSigmaPAGPipeline, for PixArt-Σ models "
            f"only, and {source.id} is not one ({why})",
            fix="use a PixArt-Σ model, or leave out --pag-scale",
        )
    import torch

    from pixart_cli.models import memory
    from pixart_cli.models.facade import import_diffusers

    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d"
    ).PixArtTransformer2DModel
    skeleton = memory.meta_model(
        PixArtTransformer2DModel.from_config, source.config("transformer"), torch.float32, cpu_buffers=True
    )
    pag.check_layers(skeleton, pag_layers, source.id)


# --- decode -------------------------------------------------------------------------------------------------------
def check_latents(latents, source, path: str, batch_size: int | None = None) -> None:
    """Latents (a ``staged.Latents``) must match this VAE's channels and scale; checked on its config before the
    weights load. ``batch_size``: decode's --batch-size."""
    if batch_size is not None and batch_size < 1:
        raise PixartError(f"--batch-size {batch_size}: must be at least 1")
    channels = source.config("vae").get("latent_channels", 4)
    found = latents.latents.shape[1]
    if found != channels:
        raise bad_file(path, f"latents have {found} channels but the VAE of {source.id} takes {channels}")
    made_by = FAMILIES.get(latents.meta.get("family"))
    if made_by is not None and made_by.pipeline != source.family.pipeline:
        # Σ's latents are its VAE's (SDXL's), α's, LCM's and DMD's the SD VAE's: another VAE decodes them to noise
        raise bad_file(
            path,
            f"latents come from a PixArt-{made_by.name} model, whose VAE is not the one of {source.id} "
            f"({source.family.name}); decode them with the model that made them (without --model, decode uses the "
            "one the file names)",
        )
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
