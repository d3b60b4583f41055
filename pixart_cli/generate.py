"""All three stages in one process: the same stage functions, each model freed before the next loads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict

from pixart_cli import img2img, lora
from pixart_cli.artifacts import SourceImage
from pixart_cli.decode import decode
from pixart_cli.denoise import denoise, schedule
from pixart_cli.encode import encode
from pixart_cli.runtime import RunContext
from pixart_cli.settings import DenoiseSettings, EncodeSettings, check_prompts


def generate(
    prompts: Sequence[str],
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    ctx: RunContext,
    decode_batch_size: int | None = None,
    image: SourceImage | None = None,
):
    """prompts -> (images, latents meta). Each stage's model is dropped when its function returns.

    ``image``: image to image, the staged ``encode-image`` + ``denoise --init-latents`` in one process;
    --width/--height (``denoising``) scale the image as encode-image's do.
    """
    # Everything the configs can tell is checked before the first (slowest) model loads.
    prompts = check_prompts(prompts)
    denoising = denoising.with_seed()
    denoising.check_total(len(prompts))
    sizes = (
        None if image is None else img2img.fit(image, ctx.model, denoising.width, denoising.height, denoising.binning)
    )
    denoising = img2img.settings_for(denoising, None if sizes is None else asdict(sizes), option="--image")
    img2img.check_steps(schedule(denoising, ctx.model))
    if ctx.loras:  # a LoRA that does not fit the transformer fails here, before T5 runs
        lora.check_loras_for_model(list(ctx.loras), ctx.model)
    init = (
        None
        if image is None
        else img2img.encode_image(image, ctx, denoising.width, denoising.height, denoising.binning)
    )
    embeddings = encode(prompts, encoding, ctx)
    latents = denoise(embeddings, denoising, ctx, init=init, init_path="IMAGE" if image is None else str(image.path))
    images = decode(latents, ctx, batch_size=decode_batch_size)
    return images, latents.meta
