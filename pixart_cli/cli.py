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
from pixart_cli.errors import (
    EXIT_RUNTIME,
    EXIT_SIGINT,
    EXIT_SIGTERM,
    PixartError,
    Terminated,
    detail,
    ignore_signals,
    leave,
    on_signal,
    signals_deferred,
    stopped,
)
from pixart_cli.output import Output, printable

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


def install_signal_handlers() -> None:
    """The first SIGINT/SIGTERM stops the work; later ones are ignored (errors.on_signal)."""
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)


class _Outcome:
    """What the command's work came to, for main(): a signal after the work completed interrupts nothing, and
    a failure already given its line must not get a second."""

    completed = False
    reported = False


def _run(out: Output, work: Callable[[], None], quantized: bool = False) -> None:
    """Run one command's work; turn every failure into one line and an exit code (traceback: PIXART_DEBUG=1)."""
    debug = os.environ.get("PIXART_DEBUG") == "1"
    from pixart_cli import runtime

    runtime.quiet_libraries()
    runtime.lean_imports(quantized)
    try:
        work()
        out.close()
        _Outcome.completed = True
    except (Exception, KeyboardInterrupt, Terminated) as error:  # the edge: one line, not a traceback
        planned, written = getattr(out, "planned", None), out.record["outputs"]
        if isinstance(error, (KeyboardInterrupt, Terminated)) and _all_written(written, planned):
            # every output is in place and reported: the signal came too late to interrupt anything
            out.note("interrupted after every output was written; nothing is missing")
            out.close()
            _Outcome.completed = True
            return
        code, message = _failure(error, written, planned)
        if debug:
            traceback.print_exception(error)
        out.error(message, code)
        _Outcome.reported = True
        raise typer.Exit(code) from None


def _all_written(written: list[str], planned: int | None) -> bool:
    return bool(planned) and len(written) >= planned


def _failure(error: BaseException, written: list[str] = (), planned: int | None = None) -> tuple[int, str]:
    """Exit code and one-line message for any failure, saying truthfully which outputs were written before it."""
    if isinstance(error, KeyboardInterrupt):
        code, message = EXIT_SIGINT, "interrupted"
    elif isinstance(error, Terminated):
        code, message = EXIT_SIGTERM, "terminated"
    elif isinstance(error, PixartError):
        code, message = error.exit_code, str(error)
    elif isinstance(error, OSError) and error.strerror:  # a full disk, a vanished folder: the file is named
        code, message = EXIT_RUNTIME, f"cannot write {error.filename or 'an output'} ({error.strerror})"
    else:
        code, message = EXIT_RUNTIME, _unexpected(error)
    if not written:
        if code in (EXIT_SIGINT, EXIT_SIGTERM):
            message += "; no output was written"
        return code, message
    if _all_written(written, planned):
        return code, f"{message}; all {len(written)} outputs had been written (listed on stdout)"
    of = f" of {planned}" if planned else ""
    names = ", ".join(written) if len(written) <= 3 else f"{written[0]} ... {written[-1]}"
    return (
        code,
        f"{message}; {len(written)}{of} outputs had been written ({names}; listed on stdout), the rest were not",
    )


def _unexpected(error: Exception) -> str:
    torch = sys.modules.get("torch")  # an out-of-memory error means torch is loaded; never import it here
    if torch is not None and isinstance(error, torch.OutOfMemoryError):
        return (
            "out of device memory; pass a smaller --vram budget (for example --vram 4GB), use --dtype fp16, "
            "or --device cpu"
        )
    return f"{type(error).__name__}: {detail(error)} (run with PIXART_DEBUG=1 for the traceback)"


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


def _targets(out: Output, output: str, count: int, kind: str, inputs: tuple = (), overwrite: bool = True) -> list:
    """Where the outputs go (artifacts owns the rule), checked before any work; the count is recorded so that a
    failure half-way can say how many were written."""
    from pixart_cli import artifacts

    targets = artifacts.output_targets(
        output, count, kind, inputs=inputs, overwrite=overwrite, allow_stdout=not out.as_json
    )
    out.planned = len(targets)
    return targets


