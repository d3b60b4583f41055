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

import dataclasses

from pixart_cli.files import image_io, staged
from pixart_cli.models import memory
from pixart_cli.models.source import config_where
from pixart_cli.plan import Schedule
from pixart_cli.runtime import RunContext, check_finite

SAMPLE_SEED = 0  # the VAE posterior's sample (see the module's notes)


def encode_image(image: image_io.SourceImage, sizes: Schedule, ctx: RunContext) -> staged.Latents:
    """An image -> init latents [1, C, H/8, W/8] at the size the transformer will run at (``sizes``, from
    ``plan.fit_image``). Loads only the VAE, and keeps only its encoder on the device."""
    import torch

    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.vae import encoder_skeleton, load_vae_half

    PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor

    source = ctx.model

    # 1. Full or tiled for the budget (the decoder's estimate: the encoder's activations are no larger), then the
    #    VAE's encoder only
    meter = ctx.meter("encode-image")
    budget, context = ctx.budget()
    source.check_fit("vae")  # the config agrees with the weights before a skeleton of it is built
    config = source.config("vae")
    skeleton = memory.meta_model(encoder_skeleton, config, ctx.dtype, where=config_where(source, "vae"))
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

    # 2. Resize and center-crop to the binned size, as diffusers' image processor does, then encode
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
    check_finite(latents, ctx.dtype_name)

    # 3. What denoise checks the latents against, and what the outputs record about their source
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
    return staged.Latents(latents, meta)
