"""The checks of denoise's conditioning inputs, made once by plan.py before any model loads: init latents (image to
image), an inpainting mask (a mask image, or a mask file from `pixart encode-mask`) against the run it joins, and
perturbed-attention guidance against the model. Configs and data only; nothing here imports plan.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pixart_cli.errors import PixartError, bad_file
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
