"""All three stages in one process: the same stage functions, each model freed before the next loads."""

from __future__ import annotations

from collections.abc import Sequence

from pixart_cli import lora
from pixart_cli.decode import decode
from pixart_cli.denoise import denoise, schedule
from pixart_cli.encode import encode
from pixart_cli.runtime import RunContext
from pixart_cli.settings import DenoiseSettings, EncodeSettings, check_prompts


def generate(prompts: Sequence[str], encoding: EncodeSettings, denoising: DenoiseSettings, ctx: RunContext,
             decode_batch_size: int | None = None):
    """prompts -> (images, latents meta). Each stage's model is dropped when its function returns."""
    # Everything the configs can tell is checked before the first (slowest) model loads.
    prompts = check_prompts(prompts)
    denoising = denoising.with_seed()
    denoising.check_total(len(prompts))
    schedule(denoising, ctx.model)
    if ctx.loras:  # a LoRA that does not fit the transformer fails here, before T5 runs
        lora.check_loras_for_model(list(ctx.loras), ctx.model)
    embeddings = encode(prompts, encoding, ctx)
    latents = denoise(embeddings, denoising, ctx)
    images = decode(latents, ctx, batch_size=decode_batch_size)
    return images, latents.meta
