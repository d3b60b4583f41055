"""ControlNet's condition, staged like the rest: an edge map becomes control latents (the VAE encoder only), which
denoise feeds to the adapter (``--control``).

The condition is what PixArt's app_controlnet.py and diffusers' research pipeline (examples/research_projects/pixart)
make: the control image (an edge map, HED in the published training) scaled to [-1, 1], encoded by the VAE,
``latent_dist.sample()`` times the scaling factor. The image is sized as encode-image sizes a start image (the
requested size, binned as the transformer runs it; resized and center-cropped), so the two line up with each other
and with the image decode makes; the posterior is sampled from a CPU generator seeded ``SAMPLE_SEED``, so an edge
map always encodes to the same latents, on any device.
"""

from __future__ import annotations

from pixart_cli.files import image_io, staged
from pixart_cli.plan import Schedule
from pixart_cli.runtime import RunContext, check_finite

SAMPLE_SEED = 0


def encode_control(image: image_io.SourceImage, sizes: Schedule, ctx: RunContext) -> staged.ControlLatents:
    """An edge map -> control latents [1, C, H/8, W/8] at the size the transformer will run at (``sizes``, from
    ``plan.fit_image``). Loads only the VAE's encoder."""
    from pixart_cli.models.vae import encode_pixels

    latents, scaling_factor = encode_pixels(image.pixels, sizes, ctx, "encode-control", SAMPLE_SEED)
    check_finite(latents, ctx.dtype_name)
    meta = staged.encoded_image_meta(ctx.model, ctx.dtype_name, sizes, scaling_factor, SAMPLE_SEED)
    return staged.ControlLatents(latents, {**meta, "control_image": image.record()})
