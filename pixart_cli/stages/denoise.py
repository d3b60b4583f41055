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
from pixart_cli.models.source import load_component
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
    ``plan.control`` and ``plan.controlnet``: a ControlNet's control latents and its adapter file (checked against
    the model by the plan), read here and run beside the transformer, under the same memory plan.
    ``plan.mask``: inpainting's mask (the known region is kept after each step, and with --keep-unmasked the
    latents carry what decode pastes back). ``plan.schedule.pag_scale``: perturbed-attention guidance.
    """
    settings, schedule, seeds = plan.settings, plan.schedule, plan.seeds

    # 1. Pick a memory plan for the budget from the transformer's exact size, then load it and the scheduler only
    meter = ctx.meter("denoise")
    chosen = _memory_plan(schedule, plan.images, ctx, plan.controlnet)
    if settings.batch_size is not None:  # the user's flag wins over the plan's batch
        chosen = dataclasses.replace(chosen, batch=settings.batch_size)
    # Shown once everything is checked and before the work, so that an interrupted run can be repeated.
    ctx.note(f"seed: {seeds[0]}" if len(seeds) == 1 else f"seed: {seeds[0]}..{seeds[-1]} (image i: seed + i)")
    ctx.note(chosen.describe())
    for adapter in ctx.loras:
        ctx.note(adapter.describe())
    if plan.controlnet is not None:
        where = "streamed with the transformer" if chosen.name == "streamed" else "resident"
        ctx.note(f"{plan.controlnet.describe()}, {where}")
    if plan.mask is not None:
        coverage = float(plan.mask.mask.mean())
        ctx.note(
            f"denoise: inpainting {coverage:.0%} of the image (mask {plan.mask.meta['mask']['name']})"
            + (" (all white: the same as image to image)" if coverage == 1 else "")
        )
    with meter.phase("load"):
        step_cache = _step_cache(settings.step_cache, chosen, schedule, ctx)
        transformer, noise_scheduler = _load(
            chosen, schedule.scheduler, ctx, compiled=settings.compile, step_cache=step_cache, schedule=schedule
        )
        streamer = getattr(transformer, "_pixart_streamer", None)  # the streamed plan's block streamer
        controlnet = None
        if plan.controlnet is not None:
            transformer, controlnet = _controlled(transformer, plan, chosen, ctx)

    # 2. Denoise in batches of the memory plan's size
    with meter.phase("compute"):
        latents = _denoise_batches(transformer, noise_scheduler, embeddings, plan, chosen.batch, ctx)
    if streamer is not None:
        streamer.close()  # the prefetch of the next step's first block is still in flight
    del transformer, streamer
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
        **_control_record(plan, controlnet),
        inpainting=None if plan.mask is None else record.inpainting_of(plan.mask),
    )
    mask = plan.mask
    overlay = (None, None) if mask is None else (mask.overlay_image, mask.overlay_mask)
    return staged.Latents(latents, record.latents_meta(made), *overlay)


def _control_record(plan: DenoisePlan, controlnet: dict | None) -> dict:
    """What the outputs record of a ControlNet run: the control latents (their digest, and the edge map they came
    from), the adapter (``controlnet_file.ControlNetWeights.record``) and the scale; nothing without one."""
    if plan.controlnet is None:
        return {}
    control = {
        "image": record.source_image_of(plan.control.meta, "control_image"),
        "latents_sha256": staged.tensor_sha256(plan.control.latents),
    }
    return {"control": control, "controlnet": controlnet, "controlnet_scale": plan.controlnet.scale}


def _controlled(transformer, plan: DenoisePlan, chosen: memory.Plan, ctx: RunContext):
    """(the transformer with the ControlNet adapter, the adapter's record): the adapter read (checked again as it
    is read), cast to the run's dtype, and resident on the device or streamed with the transformer."""
    import torch

    from pixart_cli.models import controlnet

    weights = plan.controlnet.read(ctx.model)
    adapter = controlnet.build_adapter(weights, ctx.model, dtype=ctx.dtype)
    if chosen.name == "streamed":
        controlnet.stream_adapter(adapter, ctx.device)
    else:
        torch.nn.Module.to(adapter, ctx.device)
    return controlnet.controlled(transformer, adapter, None, plan.controlnet.scale), weights.record()


def _memory_plan(plan: Schedule, images: int, ctx: RunContext, checked=None) -> memory.Plan:
    """Resident with the largest batch that fits, or streamed with the largest batch that fits beside two blocks,
    from the transformer's size on the meta device (and a ControlNet adapter's, ``checked``: a
    ``controlnet_file.ControlNetFile``)."""
    from pixart_cli.models import transformer as dit

    source = ctx.model
    source.check_fit("transformer")
    config = source.config("transformer")
    skeleton = dit.skeleton(config, ctx.dtype)
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
        adapter_bytes=0 if checked is None else checked.parameter_bytes(ctx.dtype.itemsize),
        adapter_blocks=0 if checked is None else checked.num_blocks,
        pag=plan.pag_scale is not None,
        streamed_bytes=dit.streamed_bytes(skeleton),  # the streamed plan fuses LoRAs on the CPU
    )


