"""Image to image, staged like the rest: an image becomes init latents (the VAE encoder only), and denoise starts
from them part-way through the schedule.

It follows diffusers' img2img pipelines (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline, 0.42):
1. latents = ``retrieve_latents(vae.encode(image), generator)`` (sample_mode "sample") x ``vae.config.scaling_factor``,
   the image first resized and center-cropped to the size the transformer runs at (VaeImageProcessor, "crop");
2. ``get_timesteps``: init_timestep = min(int(steps * strength), steps), t_start = max(steps - init_timestep, 0),
   timesteps = scheduler.timesteps[t_start * order:], and scheduler.set_begin_index(t_start * order);
3. ``prepare_latents``: noise = randn_tensor(shape, generator), latents = scheduler.add_noise(init, noise,
   timesteps[:1]); no multiplication by init_noise_sigma, as add_noise puts them at that timestep's noise level;
4. the usual loop over the remaining timesteps (steps 2 to 4: ``models.sampling.start_from`` and ``sample_latents``).

Two choices of ours, because the stages run apart:
- The VAE's posterior is sampled, as diffusers does, from a CPU generator seeded ``SAMPLE_SEED``: an image always
  encodes to the same latents, on any device. (The posterior's spread is tiny; the image's identity matters.)
- The noise of step 3 is the txt2img noise of the same seed: image i gets seed + i, from a CPU generator.
"""

from __future__ import annotations

from pixart_cli.files import image_io, staged
from pixart_cli.plan import Schedule
from pixart_cli.runtime import RunContext, check_finite

SAMPLE_SEED = 0  # the VAE posterior's sample (see the module's notes)


def encode_image(image: image_io.SourceImage, sizes: Schedule, ctx: RunContext) -> staged.Latents:
    """An image -> init latents [1, C, H/8, W/8] at the size the transformer will run at (``sizes``, from
    ``plan.fit_image``). Loads only the VAE, and keeps only its encoder on the device."""
    from pixart_cli.models.vae import encode_pixels

    # 1-2. Full or tiled for the budget, the VAE's encoder only; the image resized and center-cropped to the binned
    #      size, as diffusers' image processor does, then encoded
    latents, scaling_factor = encode_pixels(image.pixels, sizes, ctx, "encode-image", SAMPLE_SEED)
    check_finite(latents, ctx.dtype_name)

    # 3. What denoise checks the latents against, and what the outputs record about their source
    meta = staged.encoded_image_meta(ctx.model, ctx.dtype_name, sizes, scaling_factor, SAMPLE_SEED)
    # source_size [width, height]: the grid an inpainting mask is scaled to (encode_mask)
    return staged.Latents(latents, {**meta, "source_image": image.record(), "source_size": list(image.size)})
