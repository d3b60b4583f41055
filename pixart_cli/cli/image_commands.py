"""The commands that encode an image with the VAE encoder only: encode-image (image to image's start) and
encode-control (a ControlNet's edge map). Registered on the app by commands.py, in the order of the help."""

from __future__ import annotations

from pixart_cli.cli import conditioning_options as conditioning
from pixart_cli.cli import options, shared
from pixart_cli.cli.edge import run_command
from pixart_cli.cli.output import Output
from pixart_cli.signals import GUARD


def encode_image(
    image: conditioning.ImageFile,
    output: conditioning.InitLatentsOutput = "init.pt",
    model: options.Model = None,
    revision: options.Revision = None,
    width: conditioning.ImageWidth = None,
    height: conditioning.ImageHeight = None,
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
        budget = shared.check_common(device, dtype, vram)
        check_size_options(width, height)
        (target,) = shared.targets(out, output, 1, "init latents", (image,), overwrite=not no_overwrite)
        source_image = image_io.read_source_image(image)
        source = shared.new_model(model, revision)
        sizes = fit_image(source_image, source, width, height, not no_binning)
        # 2. Resolve once, run, write
        ctx = shared.context(out, source, device, dtype, budget, report_memory)
        init = encode_image(source_image, sizes, ctx)
        with GUARD.deferred():  # placed and reported together
            out.wrote(staged.save(target, init, overwrite=not no_overwrite))
        shared.finish(out, ctx)

    run_command(out, work)


def encode_control(
    image: conditioning.ControlImageFile,
    output: conditioning.ControlOutput = "control.pt",
    model: options.Model = None,
    revision: options.Revision = None,
    width: conditioning.ImageWidth = None,
    height: conditioning.ImageHeight = None,
    no_binning: options.NoBinning = False,
    device: options.Device = "auto",
    dtype: options.Dtype = "auto",
    vram: options.Vram = None,
    report_memory: options.ReportMemory = False,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Encode an edge map with the VAE encoder only → control.pt, for `pixart denoise --control control.pt
    --controlnet FILE`. The map is scaled and center-cropped to the size the transformer will run at, as
    encode-image does; give the size of the image to make (--width/--height) or it is the map's own."""
    out = Output("encode-control", quiet, json)

    def work():
        from pixart_cli.files import image_io, staged
        from pixart_cli.plan import check_size_options, fit_image
        from pixart_cli.stages.encode_control import encode_control

        # 1. Every option and path, the image itself, then the sizes on the model's configs, before a model loads
        budget = shared.check_common(device, dtype, vram)
        check_size_options(width, height)
        (target,) = shared.targets(out, output, 1, "control latents", (image,), overwrite=not no_overwrite)
        control_image = image_io.read_source_image(image)
        source = shared.new_model(model, revision)
        shared.check_controllable(source)
        sizes = fit_image(control_image, source, width, height, not no_binning)
        # 2. Resolve once, run, write
        ctx = shared.context(out, source, device, dtype, budget, report_memory)
        control = encode_control(control_image, sizes, ctx)
        with GUARD.deferred():  # placed and reported together
            out.wrote(staged.save(target, control, overwrite=not no_overwrite))
        shared.finish(out, ctx)

    run_command(out, work)


def encode_mask(
    mask: conditioning.MaskImageFile,
    image: conditioning.MaskSourceImage,
    output: conditioning.MaskOutput = "mask.pt",
    model: options.Model = None,
    revision: options.Revision = None,
    width: conditioning.ImageWidth = None,
    height: conditioning.ImageHeight = None,
    no_binning: options.NoBinning = False,
    mask_blur: conditioning.MaskBlur = None,
    no_overwrite: options.NoOverwrite = False,
    quiet: options.Quiet = False,
    json: options.Json = False,
) -> None:
    """Make an inpainting mask for `pixart denoise --init-latents init.pt --mask mask.pt` → mask.pt: the mask at the
    size the transformer runs at, and the image's pixels that decode pastes back outside it (--keep-unmasked).
    Give the same --width/--height/--no-binning as to encode-image."""
    out = Output("encode-mask", quiet, json)

    def work():
        from pixart_cli.files import image_io, staged
        from pixart_cli.plan import check_size_options, plan_encode_mask
        from pixart_cli.settings import MaskSettings
        from pixart_cli.stages.encode_mask import encode_mask

        # 1. Every option and path, both images, then the sizes and the mask's checks, before any work
        check_size_options(width, height)
        blur = MaskSettings(mask_blur).blur_px
        (target,) = shared.targets(out, output, 1, "mask", (mask, image), overwrite=not no_overwrite)
        mask_image = image_io.read_source_image(mask, "MASK", mode="L")
        source_image = image_io.read_source_image(image, "--image")
        source = shared.new_model(model, revision)
        sizes = plan_encode_mask(mask_image, source_image, source, width, height, not no_binning, blur)
        # 2. Resolve once (on the CPU: no model loads), run, write
        ctx = shared.context(out, source, "cpu", "fp32", None, False)
        made = encode_mask(mask_image, sizes, blur, ctx, source_image)
        with GUARD.deferred():  # placed and reported together
            out.wrote(staged.save(target, made, overwrite=not no_overwrite))

    run_command(out, work)
