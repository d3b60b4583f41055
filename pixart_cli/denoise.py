"""Stage 2: embeddings -> latents. Loads only the transformer and the scheduler."""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable

from pixart_cli import artifacts, memory, runtime
from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file
from pixart_cli.models import Model, load_component
from pixart_cli.sampling import sample_latents

Progress = Callable[[str, int, int], None]
MAX_SEED = 2**32 - 1
# With one step the pipeline returns the scheduler's pred_original_sample (step(...)[1]); these don't give one.
NO_SINGLE_STEP = {"DPMSolverMultistepScheduler", "SASolverScheduler"}
# --scheduler names -> diffusers classes, each built with from_config on the model's own scheduler config.
SCHEDULERS = {"dpm++": "DPMSolverMultistepScheduler", "sa-solver": "SASolverScheduler", "ddim": "DDIMScheduler",
              "euler": "EulerDiscreteScheduler", "euler-a": "EulerAncestralDiscreteScheduler",
              "lcm": "LCMScheduler", "ddpm": "DDPMScheduler"}
# SA-Solver names DPM-Solver++'s data prediction differently (PixArt-Σ's docs build it this way).
SCHEDULER_OVERRIDES = {"SASolverScheduler": {"algorithm_type": "data_prediction"}}


def check_inputs(steps: int | None, guidance_scale: float | None, seed: int | None, width: int | None,
                 height: int | None, num_images: int, scheduler: str | None = None,
                 batch_size: int | None = None) -> None:
    """Reject bad settings before anything loads (each message names the flag and the fix)."""
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise PixartError(f"--scheduler {scheduler!r}: unknown; use one of {', '.join(SCHEDULERS)} "
                          "(default: the model's own)")
    if batch_size is not None and batch_size < 1:
        raise PixartError(f"--batch-size {batch_size}: must be at least 1")
    if steps is not None and steps < 1:
        raise PixartError(f"--steps {steps}: must be at least 1")
    if guidance_scale is not None and not guidance_scale >= 0:  # also rejects NaN
        raise PixartError(f"--guidance-scale {guidance_scale}: must be 0 or more")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise PixartError(f"--seed {seed}: must be between 0 and {MAX_SEED}")
    for flag, value in (("--width", width), ("--height", height)):
        if value is not None and (value < 8 or value % 8):
            raise PixartError(f"{flag} {value}: must be a positive multiple of 8")
    if num_images < 1:
        raise PixartError(f"--num-images {num_images}: must be at least 1")


def check_fits(embeddings: artifacts.Embeddings, source: Model, path: str, width: int, height: int) -> None:
    """The embeddings and the size must suit this transformer; checked on its config before any weights load."""
    caption_channels = source.config("transformer").get("caption_channels")
    width_found = embeddings.prompt_embeds.shape[-1]
    if caption_channels is not None and width_found != caption_channels:
        raise bad_file(path, f"embeddings are {width_found} wide but {source.id} takes {caption_channels}; "
                             "encode with the same model family")
    limit = 4 * source.native_size
    for flag, value in (("--width", width), ("--height", height)):
        if value > limit:
            raise PixartError(f"{flag} {value}: beyond this model's maximum of {limit} (4x its native "
                              f"{source.native_size}); use a smaller size")


