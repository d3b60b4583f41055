"""The `pixart` commands: parse options, call a stage function, print. No torch at import time."""

from __future__ import annotations

from typing import Optional

from pixart_cli import record
from pixart_cli.cli import options
from pixart_cli.cli.app import app
from pixart_cli.cli.edge import run_command
from pixart_cli.cli.output import Output, info_table
from pixart_cli.cli.prompts_file import read_prompts
from pixart_cli.errors import (
    PixartError,
    signals_deferred,
)


def _context(
    out: Output, model, device: str, dtype: str, budget: Optional[int], report_memory: bool, loras: tuple = ()
):
    """The one run context of a command: device and dtype resolved once, the parsed --vram budget, the model, the
    LoRAs, and the output sink's progress, notes and memory reports."""
    from pixart_cli.runtime import RunContext

    return RunContext.resolve(
        model,
        device,
        dtype,
        budget,
        progress=out.progress,
        log=out.note,
        reports=[] if report_memory else None,
        loras=loras,
    )


def _loras(values: Optional[list[str]]) -> tuple:
    """--lora values, parsed and read (each checked on its own; against the model later, before weights load)."""
    from pixart_cli.models.lora import parse_lora_spec, read_lora

    return tuple(read_lora(parse_lora_spec(value)) for value in values or ())


def _new_model(model: Optional[str], revision: Optional[str]):
    """--model (default: $PIXART_MODEL, else the default checkpoint) at --revision."""
    from pixart_cli.models.source import Model, default_model

    return Model(default_model() if model is None else model, revision)


def _check_common(device: str, dtype: str, vram: Optional[str]) -> Optional[int]:
    """Device and dtype words checked before torch loads (resolved later, once, in the run context); returns the
    parsed --vram budget in bytes (None: auto)."""
    from pixart_cli.models.memory import parse_vram
    from pixart_cli.runtime import check_device, check_dtype

    check_device(device)
    check_dtype(dtype)
    return parse_vram(vram)


def _targets(out: Output, output: str, count: int, kind: str, inputs: tuple = (), overwrite: bool = True) -> list:
    """Where the outputs go (artifacts owns the rule), checked before any work; the count is recorded so that a
    failure half-way can say how many were written."""
    from pixart_cli.files import output_paths

    targets = output_paths.output_targets(
        output, count, kind, inputs=inputs, overwrite=overwrite, allow_stdout=not out.as_json
    )
    out.planned = len(targets)
    return targets


def _write_images(out: Output, images: list, meta: dict, targets: list, overwrite: bool) -> None:
    from pixart_cli.files import image_io

    requests = [
        (path, image, *record.image_metadata(record.RunRecord.from_meta(meta), index))
        for index, (image, path) in enumerate(zip(images, targets))
    ]
    image_io.save_images(requests, overwrite, lambda index, path: out.wrote(path))


def _finish(out: Output, ctx) -> None:
    """After the work: the memory reports asked for with --report-memory."""
    _finish_reports(out, ctx.reports)


def _finish_reports(out: Output, reports: Optional[list]) -> None:
    if reports is not None:
        for report in reports:
            out.note(report.describe())
        out.record["memory"] = [report.as_dict() for report in reports]


@app.command(short_help="Prompts → embeddings.pt (loads only T5).")
def encode(
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
        budget = _check_common(device, dtype, vram)
        texts = read_prompts(prompts, prompts_file)
        settings = EncodeSettings(negative_prompt, max_sequence_length, clean_caption, text_encoder_precision, cache)
        (target,) = _targets(out, output, 1, "embeddings", overwrite=not no_overwrite)
        # 2. Resolve once, run, write
        ctx = _context(out, _new_model(model, revision), device, dtype, budget, report_memory)
        embeddings = encode(texts, settings, ctx)
        with signals_deferred():  # placed and reported together
            out.wrote(staged.save(target, embeddings, overwrite=not no_overwrite))
        _finish(out, ctx)

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
    init_latents: options.InitLatents = None,
    strength: options.Strength = None,
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
        from pixart_cli.models.source import model_for_file
        from pixart_cli.plan import plan_denoise
        from pixart_cli.settings import DenoiseSettings
        from pixart_cli.stages.denoise import denoise

        # 1. Every option and path, then the input files and the plan, before a model loads
        budget = _check_common(device, dtype, vram)
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
        )
        inputs = (embeddings,) if init_latents is None else (embeddings, init_latents)
        (target,) = _targets(out, output, 1, "latents", inputs, overwrite=not no_overwrite)
        loaded = staged.load_embeddings(embeddings)
        init = None if init_latents is None else staged.load_init_latents(init_latents)
        loras = _loras(lora)
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
        )
        # 2. Resolve once, run, write
        ctx = _context(out, source, device, dtype, budget, report_memory, loras)
        latents = denoise(loaded, planned, ctx)
        out.record["seeds"] = latents.meta["seeds"]
        with signals_deferred():  # placed and reported together
            out.wrote(staged.save(target, latents, overwrite=not no_overwrite))
        _finish(out, ctx)

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
        from pixart_cli.files import staged
        from pixart_cli.models.source import model_for_file
        from pixart_cli.plan import check_latents
        from pixart_cli.stages.decode import decode

        # 1. Every option and path, then the input file against the VAE's config, before a model loads
        budget = _check_common(device, dtype, vram)
        loaded = staged.load_latents(latents)
        targets = _targets(out, output, loaded.latents.shape[0], "image", (latents,), overwrite=not no_overwrite)
        source = model_for_file(model, revision, loaded.meta, latents)
        check_latents(loaded, source, str(latents), batch_size)
        # 2. Resolve once, run, write
        ctx = _context(out, source, device, dtype, budget, report_memory)
        images = decode(loaded, ctx, batch_size=batch_size)
        _write_images(out, images, loaded.meta, targets, not no_overwrite)
        _finish(out, ctx)

    run_command(out, work)


