"""The steps every command shares: options into values, the run context, where outputs go, writing images."""

from __future__ import annotations

from typing import Optional

from pixart_cli import record
from pixart_cli.cli.output import Output


def context(out: Output, model, device: str, dtype: str, budget: Optional[int], report_memory: bool, loras: tuple = ()):
    """The one run context of a command: device and dtype resolved once, the parsed --vram budget, the model, the
    LoRAs, and the output sink's progress, notes and memory reports."""
    from pixart_cli import process
    from pixart_cli.runtime import RunContext

    context = RunContext.resolve(
        model,
        device,
        dtype,
        budget,
        progress=out.progress,
        log=out.note,
        reports=[] if report_memory else None,
        loras=loras,
        settle=process.settle,
    )
    process.settle()  # torch is imported now: its objects stay for the process's life
    return context


def loras(values: Optional[list[str]]) -> tuple:
    """--lora values, parsed and read (each checked on its own; against the model later, before weights load)."""
    from pixart_cli.files.lora_file import parse_lora_spec, read_lora

    return tuple(read_lora(parse_lora_spec(value)) for value in values or ())


def controlnet(value: Optional[str]):
    """--controlnet FILE|DIR[:SCALE], parsed (the file is checked against the model by the plan)."""
    from pixart_cli.files.controlnet_file import parse_controlnet_spec

    return None if value is None else parse_controlnet_spec(value)


def check_controllable(source) -> None:
    """encode-control: the PixArt ControlNet works on PixArt-α's latents only."""
    from pixart_cli.files.controlnet_file import check_family

    check_family(source, "encode-control")


def new_model(model: Optional[str], revision: Optional[str]):
    """--model (default: $PIXART_MODEL, else the default checkpoint) at --revision; its errors name the option or
    the environment variable the name came from."""
    from pixart_cli.models.source import Model, default_model, model_option

    return Model(default_model() if model is None else model, revision, option=model_option(model))


def stdin_prompt(prompts: Optional[list[str]]) -> Optional[str]:
    """``-`` where a PROMPT argument reads standard input, else None (for ``check_one_stdin``)."""
    return "-" if prompts and "-" in prompts else None


def note_unquoted(out: Output, prompts: Optional[list[str]]) -> None:
    """`pixart encode cute cat` reads two prompts: say so, as a note, when several PROMPT arguments are one word
    each (the shell split an unquoted prompt, most likely)."""
    from pixart_cli.cli.prompts_file import unquoted_note

    note = unquoted_note(prompts)
    if note is not None:
        out.note(note)


def components(value: Optional[str]) -> Optional[tuple[str, ...]]:
    """--components "text_encoder,vae" of `pixart convert` as names (None: not given, all of them)."""
    from pixart_cli.errors import PixartError
    from pixart_cli.models.convert import CONVERTIBLE

    if value is None:
        return None
    names = [name.strip() for name in value.split(",")]
    wrong = next((name for name in names if name not in CONVERTIBLE), None)
    if wrong is not None:
        what = "an empty name" if wrong == "" else f"unknown component {wrong!r}"
        raise PixartError(
            f"--components {value!r}: {what}; give {', '.join(CONVERTIBLE)} or some of them, separated by commas "
            "(the others are copied as they are)"
        )
    return tuple(dict.fromkeys(names))


def option_source(context, name: str, flag: str, env: str) -> str:
    """``flag``, or ``env`` when the parameter ``name``'s value came from that environment variable (the command's
    ``typer.Context`` records where each value came from): errors about the value then name what the user set."""
    source = context.get_parameter_source(name) if context is not None else None
    return env if getattr(source, "name", None) == "ENVIRONMENT" else flag


def check_common(device: str, dtype: str, vram: Optional[str]) -> Optional[int]:
    """Device and dtype words checked before torch loads (resolved later, once, in the run context); returns the
    parsed --vram budget in bytes (None: auto)."""
    from pixart_cli.models.memory import parse_vram
    from pixart_cli.runtime import check_device, check_dtype

    check_device(device)
    check_dtype(dtype)
    return parse_vram(vram)


def targets(out: Output, output: str, count: int, kind: str, inputs: tuple = (), overwrite: bool = True) -> list:
    """Where the outputs go (artifacts owns the rule), checked before any work; the count is recorded so that a
    failure half-way can say how many were written."""
    from pixart_cli.files import output_paths

    targets = output_paths.output_targets(
        output, count, kind, inputs=inputs, overwrite=overwrite, allow_stdout=not out.as_json
    )
    out.planned = len(targets)
    return targets


def write_images(out: Output, images: list, meta: dict, targets: list, overwrite: bool) -> None:
    from pixart_cli.files import image_io

    requests = [
        (path, image, *record.image_metadata(record.RunRecord.from_meta(meta), index))
        for index, (image, path) in enumerate(zip(images, targets))
    ]
    image_io.save_images(requests, overwrite, lambda index, path: out.wrote(path))


def finish(out: Output, ctx) -> None:
    """After the work: the memory reports asked for with --report-memory."""
    finish_reports(out, ctx.reports)


def finish_reports(out: Output, reports: Optional[list]) -> None:
    if reports is not None:
        for report in reports:
            out.note(report.describe())
        out.record["memory"] = [report.as_dict() for report in reports]


def pag_layers(value: Optional[str]) -> Optional[tuple]:
    """--pag-layers A,B -> ("A", "B") (checked in DenoiseSettings); None: not given."""
    return None if value is None else tuple(part.strip() for part in value.split(","))


def mask_args(path: Optional[str], masking) -> dict:
    """The plan's inpainting keywords for --mask PATH (``MaskSettings`` from --mask-blur and --keep-unmasked): the
    mask file (`pixart encode-mask`, read as every .pt file is) or the mask image (read as a source image, in
    grayscale), told apart by what the file holds."""
    from pixart_cli.errors import PixartError
    from pixart_cli.files import image_io, staged
    from pixart_cli.files.untrusted import empty_path_error

    mask = None
    if path == "":
        raise empty_path_error("--mask")
    if path is not None:
        try:
            kind = staged.file_kind(path)
        except PixartError as error:  # a missing or unreadable file: the line names the option too
            raise PixartError(f"--mask {error}", error.exit_code) from None
        mask = staged.load_mask(path) if kind == "pt" else image_io.read_source_image(path, "--mask", mode="L")
    return {"mask": mask, "mask_name": path, "masking": masking}
