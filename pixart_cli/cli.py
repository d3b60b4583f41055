"""The `pixart` command: parse options, call a stage function, print. No torch at import time."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Optional

import typer

from pixart_cli import __version__, options
from pixart_cli.errors import EXIT_RUNTIME, EXIT_SIGINT, EXIT_SIGTERM, PixartError, detail
from pixart_cli.output import Output

app = typer.Typer(
    name="pixart",
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Run PixArt text-to-image models in memory-staged steps: encode (T5) → denoise (transformer) → "
         "decode (VAE). Each stage loads only its own model. stdout carries only the written paths.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


class _Terminated(BaseException):
    """SIGTERM, raised inside the work so that temp files are cleaned up on the way out."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _run(out: Output, work: Callable[[], None], quantized: bool = False) -> None:
    """Run one command's work; turn every failure into one line and an exit code (traceback: PIXART_DEBUG=1)."""
    debug = os.environ.get("PIXART_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    from pixart_cli import runtime

    runtime.quiet_libraries()
    runtime.lean_imports(quantized)
    try:
        work()
    except (Exception, KeyboardInterrupt, _Terminated) as error:  # the edge: one line, not a traceback
        code, message = _failure(error)
        if debug:
            traceback.print_exception(error)
        out.error(message, code)
        raise typer.Exit(code) from None
    out.close()


def _failure(error: BaseException) -> tuple[int, str]:
    """Exit code and one-line message for any failure."""
    if isinstance(error, PixartError):
        return error.exit_code, str(error)
    if isinstance(error, KeyboardInterrupt):
        return EXIT_SIGINT, "interrupted; no output was written"
    if isinstance(error, _Terminated):
        return EXIT_SIGTERM, "terminated; no output was written"
    return EXIT_RUNTIME, _unexpected(error)


def _unexpected(error: Exception) -> str:
    torch = sys.modules.get("torch")  # an out-of-memory error means torch is loaded; never import it here
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return ("out of device memory; pass a smaller --vram budget (for example --vram 4GB), use --dtype fp16, "
                "or --device cpu")
    return f"{type(error).__name__}: {detail(error)} (run with PIXART_DEBUG=1 for the traceback)"


def _context(out: Output, model, device: str, dtype: str, budget: Optional[int], report_memory: bool,
             loras: tuple = ()):
    """The one run context of a command: device and dtype resolved once, the parsed --vram budget, the model, the
    LoRAs, and the output sink's progress, notes and memory reports."""
    from pixart_cli.runtime import RunContext

    return RunContext.resolve(model, device, dtype, budget, progress=out.progress, log=out.note,
                              reports=[] if report_memory else None, loras=loras)


def _loras(values: Optional[list[str]]) -> tuple:
    """--lora values, parsed and read (each checked on its own; against the model later, before weights load)."""
    from pixart_cli.lora import parse_lora_spec, read_lora

    return tuple(read_lora(parse_lora_spec(value)) for value in values or ())


def _new_model(model: Optional[str], revision: Optional[str]):
    """--model (default: $PIXART_MODEL, else the default checkpoint) at --revision."""
    from pixart_cli.models import Model, default_model

    return Model(default_model() if model is None else model, revision)


def _check_common(device: str, dtype: str, vram: Optional[str]) -> Optional[int]:
    """Device and dtype words checked before torch loads (resolved later, once, in the run context); returns the
    parsed --vram budget in bytes (None: auto)."""
    from pixart_cli.memory import parse_vram
    from pixart_cli.runtime import check_device, check_dtype

    check_device(device)
    check_dtype(dtype)
    return parse_vram(vram)


def _write_images(out: Output, images: list, meta: dict, output: Path) -> None:
    from pixart_cli import artifacts

    for index, (image, path) in enumerate(zip(images, artifacts.output_paths(output, len(images)))):
        parameters, settings = artifacts.image_metadata(meta, index)
        out.wrote(artifacts.save_image(path, image, parameters, settings))


def _check_image_outputs(output: Path, count: int, inputs: tuple[Path, ...] = (), overwrite: bool = True) -> None:
    from pixart_cli import artifacts

    for path in artifacts.output_paths(output, count):
        artifacts.require_writable(path, "--output", inputs, overwrite)


def _prompts(prompts: Optional[list[str]], prompts_file: Optional[Path]) -> list[str]:
    """PROMPT arguments, then the lines of --prompts-file (``-``: stdin)."""
    from pixart_cli.settings import check_prompts

    collected = list(prompts or [])
    if prompts_file is not None:
        try:
            text = sys.stdin.read() if str(prompts_file) == "-" else prompts_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PixartError(f"--prompts-file {prompts_file}: cannot read it ({error.__class__.__name__}: "
                              f"{getattr(error, 'strerror', None) or error})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise PixartError(f"--prompts-file {prompts_file}: holds no prompts; write one prompt per line")
        collected += lines
    return check_prompts(collected)


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
    output: options.EmbeddingsOutput = Path("embeddings.pt"),
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
        from pixart_cli import artifacts
        from pixart_cli.encode import encode
        from pixart_cli.settings import EncodeSettings

        # 1. Every option and path, before torch or a model loads
        budget = _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
        settings = EncodeSettings(negative_prompt, max_sequence_length, clean_caption, text_encoder_precision, cache)
        artifacts.require_writable(output, "--output", overwrite=not no_overwrite)
        # 2. Resolve once, run, write
        ctx = _context(out, _new_model(model, revision), device, dtype, budget, report_memory)
        out.wrote(artifacts.save(output, encode(texts, settings, ctx)))
        _finish(out, ctx)

    _run(out, work, quantized=text_encoder_precision != "full")


@app.command(short_help="embeddings.pt → latents.pt (loads only the transformer).")
def denoise(
    embeddings: options.EmbeddingsFile,
    output: options.LatentsOutput = Path("latents.pt"),
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
        from pixart_cli import artifacts
        from pixart_cli.denoise import denoise
        from pixart_cli.models import model_for_file
        from pixart_cli.settings import DenoiseSettings

        # 1. Every option and path, then the input file, before a model loads
        budget = _check_common(device, dtype, vram)
        settings = DenoiseSettings(steps, guidance_scale, seed, width, height, not no_binning, num_images, scheduler,
                                   batch_size, compile, strength).with_seed()
        inputs = (embeddings,) if init_latents is None else (embeddings, init_latents)
        artifacts.require_writable(output, "--output", inputs, overwrite=not no_overwrite)
        loaded = artifacts.load_embeddings(embeddings)
        init = None if init_latents is None else artifacts.load_init_latents(init_latents)
        loras = _loras(lora)
        # 2. Resolve once, run, write
        ctx = _context(out, model_for_file(model, revision, loaded.meta), device, dtype, budget, report_memory,
                       loras)
        latents = denoise(loaded, settings, ctx, source_path=str(embeddings), init=init, init_path=str(init_latents))
        out.record["seeds"] = latents.meta["seeds"]
        out.wrote(artifacts.save(output, latents))
        _finish(out, ctx)

    _run(out, work)


@app.command(short_help="latents.pt → images (loads only the VAE).")
def decode(
    latents: options.LatentsFile,
    output: options.ImageOutput = Path("image.png"),
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
        from pixart_cli import artifacts
        from pixart_cli.decode import decode
        from pixart_cli.models import model_for_file

        budget = _check_common(device, dtype, vram)
        loaded = artifacts.load_latents(latents)
        _check_image_outputs(output, loaded.latents.shape[0], (latents,), overwrite=not no_overwrite)
        ctx = _context(out, model_for_file(model, revision, loaded.meta), device, dtype, budget, report_memory)
        images = decode(loaded, ctx, batch_size=batch_size, source_path=str(latents))
        _write_images(out, images, loaded.meta, output)
        _finish(out, ctx)

    _run(out, work)


@app.command(short_help="Image → init.pt for image to image (loads only the VAE).")
def encode_image(
    image: options.ImageFile,
    output: options.InitLatentsOutput = Path("init.pt"),
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
        from pixart_cli import artifacts, img2img

        # 1. Every option and path, the image itself, then the sizes on the model's configs, before a model loads
        budget = _check_common(device, dtype, vram)
        artifacts.require_writable(output, "--output", (image,), overwrite=not no_overwrite)
        source_image = artifacts.read_source_image(image)
        source = _new_model(model, revision)
        img2img.fit(source_image, source, width, height, not no_binning)
        # 2. Resolve once, run, write
        ctx = _context(out, source, device, dtype, budget, report_memory)
        out.wrote(artifacts.save(output, img2img.encode_image(source_image, ctx, width, height, not no_binning)))
        _finish(out, ctx)

    _run(out, work)


@app.command(short_help="Prompts → images: encode, denoise, decode in one process.")
def generate(
    prompts: options.Prompts = None,
    prompts_file: options.PromptsFile = None,
    output: options.ImageOutput = Path("image.png"),
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
        from pixart_cli import artifacts, scaleout
        from pixart_cli.generate import generate
        from pixart_cli.settings import DenoiseSettings, EncodeSettings

        # 1. Every option and path, before torch or a model loads
        budget = _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
        encoding = EncodeSettings(negative_prompt, max_sequence_length, clean_caption, text_encoder_precision, cache)
        denoising = DenoiseSettings(steps, guidance_scale, seed, width, height, not no_binning, num_images,
                                    scheduler, batch_size, compile, strength)
        inputs = () if image is None else (image,)
        _check_image_outputs(output, len(texts) * num_images, inputs, overwrite=not no_overwrite)
        source_image = None if image is None else artifacts.read_source_image(image, "--image")
        source = _new_model(model, revision)
        loras = _loras(lora)
        scaled_out = scaleout.applies(output, resume, ray, ray_address)
        if scaled_out and image is not None:
            raise PixartError("--image: image to image runs in one process only; write to a file, not -o DIR/, and "
                              "leave out --resume and --ray")
        if scaled_out:  # -o DIR/, several processes, --resume or --ray
            # The seed is agreed between processes there; each process resolves its own device.
            callbacks = scaleout.Callbacks(out.wrote, out.note, out.progress, [] if report_memory else None)
            summary = scaleout.generate_images(
                texts, output=output, encoding=encoding, denoising=denoising, model=source,
                run=scaleout.RunOptions(device, dtype, budget, loras), resume=resume, callbacks=callbacks, ray=ray,
                ray_address=ray_address)
            if summary is not None:
                out.note(summary.describe(), summary=summary.as_dict())
            _finish_reports(out, callbacks.reports)
            return
        # 2. Resolve once, run the three stages, write
        ctx = _context(out, source, device, dtype, budget, report_memory, loras)
        images, meta = generate(texts, encoding, denoising.with_seed(), ctx, decode_batch_size=batch_size,
                                image=source_image)
        out.record["seeds"] = meta["seeds"]
        _write_images(out, images, meta, output)
        _finish(out, ctx)

    _run(out, work, quantized=text_encoder_precision != "full")


@app.command(short_help="What a .pt file or a pixart image holds.")
def info(
    file: options.InfoFile,
    json: options.InfoJson = False,
) -> None:
    """Show what a .pt file or an image made by pixart holds: tensors, prompts, seeds, settings."""
    out = Output("info", False, json)

    def work():
        from pixart_cli import artifacts

        described = artifacts.describe(file)
        out.record.update(described)
        if not json:
            print(_info_table(described), end="")

    _run(out, work)


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
        from pixart_cli.compare import compare_files, format_table

        result = compare_files(a, b)
        out.record.update(result.as_dict())
        if not json:
            print(format_table(result), end="")

    _run(out, work)


def _info_table(described: dict) -> str:
    """Aligned `key  value` lines for people."""
    rows = [("file", described["file"]), ("kind", described["kind"])]
    for key, tensor in described.get("tensors", {}).items():
        rows.append((key, f"{tensor['dtype']} {tensor['shape']}"))
    if described["kind"] == "image":
        rows += [("format", described["format"]), ("size", "x".join(map(str, described["size"])))]
        if described["parameters"]:
            rows.append(("parameters", described["parameters"].replace("\n", " | ")))
    settings = described.get("meta") or described.get("settings") or {}
    rows += [(key, settings[key]) for key in sorted(settings)]
    width = max(len(key) for key, _ in rows)
    return "".join(f"{key:<{width}}  {value}\n" for key, value in rows)


def _version(value: bool) -> None:
    if value:
        print(f"pixart-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Run PixArt text-to-image models in memory-staged steps."""


def main() -> None:
    """Console-script entry point."""
    app(prog_name="pixart")


if __name__ == "__main__":
    sys.exit(main())
