"""The options of denoise's conditioning inputs and guidance (image to image, inpainting, perturbed-attention
guidance), defined once, as options.py defines the rest. No torch here."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pixart_cli.cli.options import output_option
from pixart_cli.settings import DEFAULT_MASK_BLUR, DEFAULT_PAG_SCALE, DEFAULT_STRENGTH, MAX_PAG_SCALE

# Image to image
ImageFile = Annotated[
    str, typer.Argument(metavar="IMAGE", help="The image to start from (.png, .jpg, .webp, ...).", show_default=False)
]
InitLatentsOutput = output_option("init latents", "init.pt")
ImageWidth = Annotated[
    Optional[int],
    typer.Option(
        "--width",
        metavar="PX",
        help="Width to scale the image to [default: the image's own, rounded down to a "
        "multiple of 8]; the transformer runs at its nearest trained bin.",
        show_default=False,
    ),
]
ImageHeight = Annotated[
    Optional[int],
    typer.Option(
        "--height",
        metavar="PX",
        help="Height to scale the image to [default: the image's own, rounded down to a multiple of 8].",
        show_default=False,
    ),
]
InitLatents = Annotated[
    Optional[str],
    typer.Option(
        "--init-latents",
        metavar="FILE",
        help="Image to image: start from these latents (`pixart encode-image` writes "
        "them), noised as --strength says, instead of pure noise; the run takes "
        "their size.",
        show_default=False,
    ),
]
Image = Annotated[
    Optional[str],
    typer.Option(
        "--image",
        metavar="FILE",
        help="Image to image: start from this image, as encode-image + denoise "
        "--init-latents do; --width/--height scale it [default: its own size].",
        show_default=False,
    ),
]
Strength = Annotated[
    Optional[float],
    typer.Option(
        metavar="S",
        help=f"Image to image: how much of the schedule runs from the noised image, above 0 and up to 1 "
        f"(int(steps x S) steps run; 1 noises it fully) [default: {DEFAULT_STRENGTH:g}].",
        show_default=False,
    ),
]

# Inpainting
Mask = Annotated[
    Optional[str],
    typer.Option(
        "--mask",
        metavar="MASK",
        help="Inpainting: repaint only where MASK is white (black keeps the image): a mask image of the "
        "source image's size or aspect ratio (any mode, converted to grayscale), or a mask file from `pixart "
        "encode-mask`. Needs the image to repaint (--init-latents / --image).",
        show_default=False,
    ),
]
MaskBlur = Annotated[
    Optional[int],
    typer.Option(
        "--mask-blur",
        metavar="PX",
        help=f"Inpainting: soften the mask's edge with a Gaussian blur of PX pixels before it is scaled down; the "
        f"seam where --keep-unmasked pastes the image back blends over it (A1111 uses 4) [default: "
        f"{DEFAULT_MASK_BLUR}, a hard edge].",
        show_default=False,
    ),
]
KeepUnmasked = Annotated[
    Optional[bool],
    typer.Option(
        "--keep-unmasked/--no-keep-unmasked",
        help="Inpainting: after decode, paste the source image's own pixels back outside the mask (as A1111 "
        "does), so they are exactly the input's [default: on].",
        show_default=False,
    ),
]
MaskImageFile = Annotated[
    str,
    typer.Argument(
        metavar="MASK", help="Mask image: white repaints, black keeps (any mode, converted).", show_default=False
    ),
]
MaskSourceImage = Annotated[
    str,
    typer.Option(
        "--image",
        metavar="FILE",
        help="The image the mask is for, as given to encode-image: its size is the mask's, and its pixels are "
        "what --keep-unmasked pastes back.",
        show_default=False,
    ),
]
MaskOutput = output_option("mask", "mask.pt")

# Perturbed-attention guidance
PagScale = Annotated[
    Optional[float],
    typer.Option(
        "--pag-scale",
        metavar="S",
        help=f"Perturbed-attention guidance (PixArt-Σ only), 0 to {MAX_PAG_SCALE:g}: one more transformer row per "
        "image, whose --pag-layers use identity attention, as diffusers' PixArtSigmaPAGPipeline (diffusers' "
        f"docs use 3); with or without -g [default: {DEFAULT_PAG_SCALE:g}, off].",
        show_default=False,
    ),
]
PagLayers = Annotated[
    Optional[str],
    typer.Option(
        "--pag-layers",
        metavar="LAYERS",
        help="Comma-separated layer names (or patterns) whose self-attention PAG perturbs, as diffusers' "
        "pag_applied_layers, e.g. blocks.14 or blocks.8,blocks.14 [default: PixArtSigmaPAGPipeline's, read from "
        "the installed diffusers; denoise names the layers it perturbs].",
        show_default=False,
    ),
]


# ControlNet
ControlOutput = output_option("control latents", "control.pt")
ControlImageFile = Annotated[
    str,
    typer.Argument(
        metavar="IMAGE",
        help="The control image: an edge map (white edges on black, as HED makes them), any size; it is scaled and "
        "center-cropped to the generation size.",
        show_default=False,
    ),
]
Control = Annotated[
    Optional[str],
    typer.Option(
        "--control",
        metavar="FILE",
        help="ControlNet: the control latents (`pixart encode-control` writes them) that steer the layout, with "
        "--controlnet; the run takes their size.",
        show_default=False,
    ),
]
ControlImage = Annotated[
    Optional[str],
    typer.Option(
        "--control-image",
        metavar="FILE",
        help="ControlNet: the edge map that steers the layout, with --controlnet, as encode-control + denoise "
        "--control do; scaled to the generation size [default: its own size, or --image's].",
        show_default=False,
    ),
]
ControlNet = Annotated[
    Optional[str],
    typer.Option(
        "--controlnet",
        metavar="FILE|DIR[:SCALE]",
        help="A PixArt-α ControlNet adapter: the published .pth (PixArt-XL-2-1024-ControlNet.pth; its copy of the "
        "base model is not read) or a diffusers-layout .safetensors file or folder; SCALE multiplies its effect "
        "(default 1.0). Recorded in the outputs.",
        show_default=False,
    ),
]
