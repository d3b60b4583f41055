"""Stage 2: embeddings -> latents. Loads only the transformer and the scheduler."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from pixart_cli import artifacts, img2img, lora, memory
from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file
from pixart_cli.models import Model, load_component
from pixart_cli.runtime import RunContext
from pixart_cli.settings import SCHEDULERS, DenoiseSettings

# With one step the pipeline returns the scheduler's pred_original_sample (step(...)[1]); these don't give one.
NO_SINGLE_STEP = {"DPMSolverMultistepScheduler", "SASolverScheduler"}
# SA-Solver names DPM-Solver++'s data prediction differently (PixArt-Σ's docs build it this way).
SCHEDULER_OVERRIDES = {"SASolverScheduler": {"algorithm_type": "data_prediction"}}


@dataclass(frozen=True)
class Schedule:
    """The run's settings with the model family's defaults filled in, and the size the transformer runs at."""

    steps: int
    timesteps: list[int] | None  # a fixed schedule (one-step models) replaces `steps`
    guidance_scale: float
    scheduler: str  # diffusers class name
    requested_width: int
    requested_height: int
    width: int  # binned (or requested, without a bin table or with --no-binning)
    height: int
    binned: bool
    strength: float | None = None  # image to image: the share of the schedule that runs

    @property
    def steps_per_image(self) -> int:
        """Steps that run for each image (image to image runs only the last ones)."""
        return img2img.steps_to_run(len(self.timesteps) if self.timesteps else self.steps, self.strength)


def resolved(settings: DenoiseSettings, source: Model) -> dict:
    """The settings that change an image with each default filled from the model's family and configs: steps,
    timesteps, guidance_scale, scheduler (class name), requested_width, requested_height. Reads configs only and
    imports nothing heavy (scale-out's drivers compare these with a manifest before any model loads)."""
    family = source.family
    return {
        "steps": family.steps if settings.steps is None else settings.steps,
        "timesteps": list(family.timesteps) if settings.steps is None and family.timesteps else None,
        "guidance_scale": float(family.guidance_scale if settings.guidance_scale is None else settings.guidance_scale),
        "scheduler": chosen_scheduler(source, settings.scheduler),
        "requested_width": source.native_size if settings.width is None else settings.width,
        "requested_height": source.native_size if settings.height is None else settings.height,
    }


def schedule(settings: DenoiseSettings, source: Model) -> Schedule:
    """Fill each default from the model's family and configs, check what only the model can tell, and bin the
    size as the pipeline does. Reads configs only: no weights load."""
    filled = resolved(settings, source)
    steps, timesteps, scheduler = filled["steps"], filled["timesteps"], filled["scheduler"]
    check_scheduler(source, scheduler)
    if steps == 1 and not timesteps and scheduler in NO_SINGLE_STEP:
        raise PixartError(
            f"--steps 1: {scheduler} cannot take a single step in the PixArt pipeline; "
            "use --steps 2 or more (one-step models such as DMD use their own scheduler)"
        )
    train_steps = source.config("scheduler").get("num_train_timesteps")
    if isinstance(train_steps, int) and steps > train_steps:
        raise PixartError(f"--steps {steps}: this model's scheduler has only {train_steps} timesteps; use fewer")
    requested_width, requested_height = filled["requested_width"], filled["requested_height"]
    _check_size(source, requested_width, requested_height, patches=False)
    table = source.bin_table if settings.binning else None
    if table is not None:
        from pixart_cli.lean import import_diffusers

        PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor
        height, width = PixArtImageProcessor.classify_height_width_bin(requested_height, requested_width, table)
    else:
        height, width = requested_height, requested_width
    _check_size(source, width, height, binned=table is not None)  # the size the transformer runs at
    return Schedule(
        steps,
        timesteps,
        filled["guidance_scale"],
        scheduler,
        requested_width,
        requested_height,
        width,
        height,
        table is not None,
        settings.strength,
    )


def _check_size(source: Model, width: int, height: int, binned: bool = False, patches: bool = True) -> None:
    """Within 4x the native size, and (``patches``) a whole number of transformer patches, which the transformer
    needs: otherwise it fails only after the run has done its work."""
    limit = 4 * source.native_size
    multiple = source.vae_scale_factor * int(source.config("transformer").get("patch_size", 2))
    for flag, value in (("--width", width), ("--height", height)):
        if value > limit:
            raise PixartError(
                f"{flag} {value}: beyond this model's maximum of {limit} (4x its native "
                f"{source.native_size}); use a smaller size"
            )
        if patches and value % multiple:
            where = "the bin it falls in" if binned else "without binning it"
            raise PixartError(
                f"{flag} {value}: {where} must be a multiple of {multiple} for this model "
                f"(VAE x{source.vae_scale_factor}, patch {multiple // source.vae_scale_factor}); "
                f"use {max(multiple, value // multiple * multiple)}"
            )


def check_fits(embeddings: artifacts.Embeddings, source: Model, path: str) -> None:
    """The embeddings must suit this transformer; checked on its config before any weights load."""
    caption_channels = source.config("transformer").get("caption_channels")
    width_found = embeddings.prompt_embeds.shape[-1]
    if caption_channels is not None and width_found != caption_channels:
        raise bad_file(
            path,
            f"embeddings are {width_found} wide but {source.id} takes {caption_channels}; "
            "encode with the same model family",
        )


def denoise(
    embeddings: artifacts.Embeddings,
    settings: DenoiseSettings,
    ctx: RunContext,
    source_path: str = "embeddings",
    init: artifacts.Latents | None = None,
    init_path: str = "init latents",
) -> artifacts.Latents:
    """Run the pipeline's denoising loop on stored embeddings.

    embeddings: prompt_embeds [B, L, C]. Returns Latents [B * num_images, 4, H/8, W/8] at the binned size H x W.
    Image i gets seed + i, drawn from a CPU generator, so a seed means the same image on any device.
    ``ctx.loras`` are checked against the transformer before its weights load, then fused into them.
    ``init``: image to image (module img2img); its size is the run's, and ``settings.strength`` says how much of the
    schedule runs from it.
    """
    # 1. Check inputs against the model's configs; fill each default from the model's family
    settings = img2img.settings_for(settings.with_seed(), None if init is None else init.meta)
    source = ctx.model
    settings.check_total(embeddings.prompt_embeds.shape[0])
    check_fits(embeddings, source, source_path)
    with img2img.sized_by(init, init_path):
        plan = schedule(settings, source)
    total_images = embeddings.prompt_embeds.shape[0] * settings.num_images
    seeds = [settings.seed + index for index in range(total_images)]
    img2img.check_init(init, plan, source, init_path, total_images)

    # 2. Pick a plan for the budget from the transformer's exact size, then load it and the scheduler only
    meter = ctx.meter("denoise")
    chosen = _plan(plan, total_images, ctx)
    if settings.batch_size is not None:  # the user's flag wins over the plan's batch
        chosen = dataclasses.replace(chosen, batch=settings.batch_size)
    # Shown once everything is checked and before the work, so that an interrupted run can be repeated.
    ctx.note(f"seed: {seeds[0]}" if total_images == 1 else f"seed: {seeds[0]}..{seeds[-1]} (image i: seed + i)")
    ctx.note(chosen.describe())
    for adapter in ctx.loras:
        ctx.note(adapter.describe())
    with meter.phase("load"):
        step_cache = _step_cache(settings.step_cache, chosen, plan, ctx)
        transformer, noise_scheduler = _load(
            chosen, plan.scheduler, ctx, compiled=settings.compile, step_cache=step_cache
        )

    # 3. Denoise in batches of the plan's size
    with meter.phase("compute"):
        latents = _denoise_batches(transformer, noise_scheduler, embeddings, settings, plan, chosen.batch, ctx, init)
    del transformer
    ctx.free()
    meter.finish(chosen.name, ctx.reports)
    check_finite(latents, ctx.dtype_name)

    # 4. Record everything decode and a reader of the file need
    meta_in = embeddings.meta
    meta = {
        "model": source.recorded,
        "revision": source.revision,
        "family": source.family.name,
        "dtype": ctx.dtype_name,
        "prompts": [p for p in meta_in["prompts"] for _ in range(settings.num_images)],
        "negative_prompt": meta_in.get("negative_prompt", ""),
        "seeds": seeds,
        "steps": plan.steps,
        "timesteps": plan.timesteps,
        "guidance_scale": plan.guidance_scale,
        "scheduler": plan.scheduler,
        "height": plan.height,
        "width": plan.width,
        "requested_height": plan.requested_height,
        "requested_width": plan.requested_width,
        "binned": plan.binned,
        "plan": chosen.name,
        "compiled": settings.compile,
        "step_cache": step_cache,
        "clean_caption": meta_in.get("clean_caption"),
        "max_sequence_length": meta_in.get("max_sequence_length"),
        "loras": lora.records(list(ctx.loras)),
        **img2img.meta_for(init, plan),
    }
    return artifacts.Latents(latents, meta)


def _plan(plan: Schedule, images: int, ctx: RunContext) -> memory.Plan:
    """Resident with the largest batch that fits, or streamed, from the transformer's size on the meta device."""
    from pixart_cli.lean import import_diffusers

    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d"
    ).PixArtTransformer2DModel
    source = ctx.model
    config = source.config("transformer")
    skeleton = memory.meta_model(PixArtTransformer2DModel.from_config, config, ctx.dtype, cpu_buffers=True)
    scale = source.vae_scale_factor * config.get("patch_size", 2)
    for adapter in ctx.loras:  # a LoRA that does not fit stops here, before any weights load
        lora.check_lora(adapter, skeleton)
    # Fusing a LoRA briefly needs an fp32 copy of one layer on the device; nothing stays after it.
    transformer_bytes = memory.parameter_bytes(skeleton) + lora.fuse_peak_bytes(skeleton, list(ctx.loras))
    budget, context = ctx.budget()
    return memory.plan_denoise(
        budget,
        context,
        transformer_bytes,
        (plan.height // scale) * (plan.width // scale),
        skeleton.inner_dim,
        ctx.dtype.itemsize,
        images,
        plan.guidance_scale > 1,
    )


def _step_cache(step_cache: str | None, chosen: memory.Plan, plan: Schedule, ctx: RunContext) -> str | None:
    """The step cache this run uses (recorded in the file): the one asked for, unless it cannot act here."""
    from pixart_cli import step_caching

    if step_cache is None:
        return None
    if chosen.name == "streamed":
        ctx.note(f"--step-cache {step_cache}: ignored under the streamed plan (its blocks move between devices)")
        return None
    if not step_caching.runs_anything(step_cache, plan.steps_per_image):
        ctx.note(f"--step-cache {step_cache}: ignored, {plan.steps_per_image} steps are all run in full by it")
        return None
    ctx.note(f"step cache: {step_cache} (approximate: images differ from the exact run's)")
    return step_cache


def _load(
    chosen: memory.Plan, scheduler_name: str, ctx: RunContext, compiled: bool = False, step_cache: str | None = None
):
    """The transformer (resident or group-offloaded, LoRAs fused, an opt-in step cache hooked on) and the
    scheduler; nothing else."""
    import torch

    from pixart_cli import step_caching
    from pixart_cli.lean import make_scheduler

    PixArtTransformer2DModel = step_caching.transformer_class(step_cache is not None)

    source, device = ctx.model, ctx.device
    if chosen.name == "streamed":
        # Below the transformer's own size: diffusers' group offloading streams its blocks from CPU RAM.
        transformer = load_component(source, "transformer", PixArtTransformer2DModel.from_pretrained, dtype=ctx.dtype)
        lora.apply_loras(transformer, list(ctx.loras))  # into the CPU weights, before offloading takes them
        transformer.enable_group_offload(
            onload_device=device, offload_type="block_level", num_blocks_per_group=1, use_stream=device.type == "cuda"
        )
    else:
        # Read on the CPU, then moved: diffusers' device_map path goes through accelerate's dispatch, which imports
        # torch._dynamo, sympy and scipy (4.4 s of a 19 s denoise process on an H200, 2026-11-28), for a 1.2 GB
        # copy that takes a fraction of a second. torch's own .to: diffusers' override only adds checks for group
        # offloading (not used here) and imports the offloading hooks to make them, which import torch._dynamo.
        transformer = load_component(source, "transformer", PixArtTransformer2DModel.from_pretrained, dtype=ctx.dtype)
        torch.nn.Module.to(transformer, device)
        lora.apply_loras(transformer, list(ctx.loras))
    transformer.eval()
    if step_cache is not None:
        step_caching.enable(transformer, step_cache)
    if compiled:
        if chosen.name == "streamed":
            ctx.note("--compile: ignored under the streamed plan (its blocks move between devices each step)")
        else:
            # Inductor keeps compiled kernels in its cache folder (TORCHINDUCTOR_CACHE_DIR, by default under
            # /tmp), so a later run with the same shapes reuses them instead of compiling again.
            transformer.compile()
    # The model's own scheduler config, as the class the user picked (default: the model's own class).
    noise_scheduler = make_scheduler(
        scheduler_name, source.config("scheduler"), **SCHEDULER_OVERRIDES.get(scheduler_name, {})
    )
    return transformer, noise_scheduler


def _denoise_batches(
    transformer,
    noise_scheduler,
    embeddings: artifacts.Embeddings,
    settings: DenoiseSettings,
    plan: Schedule,
    batch: int,
    ctx: RunContext,
    init: artifacts.Latents | None = None,
):
    """All images, ``batch`` at a time, each with its own CPU generator (seeds seed, seed+1, ...).

    Row r of the flat batch is image r % num_images of prompt r // num_images, as in the pipeline.
    """
    import torch

    from pixart_cli.sampling import sample_latents

    total = embeddings.prompt_embeds.shape[0] * settings.num_images
    rows = [index // settings.num_images for index in range(total)]
    batches = math.ceil(total / batch)
    total_steps = batches * plan.steps_per_image
    parts = []
    ctx.advance("denoise", 0, total_steps)
    with torch.inference_mode():
        for number, start in enumerate(range(0, total, batch)):
            picked = rows[start : start + batch]
            tensors = {key: value[picked].to(ctx.device) for key, value in embeddings.tensors().items()}
            generators = [
                torch.Generator("cpu").manual_seed(settings.seed + index) for index in range(start, start + len(picked))
            ]

            def on_step(step: int, timestep, latents, done=number * plan.steps_per_image) -> None:
                ctx.advance("denoise", done + step + 1, total_steps)

            # Image to image: the init latents noised to where the strength starts (img2img.py); the loop then
            # runs the rest of the schedule from them.
            begin = (
                None
                if init is None
                else img2img.start(
                    noise_scheduler,
                    plan.steps,
                    plan.timesteps,
                    plan.strength,
                    init.latents[[0] * len(picked) if len(init.latents) == 1 else slice(start, start + len(picked))],
                    generators,
                    ctx.device,
                    ctx.dtype,
                )
            )
            # The pipeline's own loop (sampling.py), without importing the pipeline
            parts.append(
                sample_latents(
                    transformer,
                    noise_scheduler,
                    ctx.model.family.pipeline,
                    **tensors,
                    num_inference_steps=None if plan.timesteps else plan.steps,
                    timesteps=plan.timesteps,
                    guidance_scale=plan.guidance_scale,
                    height=plan.height,
                    width=plan.width,
                    vae_scale_factor=ctx.model.vae_scale_factor,
                    generator=generators,
                    device=ctx.device,
                    callback=on_step,
                    start_latents=None if begin is None else begin.latents,
                    begin_index=0 if begin is None else begin.begin_index,
                ).cpu()
            )
    return torch.cat(parts)


def check_finite(latents, dtype_name: str) -> None:
    """NaN or inf made at run time (fp16 overflow, a bad LoRA) would decode to a black image: fail instead."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        advice = "try --dtype bf16 or fp32" if dtype_name == "fp16" else "check the model and any LoRA"
        raise PixartError(f"denoising produced NaN or inf values (numeric overflow); {advice}", EXIT_RUNTIME)


def chosen_scheduler(source: Model, choice: str | None) -> str:
    """The diffusers class name of the scheduler: the user's --scheduler, else the model's own (unchecked)."""
    return SCHEDULERS[choice].class_name if choice is not None else source.config("scheduler").get("_class_name", "")


def check_scheduler(source: Model, name: str) -> None:
    """A class diffusers has (imports its scheduler modules)."""
    from pixart_cli.lean import scheduler_class

    if scheduler_class(name) is None:
        raise PixartError(
            f"--model {source.id}: unknown scheduler class {name!r} in scheduler/scheduler_config.json", EXIT_RUNTIME
        )
