"""The `pixart` commands: parse options, call a stage function, print. No torch at import time.

Each command is the same recipe: 1. every option, path and input file checked, and the run planned, before a
model loads; 2. the run context resolved once; 3. the stage run; 4. the outputs written and reported.
"""

from __future__ import annotations

import typer

from pixart_cli.cli import conditioning_options as conditioning
from pixart_cli.cli import convert_command, image_commands, options, scale_options, shared
from pixart_cli.cli.app import app
from pixart_cli.cli.edge import run_command
from pixart_cli.cli.output import Output, info_table
from pixart_cli.cli.prompts_file import read_prompts
from pixart_cli.errors import PixartError
from pixart_cli.signals import GUARD


@app.command(short_help="Prompts → embeddings.pt (loads only T5).")
def encode(
    context: typer.Context,
    prompts: options.Prompts = None,
    prompts_file: options.PromptsFile = None,
    output: options.EmbeddingsOutput = "embeddings.pt",
    negative_prompt: options.NegativePrompt = "",
    model: options.Model = None,
    revision: options.Revision = None,
    max_sequence_length: options.MaxSequenceLength = None,
    clean_caption: options.CleanCaption = True,
    text_encoder_precision: options.TextEncoderPrecision = "full",
    cache: options.Cache = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Encode prompts with the T5 text encoder only → embeddings.pt."""
    out = Output("encode", quiet, json)

    def work():
        from pixart_cli.files import staged
        from pixart_cli.settings import EncodeSettings
        from pixart_cli.stages.encode import encode

        # 1. Every option and path, before torch or a model loads
        budget = shared.check_common(device, dtype, vram)
        texts = read_prompts(prompts, prompts_file, out.note)
        shared.note_unquoted(out, prompts)
        settings = EncodeSettings(
            negative_prompt,
            max_sequence_length,
            clean_caption,
            text_encoder_precision,
            cache,
            shared.option_source(context, "cache", "--cache", "PIXART_CACHE"),
        )
        (target,) = shared.targets(out, output, 1, "embeddings", overwrite=not no_overwrite)
        # 2. Resolve once, run, write
        ctx = shared.context(out, shared.new_model(model, revision), device, dtype, budget, report_memory)
        embeddings = encode(texts, settings, ctx)
        with GUARD.deferred():  # placed and reported together
            out.wrote(staged.save(target, embeddings, overwrite=not no_overwrite))
        shared.finish(out, ctx)

    run_command(out, work, quantized=text_encoder_precision != "full")


@app.command(short_help="embeddings.pt → latents.pt (loads only the transformer).")
def denoise(
    embeddings: options.EmbeddingsFile,
    output: options.LatentsOutput = "latents.pt",
    model: options.ModelFromFile = None,
    revision: options.Revision = None,
    steps: options.Steps = None,
    guidance_scale: options.GuidanceScale = None,
    seed: options.Seed = None,
    width: options.Width = None,
    height: options.Height = None,
    no_binning: options.NoBinning = False,
    num_images: options.NumImages = 1,
    scheduler: options.Scheduler = None,
    batch_size: options.DenoiseBatchSize = None,
    compile: options.Compile = False,
    step_cache: options.StepCache = None,
    lora: options.Lora = None,
    init_latents: conditioning.InitLatents = None,
    strength: conditioning.Strength = None,
    mask: conditioning.Mask = None,
    mask_blur: conditioning.MaskBlur = None,
    keep_unmasked: conditioning.KeepUnmasked = None,
    pag_scale: conditioning.PagScale = None,
    pag_layers: conditioning.PagLayers = None,
    control: conditioning.Control = None,
    controlnet: conditioning.ControlNet = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Denoise with the transformer and scheduler only → latents.pt."""
    out = Output("denoise", quiet, json)

    def work():
        from pixart_cli.files import staged
        from pixart_cli.files.stdin import check_one_stdin
        from pixart_cli.generate import with_mask
        from pixart_cli.models.source import model_for_file
        from pixart_cli.plan import plan_denoise
        from pixart_cli.settings import DenoiseSettings, MaskSettings
        from pixart_cli.stages.denoise import denoise

        # 1. Every option and path, then the input files and the plan, before a model loads
        budget = shared.check_common(device, dtype, vram)
        settings = DenoiseSettings(
            steps,
            guidance_scale,
            seed,
            width,
            height,
            not no_binning,
            num_images,
            scheduler,
            batch_size,
            compile,
            strength,
            step_cache,
            pag_scale,
            shared.pag_layers(pag_layers),
        )
        check_one_stdin(
            ("EMBEDDINGS", embeddings), ("--init-latents", init_latents), ("--control", control), ("--mask", mask)
        )
        masking = MaskSettings(mask_blur, keep_unmasked)
        spec = shared.controlnet(controlnet)
        inputs = tuple(path for path in (embeddings, init_latents, control, mask) if path is not None)
        inputs += () if spec is None else (str(spec.path),)
        (target,) = shared.targets(out, output, 1, "latents", inputs, overwrite=not no_overwrite)
        loaded = staged.load_embeddings(embeddings)
        init = None if init_latents is None else staged.load_init_latents(init_latents)
        conditioning = None if control is None else staged.load_control(control)
        loras = shared.loras(lora)
        source = model_for_file(model, revision, loaded.meta, embeddings)
        planned = plan_denoise(
            settings,
            source,
            loaded.prompt_embeds.shape[0],
            embedding_width=loaded.prompt_embeds.shape[-1],
            embeddings_name=str(embeddings),
            init=init,
            init_name="--init-latents" if init_latents is None else str(init_latents),
            loras=loras,
            control=conditioning,
            control_name="--control" if control is None else str(control),
            controlnet=spec,
            **shared.mask_args(mask, masking),
        )
        # 2. Resolve once, run, write
        ctx = shared.context(out, source, device, dtype, budget, report_memory, loras)
        latents = denoise(loaded, with_mask(planned, ctx), ctx)
        out.record["seeds"] = latents.meta["seeds"]
        with GUARD.deferred():  # placed and reported together
            out.wrote(staged.save(target, latents, overwrite=not no_overwrite))
        shared.finish(out, ctx)

    run_command(out, work)


@app.command(short_help="latents.pt → images (loads only the VAE).")
def decode(
    latents: options.LatentsFile,
    output: options.ImageOutput = "image.png",
    model: options.ModelFromFile = None,
    revision: options.Revision = None,
    batch_size: options.DecodeBatchSize = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Decode latents with the VAE only → image.png (.jpg and .webp work too)."""
    out = Output("decode", quiet, json)

    def work():
        from pixart_cli.conditioning import check_latents
        from pixart_cli.files import staged
        from pixart_cli.models.source import model_for_file
        from pixart_cli.stages.decode import decode

        # 1. Every option and path, then the input file against the VAE's config, before a model loads
        budget = shared.check_common(device, dtype, vram)
        loaded = staged.load_latents(latents)
        targets = shared.targets(out, output, loaded.latents.shape[0], "image", (latents,), overwrite=not no_overwrite)
        source = model_for_file(model, revision, loaded.meta, latents)
        check_latents(loaded, source, str(latents), batch_size)
        # 2. Resolve once, run, write
        ctx = shared.context(out, source, device, dtype, budget, report_memory)
        images = decode(loaded, ctx, batch_size=batch_size)
        shared.write_images(out, images, loaded.meta, targets, not no_overwrite)
        shared.finish(out, ctx)

    run_command(out, work)


app.command(short_help="Image → init.pt for image to image (loads only the VAE).")(image_commands.encode_image)
app.command(short_help="Edge map → control.pt for a ControlNet (loads only the VAE).")(image_commands.encode_control)


app.command(short_help="Mask image → mask.pt for inpainting (loads no model).")(image_commands.encode_mask)


@app.command(short_help="Prompts → images: encode, denoise, decode in one process.")
def generate(
    context: typer.Context,
    prompts: options.Prompts = None,
    prompts_file: options.PromptsFile = None,
    output: options.ImageOutput = "image.png",
    negative_prompt: options.NegativePrompt = "",
    model: options.Model = None,
    revision: options.Revision = None,
    steps: options.Steps = None,
    guidance_scale: options.GuidanceScale = None,
    seed: options.Seed = None,
    width: options.Width = None,
    height: options.Height = None,
    no_binning: options.NoBinning = False,
    num_images: options.NumImages = 1,
    max_sequence_length: options.MaxSequenceLength = None,
    clean_caption: options.CleanCaption = True,
    text_encoder_precision: options.TextEncoderPrecision = "full",
    scheduler: options.Scheduler = None,
    batch_size: options.GenerateBatchSize = None,
    compile: options.Compile = False,
    step_cache: options.StepCache = None,
    lora: options.Lora = None,
    image: conditioning.Image = None,
    strength: conditioning.Strength = None,
    mask: conditioning.Mask = None,
    mask_blur: conditioning.MaskBlur = None,
    keep_unmasked: conditioning.KeepUnmasked = None,
    pag_scale: conditioning.PagScale = None,
    pag_layers: conditioning.PagLayers = None,
    control_image: conditioning.ControlImage = None,
    controlnet: conditioning.ControlNet = None,
    cache: options.Cache = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    resume: scale_options.Resume = False,
    ray: scale_options.Ray = False,
    ray_address: scale_options.RayAddress = None,
    devices: scale_options.Devices = None,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """encode → denoise → decode in one process, freeing each model before the next loads."""
    out = Output("generate", quiet, json)

    def work():
        from pixart_cli import process
        from pixart_cli.files import image_io
        from pixart_cli.files.stdin import check_one_stdin
        from pixart_cli.generate import generate
        from pixart_cli.plan import check_mask_options, plan_run, with_init_size
        from pixart_cli.scale import job, launch, run
        from pixart_cli.scale.devices import parse_devices
        from pixart_cli.settings import DenoiseSettings, EncodeSettings, MaskSettings

        # 1. Every option and path, before torch or a model loads
        budget = shared.check_common(device, dtype, vram)
        spread = parse_devices(devices)
        if spread is not None and device != "auto":
            raise PixartError(f"--device {device}: --devices names the devices already; give one of the two")
        check_one_stdin(("PROMPT", shared.stdin_prompt(prompts)), ("--prompts-file", prompts_file), ("--image", image))
        texts = read_prompts(prompts, prompts_file, out.note)
        shared.note_unquoted(out, prompts)
        encoding = EncodeSettings(
            negative_prompt,
            max_sequence_length,
            clean_caption,
            text_encoder_precision,
            cache,
            shared.option_source(context, "cache", "--cache", "PIXART_CACHE"),
        )
        denoising = DenoiseSettings(
            steps,
            guidance_scale,
            seed,
            width,
            height,
            not no_binning,
            num_images,
            scheduler,
            batch_size,
            compile,
            strength,
            step_cache,
            pag_scale,
            shared.pag_layers(pag_layers),
        )
        masking = MaskSettings(mask_blur, keep_unmasked)
        spec = shared.controlnet(controlnet)
        inputs = tuple(path for path in (image, mask, control_image) if path is not None)
        inputs += () if spec is None else (str(spec.path),)
        # --resume skips the complete images that are there; only those it makes again must be new
        targets = shared.targets(
            out, output, len(texts) * num_images, "image", inputs, overwrite=not no_overwrite or resume
        )
        if image is None:
            with_init_size(denoising, None, option="--image")  # --strength alone is refused here
            check_mask_options(mask, masking, False, "--image", mask)  # and --mask, --mask-blur, --keep-unmasked
        one_process = {"--image": image, "--control-image": control_image, "--controlnet": controlnet}
        given = [flag for flag, value in one_process.items() if value is not None]
        if given and launch.applies(output, resume, ray, ray_address, spread is not None):
            what = "image to image runs" if given[0] == "--image" else "a ControlNet runs"
            raise PixartError(
                f"{given[0]}: {what} in one process only; write to a file, not -o DIR/, and leave out --resume "
                "and --ray"
            )
        source_image = None if image is None else image_io.read_source_image(image, "--image")
        edges = None if control_image is None else image_io.read_source_image(control_image, "--control-image")
        source = shared.new_model(model, revision)
        loras = shared.loras(lora)
        if launch.applies(
            output, resume, ray, ray_address, spread is not None
        ):  # -o DIR/, several processes, --resume or --ray
            # The seed is agreed between processes there; each process resolves its own device.
            callbacks = job.Callbacks(out.wrote, out.note, out.progress, [] if report_memory else None, process.settle)
            summary = run.generate_images(
                texts,
                output=output,
                encoding=encoding,
                denoising=denoising,
                model=source,
                run=job.RunOptions(device, dtype, budget, loras),
                resume=resume,
                callbacks=callbacks,
                ray=ray,
                ray_address=ray_address,
                overwrite=not no_overwrite,
                devices=spread,
            )
            if summary is not None:
                out.note(summary.describe(), summary=summary.as_dict())
            shared.finish_reports(out, callbacks.reports)
            return
        # 2. Plan the whole run, resolve once, run the three stages, write
        planned = plan_run(
            texts,
            encoding,
            denoising,
            source,
            image=source_image,
            loras=loras,
            decode_batch_size=batch_size,
            control_image=edges,
            controlnet=spec,
            **shared.mask_args(mask, masking),
        )
        ctx = shared.context(out, source, device, dtype, budget, report_memory, loras)
        images, meta = generate(planned, ctx)
        out.record["seeds"] = meta["seeds"]
        shared.write_images(out, images, meta, targets, not no_overwrite)
        shared.finish(out, ctx)

    run_command(out, work, quantized=text_encoder_precision != "full")


@app.command(short_help="What a .pt file or a pixart image holds.")
def info(
    file: options.InfoFile,
    json: options.InfoJson = False,
) -> None:
    """Show what a .pt file or an image made by pixart holds: tensors, prompts, seeds, settings."""
    out = Output("info", False, json)

    def work():
        from pixart_cli.files import staged

        described = staged.describe(file)
        out.record.update(described)
        if not json:
            out.text(info_table(described))

    run_command(out, work)


@app.command(short_help="Compare two embeddings, latents or image files.")
def compare(
    a: options.CompareA,
    b: options.CompareB,
    json: options.CompareJson = False,
) -> None:
    """Compare two embeddings files, two latents files or two images: per prompt or image, cosine similarity and
    max / mean absolute difference; images also max / mean pixel difference and PSNR."""
    out = Output("compare", False, json)

    def work():
        from pixart_cli.files.compare import compare_files, format_table
        from pixart_cli.files.stdin import check_one_stdin

        check_one_stdin(("A", a), ("B", b))
        result = compare_files(a, b)
        out.record.update(result.as_dict())
        if not json:
            out.text(format_table(result))

    run_command(out, work)


app.command(short_help="Model → a local fp16 (or bf16) copy of it, a diffusers folder.")(convert_command.convert)
