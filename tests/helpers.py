"""Helpers shared by the tests: the diffusers oracle, image comparison, the CLI in and out of process, and the
run context of a CPU test run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from typer.testing import CliRunner

from pixart_cli.cli import shared
from pixart_cli.cli.commands import app
from pixart_cli.conditioning import check_latents
from pixart_cli.plan import fit_image, plan_denoise, plan_run
from pixart_cli.runtime import RunContext
from pixart_cli.settings import DenoiseSettings, EncodeSettings

SEED = 0
runner = CliRunner()


def cpu(model, **callbacks) -> RunContext:
    """The run context of a test: ``model`` (a folder or a Model) on the CPU in fp32."""
    return RunContext.resolve(model if not isinstance(model, Path) else str(model), "cpu", "auto", None, **callbacks)


def encoded(prompts, model, **settings):
    """encode() with EncodeSettings(**settings) on the CPU."""
    from pixart_cli.stages.encode import encode

    callbacks = {key: settings.pop(key) for key in ("log", "progress", "reports", "loras") if key in settings}
    return encode(prompts, EncodeSettings(**settings), cpu(model, **callbacks))


def denoised(embeddings, model=None, **settings):
    """denoise() with DenoiseSettings(**settings) on the CPU, with the model the embeddings name by default."""
    from pixart_cli.generate import with_mask
    from pixart_cli.stages.denoise import denoise

    init = settings.pop("init", None)
    mask, masking = _mask_options(settings)
    callbacks = {key: settings.pop(key) for key in ("log", "progress", "reports", "loras") if key in settings}
    ctx = cpu(model or embeddings.meta["model"], **callbacks)
    plan = plan_denoise(
        DenoiseSettings(**settings),
        ctx.model,
        embeddings.prompt_embeds.shape[0],
        embedding_width=embeddings.prompt_embeds.shape[-1],
        init=init,
        loras=ctx.loras,
        **shared.mask_args(mask, masking),
    )
    return denoise(embeddings, with_mask(plan, ctx), ctx)


def _mask_options(options: dict):
    """(--mask path or None, MaskSettings) from a test's keywords mask, mask_blur and keep_unmasked."""
    from pixart_cli.settings import MaskSettings

    mask = options.pop("mask", None)
    return None if mask is None else str(mask), MaskSettings(
        options.pop("mask_blur", None), options.pop("keep_unmasked", None)
    )


def decoded(latents, model=None, batch_size=None, **callbacks):
    from pixart_cli.stages.decode import decode

    ctx = cpu(model or latents.meta["model"], **callbacks)
    check_latents(latents, ctx.model, "latents", batch_size)
    return decode(latents, ctx, batch_size=batch_size)


def generated(prompts, model, **options):
    """generate() on the CPU: encode options and denoise options in one keyword list, as on the command line."""
    from dataclasses import fields

    from pixart_cli.files.image_io import read_source_image
    from pixart_cli.generate import generate

    callbacks = {key: options.pop(key) for key in ("log", "progress", "reports", "loras") if key in options}
    image = options.pop("image", None)
    mask, masking = _mask_options(options)
    encode_names = {f.name for f in fields(EncodeSettings)}
    encoding = EncodeSettings(**{k: v for k, v in options.items() if k in encode_names})
    denoising = DenoiseSettings(**{k: v for k, v in options.items() if k not in encode_names})
    ctx = cpu(model, **callbacks)
    plan = plan_run(
        prompts,
        encoding,
        denoising,
        ctx.model,
        image=None if image is None else read_source_image(image, "--image"),
        loras=ctx.loras,
        decode_batch_size=denoising.batch_size,
        **shared.mask_args(mask, masking),
    )
    return generate(plan, ctx)


def image_encoded(image_path, model, width=None, height=None, binning=True, option="IMAGE"):
    """encode-image's stage on the CPU: the image read as the command reads it, sized by the plan."""
    from pixart_cli.files.image_io import read_source_image
    from pixart_cli.stages.encode_image import encode_image

    ctx = cpu(model)
    image = read_source_image(image_path, option)
    return encode_image(image, fit_image(image, ctx.model, width, height, binning), ctx)


def pipeline_images(model: Path, prompt, seed: int = SEED, **kwargs):
    """The oracle: diffusers' own one-shot PixArtAlphaPipeline, CPU generator, fp32. Returns uint8 [N, H, W, 3]."""
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), output_type="pil", **kwargs).images
    import numpy as np

    return np.stack([np.asarray(image) for image in images])


def read_png(path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def max_diff(a, b) -> int:
    import numpy as np

    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def run_pixart(*args, cwd, env=None, check=True, timeout=300, stdin: bytes | None = None):
    """The installed console script as a subprocess, as a shell user runs it; ``stdin``: bytes piped into it."""
    full_env = {**os.environ, **(env or {})}
    if stdin is None:
        result = subprocess.run(
            [pixart_bin(), *map(str, args)], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
        )
    else:
        result = subprocess.run(
            [pixart_bin(), *map(str, args)], cwd=cwd, env=full_env, input=stdin, capture_output=True, timeout=timeout
        )
        result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    if check and result.returncode != 0:
        raise AssertionError(f"pixart {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr}")
    return result


def pixart_bin() -> str:
    return str(Path(sys.executable).parent / "pixart")


def invoke(*args, cwd, stdin: bytes | None = None):
    """Run the CLI in this process (fast) from folder ``cwd``; ``stdin``: bytes its standard input holds."""
    previous = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, [str(a) for a in args], input=stdin)
    finally:
        os.chdir(previous)


def assert_one_line_error(result, code, *fragments):
    """One line on stderr naming what is wrong, the exit code, nothing on stdout: for an in-process result
    (``invoke``) or a real process's (``run_pixart``)."""
    exit_code = result.exit_code if hasattr(result, "exit_code") else result.returncode
    assert exit_code == code, (exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert result.stdout == ""
