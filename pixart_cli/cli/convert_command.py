"""`pixart convert`: a local fp16 (or bf16) copy of a model folder."""

from __future__ import annotations

from pixart_cli.cli import convert_options, options, shared
from pixart_cli.cli.edge import run_command
from pixart_cli.cli.output import Output
from pixart_cli.errors import PixartError


def convert(
    model: convert_options.ConvertModel,
    output: convert_options.ConvertOutput,
    dtype: convert_options.ConvertDtype = "fp16",
    components: convert_options.Components = None,
    revision: options.Revision = None,
    overwrite: convert_options.OverwriteFolder = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Copy MODEL to DIR with its text encoder, transformer and VAE in fp16 (or bf16), tensor by tensor (memory:
    about one tensor). DIR is a diffusers folder that --model DIR and diffusers' from_pretrained load; the
    tokenizer, scheduler and configs are copied as they are."""
    out = Output("convert", quiet, json)

    def work():
        from pixart_cli.files import model_copy
        from pixart_cli.models import convert as conversion
        from pixart_cli.runtime import DTYPES

        # 1. Every option and the target, before the model is read
        if dtype not in conversion.DTYPE_WORDS:
            raise PixartError(
                f"--dtype {dtype!r}: a copy is written in {' or '.join(conversion.DTYPE_WORDS)}; use --dtype fp16 "
                "(or bf16)"
            )
        chosen = shared.components(components)
        target, shown = model_copy.check_target(output, overwrite)
        source = shared.new_model(model, revision)
        out.planned = 1
        # 2. Every file of the copy decided from the model's file lists and headers, then written
        import torch

        plan = conversion.plan(source, target, shown, getattr(torch, DTYPES[dtype]), chosen, overwrite)
        for line in plan.describe():
            out.note(line)
        model_copy.write(plan, progress=out.progress, placed=out.wrote)
        out.record.update(plan.as_dict())

    run_command(out, work)
