"""Inpainting's mask, staged like the rest: a mask image (white repaints, black keeps) becomes the latent mask that
denoise keeps the known region with, and, with the source image, what decode pastes back outside it
(--keep-unmasked). No model loads: the sizes come from the plan (the model's configs), the pixel work follows
diffusers' mask processor (``models/masking.py``).

A mask file holds the source image's pixels at the size decode restores, so that a staged decode (another
process, maybe another machine) can paste them back without the image: the latents denoise writes from it carry
them on (``staged.Latents.overlay_*``), recorded by the mask's and the image's sha256.
"""

from __future__ import annotations

from pixart_cli.files import image_io, staged
from pixart_cli.models import masking
from pixart_cli.plan import Schedule
from pixart_cli.runtime import RunContext


def encode_mask(
    mask: image_io.SourceImage,
    sizes: Schedule,
    blur: int,
    ctx: RunContext,
    image: image_io.SourceImage | None = None,
    grid: tuple[int, int] | None = None,
) -> staged.Mask:
    """A mask image (mode L) -> a ``staged.Mask`` for init latents of ``sizes`` (``plan.fit_image``'s, or the init
    latents' own). ``image``: the source image (its size is the mask's grid, and its pixels the overlay); without
    it, ``grid`` (width, height) is the size the source image had and nothing is pasted back."""
    source = ctx.model
    grid = image.size if image is not None else grid
    prepared = masking.on_grid(mask.pixels, grid, blur)
    latent = masking.latent_mask(prepared, sizes.width, sizes.height, source.vae_scale_factor)
    overlay_mask = overlay_image = None
    if image is not None:
        overlay_mask, overlay_image = masking.overlay(
            prepared, image.pixels, sizes.requested_width, sizes.requested_height
        )
    coverage = float(latent.mean())
    ctx.note(f"encode-mask: repaints {coverage:.0%} of the image{describe_coverage(coverage)}")
    meta = {
        "model": source.recorded,
        "revision": source.revision,
        "family": source.family.name,
        "dtype": "fp32",
        "height": sizes.height,
        "width": sizes.width,
        "requested_height": sizes.requested_height,
        "requested_width": sizes.requested_width,
        "binned": sizes.binned,
        "source_size": list(grid),
        "mask": mask.record(),
        "mask_blur": blur,
        "source_image": None if image is None else image.record(),
        "coverage": coverage,
    }
    return staged.Mask(latent, meta, overlay_image, overlay_mask)


def describe_coverage(coverage: float) -> str:
    return " (all white: the same as image to image)" if coverage == 1 else ""
