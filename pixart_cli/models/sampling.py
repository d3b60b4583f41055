"""The PixArt pipelines' denoising loop, for stored embeddings, without importing the pipelines.

Importing ``diffusers.pipelines.pixart_alpha`` loads transformers' T5, the VAE classes and the pipeline
machinery: seconds of a denoise process that runs none of them (issue 10). This is the part of
``PixArtAlphaPipeline.__call__`` / ``PixArtSigmaPipeline.__call__`` that runs with ``prompt_embeds`` given and
``output_type="latent"``, step for step, including where the two differ (Alpha passes micro-conditions for
sample_size 128, resets the scheduler's begin index, and takes ``pred_original_sample`` from a one-step
schedule). tests/test_lean.py checks it against the pipelines, latent for latent.

Image to image starts the same loop part-way, as diffusers' img2img pipelines (StableDiffusionImg2ImgPipeline)
do: the whole schedule is set, the loop runs ``scheduler.timesteps[begin_index:]`` with the scheduler's begin
index set there, from ``start_latents`` that ``scheduler.add_noise`` already put at that timestep's noise level
(so they are not multiplied by ``init_noise_sigma``). start_from computes both; tests/test_img2img.py checks
the result against diffusers' own img2img pieces.

Inpainting (PixArt has no inpainting checkpoint) is the 4-channel path of diffusers' StableDiffusionInpaintPipeline
(``num_channels_unet == 4``) on that start: after each step the known region is put back, the init latents noised
to the next timestep with the start's own noise, outside the mask (``Known.blend``). tests/test_inpaint.py checks
it step by step against diffusers' scheduler and VAE pieces.

Perturbed-attention guidance (``pag_scale`` > 0) is PixArtSigmaPAGPipeline's loop: one more batch row, the
prompt's again, whose selected self-attention layers take diffusers' identity-attention processors
(``models/pag.py``), and PAGMixin's guidance formula. tests/test_pag.py checks it against the pipeline.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

SIGMA_PIPELINE = "PixArtSigmaPipeline"


def sample_latents(
    transformer,
    scheduler,
    pipeline: str,
    *,
    prompt_embeds,
    prompt_attention_mask,
    negative_prompt_embeds=None,
    negative_prompt_attention_mask=None,
    num_inference_steps: int | None,
    timesteps: list[int] | None,
    guidance_scale: float,
    height: int,
    width: int,
    vae_scale_factor: int,
    generator: list,
    device,
    callback: Callable | None = None,
    start_latents=None,
    begin_index: int = 0,
    known: Known | None = None,
    pag_scale: float = 0.0,
):
    """Latents [B, C, height / vae_scale_factor, width / vae_scale_factor] for embeddings [B, L, C_text], as the
    named diffusers ``pipeline`` returns them with ``output_type="latent"`` and ``use_resolution_binning=False``.
    ``generator``: one CPU generator per image. ``callback(step, t, latents)``: as the pipeline calls it.

    Image to image: ``start_latents`` [B, C, h, w], noised to ``scheduler.timesteps[begin_index]``, and the index in
    the whole schedule the loop starts at (``t_start * scheduler.order`` of diffusers' ``get_timesteps``).
    Inpainting: ``known``, the region kept after each step. PAG: ``pag_scale`` > 0, with the transformer's PAG
    processors set (``pag.apply``).
    """
    import torch

    from pixart_cli.models.facade import import_diffusers

    randn_tensor = import_diffusers("diffusers.utils.torch_utils").randn_tensor

    from pixart_cli.models import step_caching

    step_caching.reset(transformer)  # an opt-in step cache starts each batch from its own first step
    sigma = pipeline == SIGMA_PIPELINE
    batch_size = prompt_embeds.shape[0]
    do_classifier_free_guidance = guidance_scale > 1.0
    perturbed = pag_scale > 0
    prompt_embeds = prompt_embeds.to(dtype=transformer.dtype, device=device)
    if perturbed:  # PixArtSigmaPAGPipeline: [negative,] prompt, prompt
        from pixart_cli.models import pag

        if do_classifier_free_guidance:
            negative_prompt_embeds = negative_prompt_embeds.to(dtype=transformer.dtype, device=device)
        prompt_embeds = pag.rows(prompt_embeds, negative_prompt_embeds, do_classifier_free_guidance)
        prompt_attention_mask = pag.rows(
            prompt_attention_mask, negative_prompt_attention_mask, do_classifier_free_guidance
        )
    elif do_classifier_free_guidance:
        negative_prompt_embeds = negative_prompt_embeds.to(dtype=transformer.dtype, device=device)
        prompt_embeds = torch.cat([negative_prompt_embeds, prompt_embeds], dim=0)
        prompt_attention_mask = torch.cat([negative_prompt_attention_mask, prompt_attention_mask], dim=0)
    prompt_attention_mask = prompt_attention_mask.to(device)

    # 4. Prepare timesteps
    if timesteps is not None:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
        num_inference_steps = len(scheduler.timesteps)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device)
    timesteps = scheduler.timesteps[begin_index:]  # image to image: the rest of the whole schedule

    # 5. Prepare latents (image to image: given, already at the first remaining timestep's noise level)
    latent_channels = transformer.config.in_channels
    if start_latents is None:
        shape = (batch_size, latent_channels, int(height) // vae_scale_factor, int(width) // vae_scale_factor)
        latents = randn_tensor(shape, generator=generator, device=device, dtype=prompt_embeds.dtype)
        latents = latents * scheduler.init_noise_sigma
    else:
        latents = start_latents.to(device=device, dtype=prompt_embeds.dtype)

    # 6. Extra step kwargs (eta 0.0, the pipelines' default; the generators for stochastic schedulers)
    step_parameters = set(inspect.signature(scheduler.step).parameters)
    extra_step_kwargs = {}
    if "eta" in step_parameters:
        extra_step_kwargs["eta"] = 0.0
    if "generator" in step_parameters:
        extra_step_kwargs["generator"] = generator

    # 6.1 Micro-conditions (Alpha only, for the 1024 transformer)
    added_cond_kwargs = {"resolution": None, "aspect_ratio": None}
    if not sigma and transformer.config.sample_size == 128:
        resolution = torch.tensor([height, width]).repeat(batch_size, 1)
        aspect_ratio = torch.tensor([float(height / width)]).repeat(batch_size, 1)
        resolution = resolution.to(dtype=prompt_embeds.dtype, device=device)
        aspect_ratio = aspect_ratio.to(dtype=prompt_embeds.dtype, device=device)
        if do_classifier_free_guidance:
            resolution = torch.cat([resolution, resolution], dim=0)
            aspect_ratio = torch.cat([aspect_ratio, aspect_ratio], dim=0)
        added_cond_kwargs = {"resolution": resolution, "aspect_ratio": aspect_ratio}

    # 7. Denoising loop
    num_warmup_steps = max(len(timesteps) - num_inference_steps * scheduler.order, 0)
    if (start_latents is not None or not sigma) and hasattr(scheduler, "set_begin_index"):
        # Alpha resets it to 0; image to image starts at its index (get_timesteps sets it, for both families)
        scheduler.set_begin_index(begin_index)
    for i, t in enumerate(timesteps):
        if perturbed:
            latent_model_input = torch.cat([latents] * (prompt_embeds.shape[0] // latents.shape[0]))
        else:
            latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        current_timestep = t
        if not torch.is_tensor(current_timestep):
            dtype = torch.float64 if isinstance(current_timestep, float) else torch.int64
            if latent_model_input.device.type in ("mps", "npu"):
                dtype = torch.float32 if dtype == torch.float64 else torch.int32
            current_timestep = torch.tensor([current_timestep], dtype=dtype, device=latent_model_input.device)
        elif len(current_timestep.shape) == 0:
            current_timestep = current_timestep[None].to(latent_model_input.device)
        current_timestep = current_timestep.expand(latent_model_input.shape[0])

        with step_caching.step_context(transformer):
            noise_pred = transformer(
                latent_model_input,
                encoder_hidden_states=prompt_embeds,
                encoder_attention_mask=prompt_attention_mask,
                timestep=current_timestep,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=False,
            )[0]
        if perturbed:
            noise_pred = pag.guide(noise_pred, do_classifier_free_guidance, guidance_scale, pag_scale)
        elif do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        if transformer.config.out_channels // 2 == latent_channels:  # learned sigma
            noise_pred = noise_pred.chunk(2, dim=1)[0]

        output = scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)
        latents = output[1] if not sigma and num_inference_steps == 1 else output[0]
        if known is not None:
            latents = known.blend(scheduler, timesteps, i, latents)

        if i == len(timesteps) - 1 or ((i + 1) > num_warmup_steps and (i + 1) % scheduler.order == 0):
            if callback is not None:
                callback(i // getattr(scheduler, "order", 1), t, latents)
    return latents


# --- image to image: the start of the loop --------------------------------------------------------------------------------------
@dataclass
class Start:
    """Where the loop starts (sampling.sample_latents' ``start_latents`` and ``begin_index``): the init latents
    noised to the first remaining timestep, and that timestep's index in the scheduler's whole schedule."""

    latents: Any  # [B, C, h, w] on the device
    begin_index: int
    noise: Any = None  # [B, C, h, w]: the noise added (inpainting noises the known region with it at each step)


@dataclass
class Known:
    """Inpainting's known region: the init latents (not noised), the start's noise, and the mask (1: repaint)."""

    init: Any  # [B, C, h, w] on the device, in the loop's dtype
    noise: Any  # [B, C, h, w]
    mask: Any  # [1 or B, 1, h, w], 0 or 1

    def blend(self, scheduler, timesteps, i: int, latents):
        """StableDiffusionInpaintPipeline's 4-channel step: the init latents noised to the next timestep (clean
        after the last), kept where the mask is 0."""
        import torch

        init_latents_proper = self.init
        if i < len(timesteps) - 1:
            noise_timestep = timesteps[i + 1]
            init_latents_proper = scheduler.add_noise(init_latents_proper, self.noise, torch.tensor([noise_timestep]))
        return (1 - self.mask) * init_latents_proper + self.mask * latents


def set_full_schedule(scheduler, steps: int, timesteps: list[int] | None, device) -> None:
    """The whole schedule, as the pipeline's retrieve_timesteps sets it (a fixed schedule replaces ``steps``)."""
    if timesteps:
        scheduler.set_timesteps(timesteps=timesteps, device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def start_from(
    scheduler, steps: int, timesteps: list[int] | None, strength: float, init, generators, device, dtype
) -> Start:
    """diffusers' get_timesteps then prepare_latents, on ``scheduler`` (left at the start's begin index).

    init: [B, C, h, w] init latents, one row per image; generators: one CPU generator per row (the txt2img noise).
    """
    from pixart_cli.models.facade import import_diffusers

    randn_tensor = import_diffusers("diffusers.utils.torch_utils").randn_tensor

    set_full_schedule(scheduler, steps, timesteps, device)
    total = len(timesteps) if timesteps else steps  # the num_inference_steps that get_timesteps is given
    init_timestep = min(int(total * strength), total)
    t_start = max(total - init_timestep, 0)
    begin_index = t_start * scheduler.order
    remaining = scheduler.timesteps[begin_index:]
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(begin_index)
    init = init.to(device=device, dtype=dtype)
    noise = randn_tensor(init.shape, generator=generators, device=device, dtype=dtype)
    latents = scheduler.add_noise(init, noise, remaining[:1].repeat(init.shape[0]))
    return Start(latents, begin_index, noise)
