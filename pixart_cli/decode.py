"""Stage 3: latents -> images. Loads only the VAE."""

from __future__ import annotations

from pixart_cli import artifacts, memory
from pixart_cli.denoise import check_finite
from pixart_cli.errors import PixartError, bad_file
from pixart_cli.models import Model
from pixart_cli.runtime import RunContext


def check_fits(latents: artifacts.Latents, source: Model, path: str) -> None:
    """Latents must match this VAE's channels and scale; checked on its config before the weights load."""
    channels = source.config("vae").get("latent_channels", 4)
    found = latents.latents.shape[1]
    if found != channels:
        raise bad_file(path, f"latents have {found} channels but the VAE of {source.id} takes {channels}")
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


def decode(
    latents: artifacts.Latents, ctx: RunContext, batch_size: int | None = None, source_path: str = "latents"
) -> list:
    """Decode latents [N, 4, h, w] to N PIL images at the requested size (binning undone, as the pipeline does)."""
    import torch

    from pixart_cli.lean import import_diffusers
    from pixart_cli.vae_decoder import load_vae_half, vae_skeleton

    PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor

    # 1. Check the latents against the VAE config
    if batch_size is not None and batch_size < 1:
        raise PixartError(f"--batch-size {batch_size}: must be at least 1")
    meta = latents.meta
    source = ctx.model
    check_fits(latents, source, source_path)
    check_finite(latents.latents, meta.get("dtype", ctx.dtype_name))

    # 2. Pick full or tiled decode for the budget, then load the VAE only
    meter = ctx.meter("decode")
    budget, context = ctx.budget()
    config = source.config("vae")
    skeleton = memory.meta_model(vae_skeleton, config, ctx.dtype)
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

    # 3. Decode one image at a time unless told otherwise: activations at 1024² dominate this stage's memory
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
            images.extend(processor.postprocess(image.float(), output_type="pil"))
            ctx.advance("decode", len(images), total)
    del vae
    ctx.free()
    meter.finish(chosen.name if not chosen.tile else f"tiled-{chosen.tile}", ctx.reports)
    return images