def denoise(embeddings: artifacts.Embeddings, *, model: str | None = None, steps: int | None = None,
            guidance_scale: float | None = None, seed: int | None = None, width: int | None = None,
            height: int | None = None, binning: bool = True, num_images: int = 1, scheduler: str | None = None,
            batch_size: int | None = None, device: str = "auto", dtype: str = "auto", vram: str | None = None,
            source_path: str = "embeddings",
            progress: Progress | None = None, log: Callable[[str], None] | None = None,
            reports: list | None = None) -> artifacts.Latents:
    """Run the pipeline's denoising loop on stored embeddings.

    embeddings: prompt_embeds [B, L, C]. Returns Latents [B * num_images, 4, H/8, W/8] at the binned size H x W.
    Image i gets seed + i, drawn from a CPU generator, so a seed means the same image on any device.
    """
    import torch

    from pixart_cli.lean import import_diffusers

    diffusers = import_diffusers("diffusers")
    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d").PixArtTransformer2DModel

    # 1. Check inputs against the model's configs; fill each default from the model's family
    check_inputs(steps, guidance_scale, seed, width, height, num_images, scheduler, batch_size)
    meta_in = embeddings.meta
    source = Model(meta_in["model"] if model is None else model, meta_in.get("revision") if model is None else None)
    family = source.family
    requested_width = source.native_size if width is None else width
    requested_height = source.native_size if height is None else height
    check_fits(embeddings, source, source_path, requested_width, requested_height)
    timesteps = list(family.timesteps) if steps is None and family.timesteps else None
    steps = family.steps if steps is None else steps
    scheduler_name = _scheduler_name(source, scheduler)
    if steps == 1 and not timesteps and scheduler_name in NO_SINGLE_STEP:
        raise PixartError(f"--steps 1: {scheduler_name} cannot take a single step in the PixArt pipeline; "
                          "use --steps 2 or more (one-step models such as DMD use their own scheduler)")
    guidance_scale = family.guidance_scale if guidance_scale is None else guidance_scale
    seed = secrets.randbelow(MAX_SEED + 1) if seed is None else seed
    torch_device = runtime.resolve_device(device)
    torch_dtype = runtime.resolve_dtype(dtype, torch_device)

    # 2. Resolution binning, as the pipeline does it; models without a bin table keep the requested size
    table = source.bin_table if binning else None
    if table is not None:
        PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor
        height, width = PixArtImageProcessor.classify_height_width_bin(requested_height, requested_width, table)
    else:
        height, width = requested_height, requested_width

    # 3. Pick a plan for the budget from the transformer's exact size, then load it and the scheduler only
    meter = memory.Meter("denoise", torch_device)
    budget, context = memory.device_budget(vram, torch_device)
    config = source.config("transformer")
    skeleton = memory.meta_model(PixArtTransformer2DModel.from_config, config, torch_dtype, cpu_buffers=True)
    scale = source.vae_scale_factor * config.get("patch_size", 2)
    prompts_in = embeddings.prompt_embeds.shape[0]
    chosen = memory.plan_denoise(budget, context, memory.parameter_bytes(skeleton), (height // scale) * (width // scale),
                                 skeleton.inner_dim, torch_dtype.itemsize, prompts_in * num_images,
                                 guidance_scale > 1)
    del skeleton
    if batch_size is not None:  # the user's flag wins over the plan's batch
        chosen = dataclasses.replace(chosen, batch=batch_size)
    if log:
        log(chosen.describe())
    with meter.phase("load"):
        if chosen.name == "streamed":
            # Below the transformer's own size: diffusers' group offloading streams its blocks from CPU RAM.
            transformer = load_component(source, "transformer", PixArtTransformer2DModel.from_pretrained,
                                         dtype=torch_dtype)
            transformer.enable_group_offload(onload_device=torch_device, offload_type="block_level",
                                             num_blocks_per_group=1, use_stream=torch_device.type == "cuda")
        else:
            kwargs = {"device_map": {"": torch_device}} if torch_device.type == "cuda" else {}
            transformer = load_component(source, "transformer", PixArtTransformer2DModel.from_pretrained,
                                         dtype=torch_dtype, **kwargs)
            # torch's own .to: diffusers' override only adds checks for group offloading (not used here) and
            # imports the offloading hooks to make them, which import torch._dynamo (issue 10).
            torch.nn.Module.to(transformer, torch_device)
        transformer.eval()
        # The model's own scheduler config, as the class the user picked (default: the model's own class).
        noise_scheduler = getattr(diffusers, scheduler_name).from_config(
            source.config("scheduler"), **SCHEDULER_OVERRIDES.get(scheduler_name, {}))

    # 4. Denoise in batches of the plan's size: one CPU generator per image, seeds seed, seed+1, ...
    #    Row r of the flat batch is image r % num_images of prompt r // num_images, as in the pipeline.
    total_images = prompts_in * num_images
    seeds = [seed + index for index in range(total_images)]
    batch = chosen.batch or total_images
    steps_per_batch = len(timesteps) if timesteps else steps
    done = 0

    def on_step(step: int, timestep, latents) -> None:
        if progress:
            progress("denoise", done * steps_per_batch + step + 1, math.ceil(total_images / batch) * steps_per_batch)

    rows = [index // num_images for index in range(total_images)]
    parts = []
    with meter.phase("compute"), torch.inference_mode():
        for start in range(0, total_images, batch):
            picked = rows[start:start + batch]
            tensors = {key: value[picked].to(torch_device) for key, value in embeddings.tensors().items()}
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds[start:start + batch]]
            # The pipeline's own loop (sampling.py), without importing the pipeline
            parts.append(sample_latents(transformer, noise_scheduler, family.pipeline, **tensors,
                                        num_inference_steps=None if timesteps else steps, timesteps=timesteps,
                                        guidance_scale=guidance_scale, height=height, width=width,
                                        vae_scale_factor=source.vae_scale_factor, generator=generators,
                                        device=torch_device, callback=on_step).cpu())
            done += 1
    latents = torch.cat(parts)
    del transformer, tensors
    runtime.free(torch_device)
    meter.finish(chosen.name, reports)

    # 5. Record everything decode and a reader of the file need
    prompts = [p for p in meta_in["prompts"] for _ in range(num_images)]
    meta = {
        "format": artifacts.LATENTS_FORMAT, "version": artifacts.FORMAT_VERSION,
        "model": source.id, "revision": source.revision, "family": family.name,
        "dtype": runtime.dtype_name(torch_dtype), "prompts": prompts,
        "negative_prompt": meta_in.get("negative_prompt", ""), "seeds": seeds, "steps": steps,
        "timesteps": timesteps, "guidance_scale": float(guidance_scale), "scheduler": scheduler_name,
        "height": height, "width": width, "requested_height": requested_height, "requested_width": requested_width,
        "binned": table is not None, "plan": chosen.name, "clean_caption": meta_in.get("clean_caption"),
        "max_sequence_length": meta_in.get("max_sequence_length"),
    }
    return artifacts.Latents(latents, meta)


def _scheduler_name(source: Model, choice: str | None) -> str:
    """The diffusers class name of the scheduler: the user's --scheduler, else the model's own."""
    from pixart_cli.lean import import_diffusers

    diffusers = import_diffusers("diffusers")

    name = SCHEDULERS[choice] if choice is not None else source.config("scheduler").get("_class_name", "")
    if not isinstance(getattr(diffusers, name, None), type):
        raise PixartError(f"--model {source.id}: unknown scheduler class {name!r} in scheduler/scheduler_config.json",
                          EXIT_RUNTIME)
    return name
