"""Stage 2: embeddings -> latents. Loads only the transformer and the scheduler.

Takes a ``plan.DenoisePlan`` (every check made, the seeds drawn, the conditioning inputs attached) and the run
context; picks a memory plan for the budget, loads, denoises in batches, and returns the latents with the record
of what made them.
"""

from __future__ import annotations

import dataclasses
import math

from pixart_cli import record
from pixart_cli.files import staged
from pixart_cli.models import lora, memory
from pixart_cli.models.source import config_where, load_component
from pixart_cli.plan import DenoisePlan, Schedule
from pixart_cli.runtime import RunContext, check_finite

# SA-Solver names DPM-Solver++'s data prediction differently (PixArt-Σ's docs build it this way).
SCHEDULER_OVERRIDES = {"SASolverScheduler": {"algorithm_type": "data_prediction"}}


def denoise(embeddings: staged.Embeddings, plan: DenoisePlan, ctx: RunContext) -> staged.Latents:
    """Run the pipeline's denoising loop on stored embeddings, as ``plan`` says.

    embeddings: prompt_embeds [B, L, C]. Returns Latents [B * num_images, 4, H/8, W/8] at the binned size H x W.
    Image i gets seed + i, drawn from a CPU generator, so a seed means the same image on any device.
    ``ctx.loras`` are checked against the transformer before its weights load, then fused into them.
    ``plan.init``: image to image's init latents; ``plan.schedule.strength`` says how much of the schedule runs.
    """
    settings, schedule, seeds = plan.settings, plan.schedule, plan.seeds

    # 1. Pick a memory plan for the budget from the transformer's exact size, then load it and the scheduler only
    meter = ctx.meter("denoise")
    chosen = _memory_plan(schedule, plan.images, ctx)
    if settings.batch_size is not None:  # the user's flag wins over the plan's batch
        chosen = dataclasses.replace(chosen, batch=settings.batch_size)
    # Shown once everything is checked and before the work, so that an interrupted run can be repeated.
    ctx.note(f"seed: {seeds[0]}" if len(seeds) == 1 else f"seed: {seeds[0]}..{seeds[-1]} (image i: seed + i)")
    ctx.note(chosen.describe())
    for adapter in ctx.loras:
        ctx.note(adapter.describe())
    with meter.phase("load"):
        step_cache = _step_cache(settings.step_cache, chosen, schedule, ctx)
        transformer, noise_scheduler = _load(
            chosen, schedule.scheduler, ctx, compiled=settings.compile, step_cache=step_cache
        )

    # 2. Denoise in batches of the memory plan's size
    with meter.phase("compute"):
        latents = _denoise_batches(transformer, noise_scheduler, embeddings, plan, chosen.batch, ctx)
    del transformer
    ctx.free()
    meter.finish(chosen.name, ctx.reports)
    check_finite(latents, ctx.dtype_name)

    # 3. The record of what made them: everything decode and a reader of the file need
    made = record.for_denoise(
        record.RunRecord.from_meta(embeddings.meta),
        ctx.model,
        ctx.dtype_name,
        settings.num_images,
        dataclasses.asdict(schedule),
        seeds,
        compiled=settings.compile,
        step_cache=step_cache,
        loras=lora.records(list(ctx.loras)),
        memory_plan=chosen.name,
        source_image=None if plan.init is None else record.source_image_of(plan.init.meta),
    )
    return staged.Latents(latents, record.latents_meta(made))


def _memory_plan(plan: Schedule, images: int, ctx: RunContext) -> memory.Plan:
    """Resident with the largest batch that fits, or streamed, from the transformer's size on the meta device."""
    from pixart_cli.models.facade import import_diffusers

    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d"
    ).PixArtTransformer2DModel
    source = ctx.model
    source.check_fit("transformer")
    config = source.config("transformer")
    skeleton = memory.meta_model(
        PixArtTransformer2DModel.from_config,
        config,
        ctx.dtype,
        cpu_buffers=True,
        where=config_where(source, "transformer"),
    )
    scale = source.vae_scale_factor * config.get("patch_size", 2)
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
    from pixart_cli.models import step_caching

    acting, note = step_caching.acting(step_cache, plan.steps_per_image, streamed=chosen.name == "streamed")
    if note is not None:
        ctx.note(note)
    return acting


def _load(
    chosen: memory.Plan, scheduler_name: str, ctx: RunContext, compiled: bool = False, step_cache: str | None = None
):
    """The transformer (resident or group-offloaded, LoRAs fused, an opt-in step cache hooked on) and the
    scheduler; nothing else."""
    import torch

    from pixart_cli.models import step_caching
    from pixart_cli.models.facade import make_scheduler

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


def _denoise_batches(transformer, noise_scheduler, embeddings: staged.Embeddings, plan: DenoisePlan, batch: int, ctx):
    """All images, ``batch`` at a time, each with its own CPU generator (seeds seed, seed+1, ...).

    Row r of the flat batch is image r % num_images of prompt r // num_images, as in the pipeline.
    """
    import torch

    from pixart_cli.models.sampling import sample_latents, start_from

    schedule, init, num_images = plan.schedule, plan.init, plan.settings.num_images
    total = plan.images
    rows = [index // num_images for index in range(total)]
    batches = math.ceil(total / batch)
    total_steps = batches * schedule.steps_per_image
    parts = []
    ctx.advance("denoise", 0, total_steps)
    with torch.inference_mode():
        for number, start in enumerate(range(0, total, batch)):
            picked = rows[start : start + batch]
            tensors = {key: value[picked].to(ctx.device) for key, value in embeddings.tensors().items()}
            generators = [torch.Generator("cpu").manual_seed(seed) for seed in plan.seeds[start : start + len(picked)]]

            def on_step(step: int, timestep, latents, done=number * schedule.steps_per_image) -> None:
                ctx.advance("denoise", done + step + 1, total_steps)

            # Image to image: the init latents noised to where the strength starts; the loop then runs the rest of
            # the schedule from them.
            begin = (
                None
                if init is None
                else start_from(
                    noise_scheduler,
                    schedule.steps,
                    schedule.timesteps,
                    schedule.strength,
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
                    num_inference_steps=None if schedule.timesteps else schedule.steps,
                    timesteps=schedule.timesteps,
                    guidance_scale=schedule.guidance_scale,
                    height=schedule.height,
                    width=schedule.width,
                    vae_scale_factor=ctx.model.vae_scale_factor,
                    generator=generators,
                    device=ctx.device,
                    callback=on_step,
                    start_latents=None if begin is None else begin.latents,
                    begin_index=0 if begin is None else begin.begin_index,
                ).cpu()
            )
    return torch.cat(parts)