def _write_images(out: Output, images: list, meta: dict, targets: list, overwrite: bool) -> None:
    from pixart_cli import artifacts

    requests = [
        (path, image, *artifacts.image_metadata(meta, index))
        for index, (image, path) in enumerate(zip(images, targets))
    ]
    artifacts.save_images(requests, overwrite, lambda index, path: out.wrote(path))


def _prompts(prompts: Optional[list[str]], prompts_file: Optional[str]) -> list[str]:
    """PROMPT arguments, then the lines of --prompts-file (``-``: stdin)."""
    from pixart_cli.settings import check_prompts

    collected = list(prompts or [])
    if prompts_file == "":
        raise PixartError("--prompts-file: the path is empty; give a file of prompts, one per line (- reads stdin)")
    if prompts_file == "-":
        from pixart_cli.scaleout import Ranks

        world_size = Ranks.from_env().world_size
        if world_size > 1:
            raise PixartError(
                f"--prompts-file -: standard input reaches only one of the WORLD_SIZE={world_size} processes; "
                "save the prompts to a file and give its path"
            )
    if prompts_file is not None:
        try:
            text = sys.stdin.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PixartError(
                f"--prompts-file {prompts_file}: cannot read it ({error.__class__.__name__}: "
                f"{getattr(error, 'strerror', None) or error})"
            ) from None
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
        from pixart_cli import artifacts
        from pixart_cli.encode import encode
        from pixart_cli.settings import EncodeSettings

        # 1. Every option and path, before torch or a model loads
        budget = _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
        settings = EncodeSettings(negative_prompt, max_sequence_length, clean_caption, text_encoder_precision, cache)
        (target,) = _targets(out, output, 1, "embeddings", overwrite=not no_overwrite)
        # 2. Resolve once, run, write
        ctx = _context(out, _new_model(model, revision), device, dtype, budget, report_memory)
        embeddings = encode(texts, settings, ctx)
        with signals_deferred():  # placed and reported together
            out.wrote(artifacts.save(target, embeddings, overwrite=not no_overwrite))
        _finish(out, ctx)

    _run(out, work, quantized=text_encoder_precision != "full")


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
        from pixart_cli import artifacts
        from pixart_cli.denoise import denoise
        from pixart_cli.models import model_for_file
        from pixart_cli.settings import DenoiseSettings

        # 1. Every option and path, then the input file, before a model loads
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
        ).with_seed()
        inputs = (embeddings,) if init_latents is None else (embeddings, init_latents)
        (target,) = _targets(out, output, 1, "latents", inputs, overwrite=not no_overwrite)
        loaded = artifacts.load_embeddings(embeddings)
        init = None if init_latents is None else artifacts.load_init_latents(init_latents)
        loras = _loras(lora)
        # 2. Resolve once, run, write
        ctx = _context(
            out, model_for_file(model, revision, loaded.meta, embeddings), device, dtype, budget, report_memory, loras
        )
        latents = denoise(loaded, settings, ctx, source_path=str(embeddings), init=init, init_path=str(init_latents))
        out.record["seeds"] = latents.meta["seeds"]
        with signals_deferred():  # placed and reported together
            out.wrote(artifacts.save(target, latents, overwrite=not no_overwrite))
        _finish(out, ctx)

    _run(out, work)


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
        from pixart_cli import artifacts
        from pixart_cli.decode import decode
        from pixart_cli.models import model_for_file

        budget = _check_common(device, dtype, vram)
        loaded = artifacts.load_latents(latents)
        targets = _targets(out, output, loaded.latents.shape[0], "image", (latents,), overwrite=not no_overwrite)
        ctx = _context(out, model_for_file(model, revision, loaded.meta, latents), device, dtype, budget, report_memory)
        images = decode(loaded, ctx, batch_size=batch_size, source_path=str(latents))
        _write_images(out, images, loaded.meta, targets, not no_overwrite)
        _finish(out, ctx)

    _run(out, work)


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
        from pixart_cli import artifacts, img2img

        # 1. Every option and path, the image itself, then the sizes on the model's configs, before a model loads
        budget = _check_common(device, dtype, vram)
        img2img.check_size_options(width, height)
        (target,) = _targets(out, output, 1, "init latents", (image,), overwrite=not no_overwrite)
        source_image = artifacts.read_source_image(image)
        source = _new_model(model, revision)
        img2img.fit(source_image, source, width, height, not no_binning)
        # 2. Resolve once, run, write
        ctx = _context(out, source, device, dtype, budget, report_memory)
        init = img2img.encode_image(source_image, ctx, width, height, not no_binning)
        with signals_deferred():  # placed and reported together
            out.wrote(artifacts.save(target, init, overwrite=not no_overwrite))
        _finish(out, ctx)

    _run(out, work)


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
        from pixart_cli import artifacts, img2img, scaleout
        from pixart_cli.generate import generate
        from pixart_cli.settings import DenoiseSettings, EncodeSettings

        # 1. Every option and path, before torch or a model loads
        budget = _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
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
            img2img.settings_for(denoising, None, option="--image")  # --strength alone is refused here
        elif scaleout.applies(output, resume, ray, ray_address):
            raise PixartError(
                "--image: image to image runs in one process only; write to a file, not -o DIR/, and "
                "leave out --resume and --ray"
            )
        source_image = None if image is None else artifacts.read_source_image(image, "--image")
        source = _new_model(model, revision)
        loras = _loras(lora)
        if scaleout.applies(output, resume, ray, ray_address):  # -o DIR/, several processes, --resume or --ray
            # The seed is agreed between processes there; each process resolves its own device.
            callbacks = scaleout.Callbacks(out.wrote, out.note, out.progress, [] if report_memory else None)
            summary = scaleout.generate_images(
                texts,
                output=output,
                encoding=encoding,
                denoising=denoising,
                model=source,
                run=scaleout.RunOptions(device, dtype, budget, loras),
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
        # 2. Resolve once, run the three stages, write
        ctx = _context(out, source, device, dtype, budget, report_memory, loras)
        images, meta = generate(
            texts, encoding, denoising.with_seed(), ctx, decode_batch_size=batch_size, image=source_image
        )
        out.record["seeds"] = meta["seeds"]
        _write_images(out, images, meta, targets, not no_overwrite)
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
    # printable: a prompt's ANSI escapes or newlines are shown escaped, never executed by the terminal
    return "".join(f"{printable(key):<{width}}  {printable(value)}\n" for key, value in rows)


def _version(value: bool) -> None:
    if value:
        print(f"pixart-cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """Run PixArt text-to-image models in memory-staged steps."""


def main(args: Optional[list[str]] = None) -> None:
    """Console-script entry point. The parser runs outside Typer's standalone mode, so that its errors (a bad
    value, an unknown option, a missing argument) end as ours do: one line, exit 2, and with --json the JSON
    error document on stdout."""
    install_signal_handlers()
    _Outcome.completed = _Outcome.reported = False
    args = sys.argv[1:] if args is None else list(args)
    try:
        command = typer.main.get_command(app)
        result = command.main(args, prog_name="pixart", standalone_mode=False)
        code = result if isinstance(result, int) else 0  # --help, --version, typer.Exit(code): the code
    except typer.TyperException as error:  # the parser's (Typer's click): show it as one line
        if not args:  # `pixart` alone: the help, as Typer shows it (exit 2)
            error.show()
            code = error.exit_code
        else:
            name, message = _parser_failure(command, args, error)
            code = error.exit_code
            Output(name, as_json=_asks_json(args)).error(message, code)
    except typer.Abort:  # end of input while Typer read from stdin
        code = EXIT_RUNTIME
        Output("pixart", as_json=_asks_json(args)).error("aborted; no output was written", code)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (KeyboardInterrupt, Terminated) as error:  # a signal outside a command's work
        code = 0
        if not _Outcome.completed:  # while starting or parsing
            code, message = _failure(error)
            Output("pixart", as_json=_asks_json(args)).error(message, code)
            _Outcome.reported = True
    if _Outcome.completed:
        code = 0  # a signal after the work and its output completed interrupted nothing
        ignore_signals()  # nor may one during the interpreter's exit
    elif stopped() and not _Outcome.reported:
        # Typer's own handler turned a SIGINT during start-up into exit 130 without a word
        code, message = _failure(KeyboardInterrupt())
        Output("pixart", as_json=_asks_json(args)).error(message, code)
    leave(code)


def _asks_json(args: list[str]) -> bool:
    """Whether the command line asks for --json (before a ``--`` that ends the options)."""
    return "--json" in (args[: args.index("--")] if "--" in args else args)


# Typer's conversion errors (pydantic's error types) in our words
_CONVERSION = {
    "int_parsing": "must be a whole number",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
}


def _parser_failure(group, args: list[str], error: Exception) -> tuple[str, str]:
    """(command name, one line) for an error of the parser: what was wrong, with the option and the value, and
    where to look (the command's --help)."""
    name = next((arg for arg in args if arg in group.commands), None)
    context = getattr(error, "ctx", None)
    if context is not None and context.command is not group:
        name = context.info_name
    see = f"see `pixart {name} --help`" if name else "see `pixart --help`"
    param = getattr(error, "param", None)
    option = getattr(error, "option_name", None)
    if param is not None:
        flag = max(param.opts, key=len) if param.opts and param.opts[0].startswith("-") else None
        shown = flag or getattr(param, "metavar", None) or param.name.upper()
        if isinstance(error, typer.BadParameter) and error.message:  # a value that does not convert
            value = _given_value(args, param.opts, error)
            cause = error.__cause__
            kind = cause.errors()[0].get("type") if hasattr(cause, "errors") else None
            reason = _CONVERSION.get(kind) or _sentence(error.message)
            return name or "pixart", f"{shown}{'' if value is None else f' {value!r}'}: {reason}; {see}"
        what = "option" if flag else "argument"
        return name or "pixart", f"{shown}: missing; this {what} is required; {see}"
    if option is not None:
        possible = [p for p in getattr(error, "possibilities", None) or () if p not in ("--help", "-h")]
        if error.format_message().startswith("No such option"):
            hint = f" (did you mean {' or '.join(sorted(possible))}?)" if possible else ""
            return name or "pixart", f"{option}: no such option{hint}; {see}"
        message = error.format_message()
        if "requires an argument" in message:
            return name or "pixart", f"{option}: needs a value; {see}"
        if "does not take a value" in message:
            return name or "pixart", f"{option}: takes no value (it is a flag); {see}"
    return name or "pixart", f"{_sentence(error.format_message())}; {see}"


def _given_value(args: list[str], opts: list[str], error: Exception):
    """The text given for an option, as the parser saw it (the conversion error's input, else the last value
    after the flag on the command line), or None."""
    cause = error.__cause__
    if hasattr(cause, "errors"):
        value = cause.errors()[0].get("input")
        if isinstance(value, str):
            return value
    value = None
    for index, arg in enumerate(args):
        if arg == "--":
            break
        for opt in opts:
            if arg == opt and index + 1 < len(args):
                value = args[index + 1]
            elif opt.startswith("--") and arg.startswith(opt + "="):
                value = arg[len(opt) + 1 :]
    return value


def _sentence(text: str) -> str:
    """A message as part of our line: one line, lower case first, no final period."""
    text = " ".join(text.split()).rstrip(".")
    return text[:1].lower() + text[1:]


if __name__ == "__main__":
    sys.exit(main())
