"""An inpainting mask image -> the latent mask denoise keeps the known region with, and the overlay decode pastes
the source pixels back with, following diffusers' VaeImageProcessor (0.42) and StableDiffusionInpaintPipeline:

1. the mask in grayscale (any mode converted; white = repaint), scaled to the source image's size (its "grid":
   the mask must have the image's aspect ratio; plan.py checks that);
2. ``--mask-blur PX``: ``VaeImageProcessor.blur`` (a Gaussian blur of that radius) on the grid;
3. the latent mask: the pipeline's ``mask_processor`` (``do_normalize=False, do_binarize=True,
   do_convert_grayscale=True``) ``preprocess`` at the size the transformer runs at, resized and center-cropped as
   the image is (``resize_mode="crop"``), binarized at 0.5, then ``prepare_mask_latents``' nearest interpolation to
   the latent size: 1 repaints, 0 keeps;
4. the overlay (``--keep-unmasked``): the blurred mask and the source image, each resized and center-cropped to the
   size decode restores, for ``VaeImageProcessor.apply_overlay`` (the source pasted where the mask is black, so
   those pixels are exactly the source's; the blur softens the seam, as A1111's mask blur does).
"""

from __future__ import annotations


def mask_processor(scale: int):
    from pixart_cli.models.facade import import_diffusers

    VaeImageProcessor = import_diffusers("diffusers.image_processor").VaeImageProcessor
    return VaeImageProcessor(vae_scale_factor=scale, do_normalize=False, do_binarize=True, do_convert_grayscale=True)


def on_grid(mask, grid: tuple[int, int], blur: int):
    """Steps 1-2: the mask (PIL, mode L) at ``grid`` (width, height), blurred by ``blur`` pixels."""
    processor = mask_processor(8)
    if mask.size != tuple(grid):
        mask = processor.resize(mask, height=grid[1], width=grid[0])  # lanczos, as the processor's "default" mode
    if blur > 0:
        mask = processor.blur(mask, blur)
    return mask


def latent_mask(mask, width: int, height: int, scale: int):
    """Step 3: [1, 1, height / scale, width / scale] float32, 0 or 1, from the mask on its grid."""
    import torch

    condition = mask_processor(scale).preprocess(mask, height=height, width=width, resize_mode="crop")
    return torch.nn.functional.interpolate(condition, size=(height // scale, width // scale)).to(torch.float32)


def overlay(mask, image, width: int, height: int):
    """Step 4: (mask [1, 1, H, W] uint8, image [1, 3, H, W] uint8) at the requested ``width`` x ``height``."""
    import numpy as np
    import torch

    processor = mask_processor(8)
    pixels = processor.resize(image, height=height, width=width, resize_mode="crop").convert("RGB")
    alpha = processor.resize(mask, height=height, width=width, resize_mode="crop").convert("L")
    return (
        torch.from_numpy(np.array(alpha, dtype=np.uint8))[None, None],
        torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1)[None].contiguous(),
    )


def paste(images: list, mask, image) -> list:
    """``VaeImageProcessor.apply_overlay`` of the source (``image`` [1, 3, H, W] uint8) outside the mask (``mask``
    [1, 1, H, W] uint8) onto each decoded PIL image of that size."""
    from PIL import Image

    processor = mask_processor(8)
    alpha = Image.fromarray(mask[0, 0].numpy(), "L")
    source = Image.fromarray(image[0].permute(1, 2, 0).numpy(), "RGB")
    return [processor.apply_overlay(alpha, source, decoded) for decoded in images]