def _step_cache(step_cache: str | None, chosen: memory.Plan, plan: Schedule, ctx: RunContext) -> str | None:
    """The step cache this run uses (recorded in the file): the one asked for, unless it cannot act here."""
    from pixart_cli.models import step_caching

    acting, note = step_caching.acting(step_cache, plan.steps_per_image, streamed=chosen.name == "streamed")
    if note is not None:
        ctx.note(note)
    return acting


def _load(
    chosen: memory.Plan,
    scheduler_name: str,
    ctx: RunContext,
    compiled: bool = False,
    step_cache: str | None = None,
    schedule: Schedule | None = None,
):
    """The transformer (resident or streamed block by block, LoRAs fused, PAG's attention processors set, an opt-in
    step cache hooked on) and the scheduler; nothing else."""
    import torch

    from pixart_cli.models import step_caching
    from pixart_cli.models.facade import make_scheduler

    PixArtTransformer2DModel = step_caching.transformer_class(step_cache is not None)

    source, device = ctx.model, ctx.device
    transformer = load_component(source, "transformer", PixArtTransformer2DModel.from_pretrained, dtype=ctx.dtype)
    if chosen.name == "streamed":
        # Below the transformer's own size: its blocks stay in pinned CPU memory and stream to the device as they
        # run, the next one's copy beside this one's compute (models/transformer.py); LoRAs fused on the CPU first.
        from pixart_cli.models.transformer import BlockStreamer

        lora.apply_loras(transformer, list(ctx.loras))
        transformer._pixart_streamer = BlockStreamer(transformer, device)
    else:
        # Read on the CPU, then moved: diffusers' device_map path goes through accelerate's dispatch, which imports
        # torch._dynamo, sympy and scipy (4.4 s of a 19 s denoise process on an H200, 2026-11-28), for a 1.2 GB
        # copy that takes a fraction of a second. torch's own .to: diffusers' override only adds checks for group
        # offloading (not used here) and imports the offloading hooks to make them, which import torch._dynamo.
        torch.nn.Module.to(transformer, device)
        lora.apply_loras(transformer, list(ctx.loras))
    transformer.eval()
    if schedule is not None and schedule.pag_scale is not None:  # PixArtSigmaPAGPipeline's _set_pag_attn_processor
        from pixart_cli.models import pag

        names = pag.apply(transformer, schedule.pag_layers, cfg=schedule.guidance_scale > 1)
        ctx.note(f"denoise: perturbed-attention guidance {schedule.pag_scale:g} on {pag.describe(names)}")
    if step_cache is not None:
        step_caching.enable(transformer, step_cache, compiled=compiled and chosen.name != "streamed")
    if compiled:
        if chosen.name == "streamed":
            ctx.note("--compile: ignored under the streamed plan (its blocks move between devices each step)")
        else:
            # Regional: the 28 blocks run one code, traced and compiled once and reused by each block (diffusers'
            # compile_repeated_blocks; PixArt's class names no repeated blocks), not the whole model. Inductor
            # keeps what it compiles under the user's cache folder (process.compile_cache), so a later process
            # with the same model config, shapes, dtype, torch and GPU loads it instead of compiling again.
            for block in transformer.transformer_blocks:
                block.compile()
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

    from pixart_cli.models.sampling import Known, sample_latents, start_from

    schedule, init, control, num_images = plan.schedule, plan.init, plan.control, plan.settings.num_images
    mask = None if plan.mask is None else plan.mask.mask.to(ctx.device, ctx.dtype)
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
            if control is not None:  # one row steers every image; else image i's own (doubled under guidance)
                rows_picked = [0] * len(picked) if len(control.latents) == 1 else slice(start, start + len(picked))
                transformer.set_control(control.latents[rows_picked].to(ctx.device))

            def on_step(step: int, timestep, latents, done=number * schedule.steps_per_image) -> None:
                ctx.advance("denoise", done + step + 1, total_steps)

            # Image to image: the init latents noised to where the strength starts; the loop then runs the rest of
            # the schedule from them. Inpainting keeps them, noised with the same noise, outside the mask.
            begin = known = None
            if init is not None:
                rows_init = init.latents[
                    [0] * len(picked) if len(init.latents) == 1 else slice(start, start + len(picked))
                ]
                begin = start_from(
                    noise_scheduler,
                    schedule.steps,
                    schedule.timesteps,
                    schedule.strength,
                    rows_init,
                    generators,
                    ctx.device,
                    ctx.dtype,
                )
                if mask is not None:
                    known = Known(rows_init.to(ctx.device, ctx.dtype), begin.noise, mask)
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
                    known=known,
                    pag_scale=0.0 if schedule.pag_scale is None else schedule.pag_scale,
                ).cpu()
            )
    return torch.cat(parts)
