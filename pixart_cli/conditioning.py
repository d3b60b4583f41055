"""The conditioning inputs of a denoise run, checked against the model and the run before any model loads: image
to image's init latents and ControlNet's control latents. Each was encoded for a size (``requested_width`` and
``requested_height`` in its meta, binned or not): the run takes that size unless --width/--height say otherwise,
which is an error, and the two must agree with each other. Then the latents themselves must suit this model's
transformer and VAE, the size the run denoises at, and its image count. Configs only.
"""

from __future__ import annotations

import dataclasses

from pixart_cli.errors import PixartError, bad_file
from pixart_cli.settings import DEFAULT_STRENGTH, DenoiseSettings


def with_init_size(
    settings: DenoiseSettings, init_meta: dict | None, option: str = "--init-latents"
) -> DenoiseSettings:
    """The run's settings with the init latents' size (what they were encoded for) and the default strength.

    Without init latents, ``--strength`` is an error. A --width/--height that differs from the init's is one too.
    """
    if init_meta is None:
        if settings.strength is not None:
            raise PixartError(f"--strength {settings.strength}: only for image to image; give {option} FILE too")
        return settings
    requested = (init_meta["requested_width"], init_meta["requested_height"])
    differing = [
        f"{flag} {value}"
        for flag, value, encoded in (
            ("--width", settings.width, requested[0]),
            ("--height", settings.height, requested[1]),
        )
        if value is not None and value != encoded
    ]
    if differing:
        raise PixartError(
            f"{' '.join(differing)}: the image was encoded for {requested[0]}x{requested[1]}; leave "
            f"{'it' if len(differing) == 1 else 'them'} out, or encode the image again at that size"
        )
    strength = DEFAULT_STRENGTH if settings.strength is None else settings.strength
    return dataclasses.replace(
        settings,
        width=requested[0],
        height=requested[1],
        strength=strength,
        binning=settings.binning and bool(init_meta.get("binned", True)),
    )


def check_init(init, plan, source, path: str, images: int) -> None:
    """The init latents must suit this transformer and VAE, and this run's size and image count. Configs only."""
    latents, meta = init.latents, init.meta
    channels = source.config("transformer").get("in_channels", 4)
    if latents.shape[1] != channels:
        raise bad_file(
            path,
            f"init latents have {latents.shape[1]} channels but the transformer of {source.id} "
            f"takes {channels}; encode the image with the same model family",
        )
    recorded, expected = meta.get("vae_scaling_factor"), source.config("vae").get("scaling_factor")
    if isinstance(recorded, float) and isinstance(expected, float) and abs(recorded - expected) > 1e-6:
        raise bad_file(
            path,
            f"init latents come from another VAE (scaling factor {recorded:g}; {source.id}'s is "
            f"{expected:g}); encode the image with the same model family",
        )
    scale = source.vae_scale_factor
    size = (latents.shape[3] * scale, latents.shape[2] * scale)
    if size != (plan.width, plan.height):
        raise bad_file(
            path,
            f"init latents are {size[0]}x{size[1]} but this run denoises at {plan.width}x"
            f"{plan.height}; encode the image with the same model and --width/--height/--no-binning",
        )
    if latents.shape[0] not in (1, images):
        raise bad_file(
            path,
            f"holds {latents.shape[0]} init latents for {images} images; give one (it starts every "
            "image) or one per image",
        )


def with_control_size(
    settings: DenoiseSettings,
    control_meta: dict | None,
    name: str,
    init_meta: dict | None = None,
    init_name: str = "--init-latents",
) -> DenoiseSettings:
    """The run's settings with the size the control latents were encoded for (as ``with_init_size``). With init
    latents too, both must have been encoded for one size (``with_init_size`` has set it already)."""
    if control_meta is None:
        return settings
    requested = (control_meta["requested_width"], control_meta["requested_height"])
    if init_meta is not None:
        init_requested = (init_meta["requested_width"], init_meta["requested_height"])
        if init_requested != requested:
            raise bad_file(
                name,
                f"the control image was encoded for {requested[0]}x{requested[1]} but the init image ({init_name}) "
                f"for {init_requested[0]}x{init_requested[1]}; encode the control image again with --width "
                f"{init_requested[0]} --height {init_requested[1]}",
            )
    differing = [
        f"{flag} {value}"
        for flag, value, encoded in (
            ("--width", settings.width, requested[0]),
            ("--height", settings.height, requested[1]),
        )
        if value is not None and value != encoded
    ]
    if differing:
        raise PixartError(
            f"{' '.join(differing)}: the control image ({name}) was encoded for {requested[0]}x{requested[1]}; "
            f"leave {'it' if len(differing) == 1 else 'them'} out, or encode the control image again at that size"
        )
    return dataclasses.replace(
        settings,
        width=requested[0],
        height=requested[1],
        binning=settings.binning and bool(control_meta.get("binned", True)),
    )


def check_control(control, plan, source, path: str, images: int) -> None:
    """The control latents must suit this transformer and VAE (α's: the adapter works on its latents), this run's
    size and its image count. Configs only."""
    latents, meta = control.latents, control.meta
    channels = source.config("transformer").get("in_channels", 4)
    if latents.shape[1] != channels:
        raise bad_file(
            path,
            f"control latents have {latents.shape[1]} channels but the transformer of {source.id} takes {channels}; "
            "encode the control image with the same model",
        )
    recorded, expected = meta.get("vae_scaling_factor"), source.config("vae").get("scaling_factor")
    if isinstance(recorded, float) and isinstance(expected, float) and abs(recorded - expected) > 1e-6:
        raise bad_file(
            path,
            f"control latents come from another VAE (scaling factor {recorded:g}; {source.id}'s is {expected:g}); "
            "encode the control image with the same model",
        )
    scale = source.vae_scale_factor
    size = (latents.shape[3] * scale, latents.shape[2] * scale)
    if size != (plan.width, plan.height):
        raise bad_file(
            path,
            f"control latents are {size[0]}x{size[1]} but this run denoises at {plan.width}x{plan.height}; encode "
            "the control image with the same model and --width/--height/--no-binning",
        )
    if latents.shape[0] not in (1, images):
        raise bad_file(
            path,
            f"holds {latents.shape[0]} control latents for {images} images; give one (it steers every image) or "
            "one per image",
        )


def check_controlnet_pair(controlnet, has_control: bool, options: tuple[str, str], step_cache: str | None) -> None:
    """A ControlNet needs its condition and the condition its ControlNet (``options``: the two flags' names, e.g.
    ("--control", "--controlnet")); a step cache skips the blocks the adapter feeds, so it is refused with one."""
    control_option, controlnet_option = options
    if controlnet is not None and not has_control:
        made = " (an edge map encoded by `pixart encode-control`)" if control_option == "--control" else ""
        raise PixartError(
            f"{controlnet_option} {controlnet.path}: needs a control image; give {control_option} FILE too{made}"
        )
    if controlnet is None and has_control:
        raise PixartError(f"{control_option}: a control image steers a ControlNet; give {controlnet_option} FILE too")
    if controlnet is not None and step_cache is not None:
        raise PixartError(
            f"--step-cache {step_cache}: not with {controlnet_option} (the cache skips the transformer blocks the "
            "adapter adds to); leave one out"
        )
