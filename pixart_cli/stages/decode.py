"""Stage 3: latents -> images. Loads only the VAE. Latents inpainted with --keep-unmasked carry the source image and
the mask, and get the source's pixels pasted back outside the mask (``models.masking.paste``)."""

from __future__ import annotations

from pixart_cli.files import staged
from pixart_cli.models import memory
from pixart_cli.models.source import config_where
from pixart_cli.runtime import RunContext, check_finite


def decode(latents: staged.Latents, ctx: RunContext, batch_size: int | None = None) -> list:
    """Decode latents [N, 4, h, w] to N PIL images at the requested size (binning undone, as the pipeline does).
    The latents were checked against the VAE (``conditioning.check_latents``) or made by this run's denoise."""
    import torch

    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.vae import decoder_skeleton, load_vae_half

    PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor

    meta = latents.meta
    source = ctx.model
    check_finite(latents.latents, meta.get("dtype", ctx.dtype_name))

    # 1. Pick full or tiled decode for the budget, then load the VAE only
    meter = ctx.meter("decode")
    budget, context = ctx.budget()
    source.check_fit("vae")  # the config agrees with the weights before a skeleton of it is built
    config = source.config("vae")
    skeleton = memory.meta_model(decoder_skeleton, config, ctx.dtype, where=config_where(source, "vae"))  # the half
    chosen = memory.plan_decode(
        budget,
        context,
        memory.parameter_bytes(skeleton),
        config["block_out_channels"][0],
        meta["height"],
        meta["width"],
        ctx.dtype.itemsize,
    )
    del skeleton
    ctx.note(chosen.describe())
    with meter.phase("load"):
        vae = load_vae_half(source, config, ctx, chosen.tile, "decoder")
    processor = PixArtImageProcessor(vae_scale_factor=source.vae_scale_factor)
    resize = (meta["requested_height"], meta["requested_width"]) != (meta["height"], meta["width"])

    # 2. Decode one image at a time unless told otherwise: activations at 1024² dominate this stage's memory
    images = []
    total = latents.latents.shape[0]
    step = 1 if batch_size is None else batch_size
    ctx.advance("decode", 0, total)
    with meter.phase("compute"), torch.inference_mode():
        for start in range(0, total, step):
            sample = latents.latents[start : start + step].to(ctx.device, ctx.dtype) / vae.config.scaling_factor
            image = vae.decode(sample, return_dict=False)[0]
            if resize:
                image = processor.resize_and_crop_tensor(image, meta["requested_width"], meta["requested_height"])
            decoded = processor.postprocess(image.float(), output_type="pil")
            if latents.overlay_image is not None:  # VaeImageProcessor.apply_overlay, as A1111 pastes them back
                from pixart_cli.models.masking import paste

                decoded = paste(decoded, latents.overlay_mask, latents.overlay_image)
            images.extend(decoded)
            ctx.advance("decode", len(images), total)
    del vae
    ctx.free()
    meter.finish(chosen.name if not chosen.tile else f"tiled-{chosen.tile}", ctx.reports)
    return images
