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
from pixart_cli.errors import EXIT_RUNTIME, EXIT_SIGINT, EXIT_SIGTERM, PixartError, Terminated, detail, leave, on_signal
from pixart_cli.output import Output, printable

app = typer.Typer(
    name="pixart",
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


def _run(out: Output, work: Callable[[], None], quantized: bool = False) -> None:
    """Run one command's work; turn every failure into one line and an exit code (traceback: PIXART_DEBUG=1)."""
    debug = os.environ.get("PIXART_DEBUG") == "1"
    from pixart_cli import runtime

    runtime.quiet_libraries()
    runtime.lean_imports(quantized)
    try:
        work()
        out.close()
    except (Exception, KeyboardInterrupt, Terminated) as error:  # the edge: one line, not a traceback
        code, message = _failure(error, out.record["outputs"], getattr(out, "planned", None))
        if debug:
            traceback.print_exception(error)
        out.error(message)
        raise typer.Exit(code) from None


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
    of = f" of {planned}" if planned else ""
    names = ", ".join(written) if len(written) <= 3 else f"{written[0]} ... {written[-1]}"
    return code, f"{message}; {len(written)}{of} outputs had been written ({names}; listed on stdout), the rest " \
                 "were not"


def _unexpected(error: Exception) -> str:
    if type(error).__name__ == "OutOfMemoryError":
        return ("out of device memory; pass a smaller --vram budget (for example --vram 4GB), use --dtype fp16, "
                "or --device cpu")
    return f"{type(error).__name__}: {detail(error)} (run with PIXART_DEBUG=1 for the traceback)"


def _model(model: Optional[str]) -> str:
    from pixart_cli.models import default_model

    return default_model() if model is None else model


def _check_common(device: str, dtype: str, vram: Optional[str]) -> None:
    from pixart_cli.memory import parse_vram
    from pixart_cli.runtime import check_device, check_dtype

    check_device(device)
    check_dtype(dtype)
    parse_vram(vram)


def _targets(out: Output, output: str, count: int, kind: str, inputs: tuple = (), overwrite: bool = True) -> list:
    """Where the outputs go (artifacts owns the rule), checked before any work; the count is recorded so that a
    failure half-way can say how many were written."""
    from pixart_cli import artifacts

    targets = artifacts.output_targets(output, count, kind, inputs=inputs, overwrite=overwrite,
                                       allow_stdout=not out.as_json)
    out.planned = len(targets)
    return targets


def _write_images(out: Output, images: list, meta: dict, targets: list, overwrite: bool) -> None:
    from pixart_cli import artifacts

    for index, (image, path) in enumerate(zip(images, targets)):
        parameters, settings = artifacts.image_metadata(meta, index)
        out.wrote(artifacts.save_image(path, image, parameters, settings, overwrite=overwrite))


def _prompts(prompts: Optional[list[str]], prompts_file: Optional[str]) -> list[str]:
    """PROMPT arguments, then the lines of --prompts-file (``-``: stdin)."""
    collected = list(prompts or [])
    if prompts_file == "":
        raise PixartError("--prompts-file: the path is empty; give a file of prompts, one per line (- reads stdin)")
    if prompts_file is not None:
        try:
            text = sys.stdin.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PixartError(f"--prompts-file {prompts_file}: cannot read it ({error.__class__.__name__}: "
                              f"{getattr(error, 'strerror', None) or error})") from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise PixartError(f"--prompts-file {prompts_file}: holds no prompts; write one prompt per line")
        collected += lines
    if not collected:
        raise PixartError("PROMPT: give at least one prompt, or --prompts-file FILE")
    return collected


class _Stages:
    """What every stage call gets from the CLI: the progress bar, the plan notes and the memory reports."""

    def __init__(self, out: Output, report_memory: bool, device: str, vram: Optional[str]):
        self.out = out
        self.report_memory = report_memory
        self.reports: list = []
        if vram is not None:
            from pixart_cli.runtime import resolve_device

            resolved = resolve_device(device)
            if resolved.type != "cuda":  # budgets are for CUDA memory; CPU and MPS share system RAM
                out.note(f"--vram {vram} is ignored on {resolved.type.upper()}")

    def kwargs(self) -> dict:
        return {"progress": self.out.progress, "log": self.out.note, "reports": self.reports}

    def finish(self) -> None:
        if self.report_memory:
            for report in self.reports:
                self.out.note(report.describe())
            self.out.record["memory"] = [report.as_dict() for report in self.reports]


def _note_seeds(out: Output, meta: dict) -> None:
    seeds = meta["seeds"]
    text = str(seeds[0]) if len(seeds) == 1 else f"{seeds[0]}..{seeds[-1]}"
    out.note(f"seed: {text}", seeds=seeds)


@app.command()
def encode(
    prompts: options.Prompts = None,
    prompts_file: options.PromptsFile = None,
    output: options.EmbeddingsOutput = "embeddings.pt",
    negative_prompt: options.NegativePrompt = "",
    model: options.Model = None,
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
        from pixart_cli.encode import check_inputs, encode

        _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
        check_inputs(texts, negative_prompt, max_sequence_length, clean_caption, text_encoder_precision)
        target, = _targets(out, output, 1, "embeddings", overwrite=not no_overwrite)
        stages = _Stages(out, report_memory, device, vram)
        embeddings = encode(texts, model=_model(model), negative_prompt=negative_prompt, device=device,
                            dtype=dtype, max_sequence_length=max_sequence_length, clean_caption=clean_caption,
                            vram=vram, precision=text_encoder_precision, cache=cache, **stages.kwargs())
        out.wrote(artifacts.save(target, embeddings, overwrite=not no_overwrite))
        stages.finish()

    _run(out, work, quantized=text_encoder_precision != "full")


@app.command()
def denoise(
    embeddings: options.EmbeddingsFile,
    output: options.LatentsOutput = "latents.pt",
    model: options.ModelFromFile = None,
    steps: options.Steps = None,
    guidance_scale: options.GuidanceScale = None,
    seed: options.Seed = None,
    width: options.Width = None,
    height: options.Height = None,
    no_binning: options.NoBinning = False,
    num_images: options.NumImages = 1,
    scheduler: options.Scheduler = None,
    batch_size: options.BatchSize = None,
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
        from pixart_cli.denoise import check_inputs, denoise

        _check_common(device, dtype, vram)
        check_inputs(steps, guidance_scale, seed, width, height, num_images, scheduler, batch_size)
        target, = _targets(out, output, 1, "latents", (embeddings,), overwrite=not no_overwrite)
        loaded = artifacts.load_embeddings(embeddings)
        stages = _Stages(out, report_memory, device, vram)
        latents = denoise(loaded, model=model, steps=steps, guidance_scale=guidance_scale, seed=seed, width=width,
                          height=height, binning=not no_binning, num_images=num_images, scheduler=scheduler,
                          batch_size=batch_size, device=device, dtype=dtype, vram=vram,
                          source_path=str(embeddings), **stages.kwargs())
        _note_seeds(out, latents.meta)
        out.wrote(artifacts.save(target, latents, overwrite=not no_overwrite))
        stages.finish()

    _run(out, work)


@app.command()
def decode(
    latents: options.LatentsFile,
    output: options.ImageOutput = "image.png",
    model: options.ModelFromFile = None,
    batch_size: options.BatchSize = None,
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

        _check_common(device, dtype, vram)
        loaded = artifacts.load_latents(latents)
        targets = _targets(out, output, loaded.latents.shape[0], "image", (latents,), overwrite=not no_overwrite)
        stages = _Stages(out, report_memory, device, vram)
        images = decode(loaded, model=model, device=device, dtype=dtype, batch_size=batch_size, vram=vram,
                        source_path=str(latents), **stages.kwargs())
        _write_images(out, images, loaded.meta, targets, not no_overwrite)
        stages.finish()

    _run(out, work)


@app.command()
def generate(
    prompts: options.Prompts = None,
    prompts_file: options.PromptsFile = None,
    output: options.ImageOutput = "image.png",
    negative_prompt: options.NegativePrompt = "",
    model: options.Model = None,
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
    batch_size: options.BatchSize = None,
    cache: options.Cache = None,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """encode → denoise → decode in one process, freeing each model before the next loads."""
    out = Output("generate", quiet, json)

    def work():
        from pixart_cli.generate import generate

        _check_common(device, dtype, vram)
        texts = _prompts(prompts, prompts_file)
        targets = _targets(out, output, len(texts) * max(num_images, 1), "image", overwrite=not no_overwrite)
        stages = _Stages(out, report_memory, device, vram)
        images, meta = generate(texts, model=_model(model), negative_prompt=negative_prompt, steps=steps,
                                guidance_scale=guidance_scale, seed=seed, width=width, height=height,
                                binning=not no_binning, num_images=num_images, device=device, dtype=dtype,
                                max_sequence_length=max_sequence_length, clean_caption=clean_caption, vram=vram,
                                precision=text_encoder_precision, scheduler=scheduler, batch_size=batch_size,
                                cache=cache, **stages.kwargs())
        _note_seeds(out, meta)
        _write_images(out, images, meta, targets, not no_overwrite)
        stages.finish()

    _run(out, work, quantized=text_encoder_precision != "full")


@app.command()
def info(
    file: options.InfoFile,
    json: options.Json = False,
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Show the version and exit.")] = False,
) -> None:
    """Run PixArt text-to-image models in memory-staged steps."""


def main() -> None:
    """Console-script entry point."""
    install_signal_handlers()
    try:
        app(prog_name="pixart")
        code = 0
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except (KeyboardInterrupt, Terminated) as error:  # a signal outside a command's work (while parsing)
        code, message = _failure(error)
        Output("pixart").error(message)
    leave(code)


if __name__ == "__main__":
    sys.exit(main())