@app.command(short_help="Image → init.pt for image to image (loads only the VAE).")
def encode_image(
    image: options.ImageFile,
    output: options.InitLatentsOutput = "init.pt",
    model: options.Model = None,
    revision: options.Revision = None,
    width: options.ImageWidth = None,
    height: options.ImageHeight = None,
    no_binning: options.NoBinning = False,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Encode an image with the VAE encoder only → init.pt, for `pixart denoise --init-latents init.pt`. The image
    is resized and center-cropped to the size the transformer will run at (its trained bin)."""
    out = Output("encode-image", quiet, json)

    def work():
        from pixart_cli.files import image_io, staged
        from pixart_cli.plan import check_size_options, fit_image
        from pixart_cli.stages.encode_image import encode_image

        # 1. Every option and path, the image itself, then the sizes on the model's configs, before a model loads
        budget = _check_common(device, dtype, vram)
        check_size_options(width, height)
        (target,) = _targets(out, output, 1, "init latents", (image,), overwrite=not no_overwrite)
        source_image = image_io.read_source_image(image)
        source = _new_model(model, revision)
        sizes = fit_image(source_image, source, width, height, not no_binning)
        # 2. Resolve once, run, write
        ctx = _context(out, source, device, dtype, budget, report_memory)
        init = encode_image(source_image, sizes, ctx)
        with signals_deferred():  # placed and reported together
            out.wrote(staged.save(target, init, overwrite=not no_overwrite))
        _finish(out, ctx)

    run_command(out, work)


@app.command(short_help="Prompts → images: encode, denoise, decode in one process.")
def generate(
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
    image: options.Image = None,
    strength: options.Strength = None,
    cache: options.Cache = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    resume: options.Resume = False,
    ray: options.Ray = False,
    ray_address: options.RayAddress = None,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """encode → denoise → decode in one process, freeing each model before the next loads."""
    out = Output("generate", quiet, json)

    def work():
        from pixart_cli.files import image_io
        from pixart_cli.generate import generate
        from pixart_cli.plan import plan_run, with_init_size
        from pixart_cli.scale import job
        from pixart_cli.settings import DenoiseSettings, EncodeSettings

        # 1. Every option and path, before torch or a model loads
        budget = _check_common(device, dtype, vram)
        texts = read_prompts(prompts, prompts_file)
        encoding = EncodeSettings(negative_prompt, max_sequence_length, clean_caption, text_encoder_precision, cache)
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
        )
        # --resume skips the complete images that are there; only those it makes again must be new
        targets = _targets(
            out,
            output,
            len(texts) * num_images,
            "image",
            () if image is None else (image,),
            overwrite=not no_overwrite or resume,
        )
        if image is None:
            with_init_size(denoising, None, option="--image")  # --strength alone is refused here
        elif job.applies(output, resume, ray, ray_address):
            raise PixartError(
                "--image: image to image runs in one process only; write to a file, not -o DIR/, and "
                "leave out --resume and --ray"
            )
        source_image = None if image is None else image_io.read_source_image(image, "--image")
        source = _new_model(model, revision)
        loras = _loras(lora)
        if job.applies(output, resume, ray, ray_address):  # -o DIR/, several processes, --resume or --ray
            # The seed is agreed between processes there; each process resolves its own device.
            callbacks = job.Callbacks(out.wrote, out.note, out.progress, [] if report_memory else None)
            summary = job.generate_images(
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
            )
            if summary is not None:
                out.note(summary.describe(), summary=summary.as_dict())
            _finish_reports(out, callbacks.reports)
            return
        # 2. Plan the whole run, resolve once, run the three stages, write
        planned = plan_run(
            texts, encoding, denoising, source, image=source_image, loras=loras, decode_batch_size=batch_size
        )
        ctx = _context(out, source, device, dtype, budget, report_memory, loras)
        images, meta = generate(planned, ctx)
        out.record["seeds"] = meta["seeds"]
        _write_images(out, images, meta, targets, not no_overwrite)
        _finish(out, ctx)

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
            print(info_table(described), end="")

    run_command(out, work)


@app.command(short_help="Compare two embeddings, latents or image files.")
def compare(
    a: options.CompareFile,
    b: options.CompareFile,
    json: options.Json = False,
) -> None:
    """Compare two embeddings files, two latents files or two images: per prompt or image, cosine similarity and
    max / mean absolute difference; images also max / mean pixel difference and PSNR."""
    out = Output("compare", False, json)

    def work():
        from pixart_cli.files.compare import compare_files, format_table

        result = compare_files(a, b)
        out.record.update(result.as_dict())
        if not json:
            print(format_table(result), end="")

    run_command(out, work)
