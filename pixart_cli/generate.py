"""All three stages in one process: the same stage functions, each model freed before the next loads."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pixart_cli import lora
from pixart_cli.decode import decode
from pixart_cli.denoise import check_inputs as check_denoise_inputs
from pixart_cli.denoise import denoise
from pixart_cli.encode import check_inputs as check_encode_inputs
from pixart_cli.encode import encode
from pixart_cli.models import Model

Progress = Callable[[str, int, int], None]


def generate(prompts: Sequence[str], *, model: str, negative_prompt: str = "", steps: int | None = None,
             guidance_scale: float | None = None, seed: int | None = None, width: int | None = None,
             height: int | None = None, binning: bool = True, num_images: int = 1, device: str = "auto",
             dtype: str = "auto", max_sequence_length: int | None = None, clean_caption: bool = True,
             scheduler: str | None = None, batch_size: int | None = None, vram: str | None = None,
             precision: str = "full", cache: str | None = None, loras: Sequence[lora.LoraWeights] = (),
             progress: Progress | None = None,
             log: Callable[[str], None] | None = None, reports: list | None = None):
    """prompts -> (images, latents meta). Each stage's model is dropped when its function returns."""
    # Every option is checked before the first (slowest) model loads.
    check_encode_inputs(list(prompts), negative_prompt, max_sequence_length, clean_caption, precision)
    check_denoise_inputs(steps, guidance_scale, seed, width, height, num_images, scheduler, batch_size)
    if loras:  # a LoRA that does not fit the transformer fails here, before T5 runs
        lora.check_loras_for_model(list(loras), Model(model))
    shared = {"device": device, "dtype": dtype, "vram": vram, "progress": progress, "log": log, "reports": reports}
    embeddings = encode(prompts, model=model, negative_prompt=negative_prompt, max_sequence_length=max_sequence_length,
                        clean_caption=clean_caption, precision=precision, cache=cache, **shared)
    latents = denoise(embeddings, steps=steps, guidance_scale=guidance_scale, seed=seed, width=width,
                      height=height, binning=binning, num_images=num_images, scheduler=scheduler,
                      batch_size=batch_size, loras=loras, **shared)
    images = decode(latents, batch_size=batch_size, **shared)
    return images, latents.meta
