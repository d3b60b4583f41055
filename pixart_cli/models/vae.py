"""The two halves of diffusers' AutoencoderKL, built from diffusers' own ``Decoder`` and ``Encoder`` without
importing ``AutoencoderKL``, with its tiling.

``diffusers.models.autoencoders.autoencoder_kl`` imports diffusers' LoRA loaders, which import all of
transformers' modeling code and torch's compiler stack: seconds of a decode process (issue 10), and 2.5-8.6 s of
the tiled plans' load on an H200 (issue 19). Decoding needs only ``post_quant_conv`` and ``decoder``
(``AutoencoderKL._decode``), so this module builds those two from the same classes and reads their tensors from
the same safetensors file. The forward pass is the same code, so images are identical (tests/test_lean.py,
tests/test_parity.py).

Encoding an image (``pixart encode-image``) is the other half, built the same way: ``encoder`` and
``quant_conv``, then diffusers' ``DiagonalGaussianDistribution`` (``AutoencoderKL.encode``).

Tiling (the plans of small cards) is ``AutoencoderKL.tiled_decode`` / ``_tiled_encode``, step for step: tiles of
``tile`` pixels (``tile / 8`` latents) every 3/4 of a tile, blended over the overlap with diffusers' linear ramp
(``blend_v`` then ``blend_h``, in the same order, rounded as they round), and cropped (tests/test_memory.py checks
it against diffusers' tiled decode and encode).

Only a checkpoint in another layout (renamed keys, several files) still loads ``AutoencoderKL``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

WEIGHTS = "diffusion_pytorch_model.safetensors"
TILE_OVERLAP = 0.25  # AutoencoderKL.tile_overlap_factor


def _parts(config: dict, with_encoder: bool = False) -> dict:
    """AutoencoderKL's submodules for ``config`` (its constructor's defaults where the config is silent)."""
    import torch

    from pixart_cli.models.facade import import_diffusers

    vae = import_diffusers("diffusers.models.autoencoders.vae")
    latent = config.get("latent_channels", 4)
    shared = dict(
        block_out_channels=tuple(config.get("block_out_channels", (64,))),
        layers_per_block=config.get("layers_per_block", 1),
        norm_num_groups=config.get("norm_num_groups", 32),
        act_fn=config.get("act_fn", "silu"),
        mid_block_add_attention=config.get("mid_block_add_attention", True),
    )
    parts = {
        "decoder": vae.Decoder(
            in_channels=latent,
            out_channels=config.get("out_channels", 3),
            up_block_types=tuple(config.get("up_block_types", ("UpDecoderBlock2D",))),
            **shared,
        )
    }
    if config.get("use_post_quant_conv", True):
        parts["post_quant_conv"] = torch.nn.Conv2d(latent, latent, 1)
    if with_encoder:
        parts["encoder"] = vae.Encoder(
            in_channels=config.get("in_channels", 3),
            out_channels=latent,
            down_block_types=tuple(config.get("down_block_types", ("DownEncoderBlock2D",))),
            double_z=True,
            **shared,
        )
        if config.get("use_quant_conv", True):
            parts["quant_conv"] = torch.nn.Conv2d(2 * latent, 2 * latent, 1)
    return parts


def decoder_skeleton(config: dict):
    """The decoding half's parameters as a module (for sizes, on the meta device): what decode loads."""
    import torch

    parts = _parts(config)
    return torch.nn.ModuleDict({name: parts[name] for name in ("decoder", "post_quant_conv") if name in parts})


def load_vae_decoder(folder: Path, config: dict, dtype, device):
    """The decoder of the VAE in ``folder`` as a module with AutoencoderKL's ``decode(z, return_dict=False)``
    and ``config.scaling_factor``; None where the folder is not one plain safetensors file with exactly the
    expected tensor names (the caller then loads AutoencoderKL)."""
    import torch

    with torch.device("meta"):
        decoder = _decoder_class()(_parts(config), config)
    return _load_weights(decoder, folder, dtype, device)


def encoder_skeleton(config: dict):
    """The encoding half's parameters as a module (for sizes, on the meta device)."""
    import torch

    parts = _parts(config, with_encoder=True)
    return torch.nn.ModuleDict({name: parts[name] for name in ("encoder", "quant_conv") if name in parts})


def load_vae_encoder(folder: Path, config: dict, dtype, device):
    """The encoder of the VAE in ``folder`` as a module with AutoencoderKL's ``encode(x).latent_dist`` and
    ``config.scaling_factor``; None as for ``load_vae_decoder`` (the caller then loads AutoencoderKL)."""
    import torch

    with torch.device("meta"):
        encoder = _encoder_class()(_parts(config, with_encoder=True), config)
    return _load_weights(encoder, folder, dtype, device)


def load_vae_half(source, config: dict, ctx, tile: int | None, half: str):
    """The VAE half a stage runs (``half`` "decoder" or "encoder") on ``ctx.device``, in eval mode, tiled when
    ``tile`` (pixels) is given.

    The compact module above, read from the same safetensors file, without importing AutoencoderKL. A checkpoint
    in another layout: diffusers' AutoencoderKL with its own tiling, the other half dropped before it reaches the
    device.
    """
    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.source import load_component

    compact = load_vae_decoder if half == "decoder" else load_vae_encoder
    vae = load_component(source, "vae", lambda **_: compact(source.folder("vae"), config, ctx.dtype, ctx.device))
    if vae is not None:  # None: a checkpoint in another layout, which AutoencoderKL reads below
        vae.tile = tile
        return vae.to(ctx.device).eval()
    # AutoencoderKL needs torch._dynamo at import (through diffusers.loaders.peft): not hidden here.
    AutoencoderKL = import_diffusers("diffusers.models.autoencoders.autoencoder_kl", hide_optional=False).AutoencoderKL
    vae = load_component(source, "vae", AutoencoderKL.from_pretrained, dtype=ctx.dtype)
    if half == "decoder":
        vae.encoder = vae.quant_conv = None
    else:
        vae.decoder = vae.post_quant_conv = None
    vae.to(ctx.device).eval()
    if tile is not None:  # diffusers' tiling; its tile size is the config's sample_size unless set here
        vae.enable_tiling()
        vae.tile_sample_min_size = tile
        vae.tile_latent_min_size = tile // source.vae_scale_factor
    return vae


def tiled(x, run, tile_in: int, tile_out: int):
    """``run`` over overlapping tiles of ``x`` [B, C, H, W], blended: AutoencoderKL.tiled_decode (``tile_in``
    latents in, ``tile_out`` pixels out) and ``_tiled_encode`` (pixels in, latents out), step for step."""
    import torch

    stride = int(tile_in * (1 - TILE_OVERLAP))
    extent = int(tile_out * TILE_OVERLAP)
    limit = tile_out - extent
    rows = [
        [run(x[:, :, i : i + tile_in, j : j + tile_in]) for j in range(0, x.shape[3], stride)]
        for i in range(0, x.shape[2], stride)
    ]
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, tile in enumerate(row):
            # the tile above, then the tile to the left, blended into this one (in place, as diffusers does)
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, extent, dim=2)
            if j > 0:
                tile = _blend(row[j - 1], tile, extent, dim=3)
            result_row.append(tile[:, :, :limit, :limit])
        result_rows.append(torch.cat(result_row, dim=3))
    return torch.cat(result_rows, dim=2)


def _blend(a, b, extent: int, dim: int):
    """AutoencoderKL.blend_v (``dim`` 2) / blend_h (3) in one step: the first ``extent`` rows (columns) of ``b``
    become ``a``'s last ones x (1 - k / extent) + ``b``'s x k / extent.

    Rounded as diffusers' row-by-row loop rounds: each product of a tensor and a Python float is computed in fp32
    (the weight rounded from double to fp32) and rounded to the tensor's dtype, then the two are added in it.
    """
    import torch

    extent = min(a.shape[dim], b.shape[dim], extent)
    if extent <= 0:
        return b
    ramp = torch.arange(extent, dtype=torch.float64) / extent  # y / blend_extent, in double as Python computes it
    shape = [1] * b.dim()
    shape[dim] = extent
    keep = (1 - ramp).to(torch.float32).reshape(shape).to(b.device)
    take = ramp.to(torch.float32).reshape(shape).to(b.device)
    opmath = torch.float64 if b.dtype == torch.float64 else torch.float32
    ours = b.narrow(dim, 0, extent)
    theirs = a.narrow(dim, a.shape[dim] - extent, extent)
    ours.copy_((theirs.to(opmath) * keep).to(b.dtype) + (ours.to(opmath) * take).to(b.dtype))
    return b


def _load_weights(module, folder: Path, dtype, device):
    """``module``'s tensors (built on the meta device) read from the folder's one safetensors file (or, where it has
    none, its one .bin checkpoint: files/model_weights.py), or None."""
    from pixart_cli.files.model_weights import BIN_WEIGHTS
    from pixart_cli.models.streaming import tensor_file as open_tensor_file

    path = Path(folder) / WEIGHTS
    if not path.is_file() and not (Path(folder) / f"{WEIGHTS}.index.json").is_file():
        path = Path(folder) / BIN_WEIGHTS["vae"]
    if not path.is_file():
        return None
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    wanted = set(shapes)
    tensor_file = open_tensor_file(path)
    try:
        if not wanted <= set(tensor_file.keys()):
            return None  # renamed (older) attention keys, and the like: AutoencoderKL converts those
        tensor_file.check_shapes(shapes)  # before anything is read: a file cannot ask for more than the config
        # dtype at load, as from_pretrained(dtype=...) casts every AutoencoderKL tensor
        state = {name: tensor_file.read(name, device).to(dtype) for name in sorted(wanted)}
    finally:
        tensor_file.close()
    module.load_state_dict(state, strict=True, assign=True)
    return module.eval()


@functools.cache
def _decoder_class():
    """Defined on first use: torch is imported only when a stage runs."""
    import torch

    class VaeDecoder(torch.nn.Module):
        """``post_quant_conv`` then ``decoder``: AutoencoderKL._decode, tiled as diffusers tiles when ``tile``
        (pixels) is set and the latents are larger than a tile."""

        def __init__(self, parts: dict, config: dict):
            super().__init__()
            self.decoder = parts["decoder"]
            self.post_quant_conv = parts.get("post_quant_conv")
            self.config = SimpleNamespace(scaling_factor=config.get("scaling_factor", 0.18215))
            self.scale = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
            self.tile: int | None = None

        def _run(self, z):
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return self.decoder(z)

        def decode(self, z, return_dict: bool = False):
            latent_tile = None if self.tile is None else self.tile // self.scale
            if latent_tile is not None and (z.shape[-1] > latent_tile or z.shape[-2] > latent_tile):
                return (tiled(z, self._run, latent_tile, self.tile),)
            return (self._run(z),)

    return VaeDecoder


@functools.cache
def _encoder_class():
    """Defined on first use: torch is imported only when a stage runs."""
    import torch

    from pixart_cli.models.facade import import_diffusers

    DiagonalGaussianDistribution = import_diffusers("diffusers.models.autoencoders.vae").DiagonalGaussianDistribution

    class VaeEncoder(torch.nn.Module):
        """``encoder`` then ``quant_conv``, as a posterior: AutoencoderKL.encode without slicing, tiled as
        diffusers tiles when ``tile`` (pixels) is set and the image is larger than a tile."""

        def __init__(self, parts: dict, config: dict):
            super().__init__()
            self.encoder = parts["encoder"]
            self.quant_conv = parts.get("quant_conv")
            self.config = SimpleNamespace(scaling_factor=config.get("scaling_factor", 0.18215))
            self.scale = 2 ** (len(config.get("block_out_channels", (64,))) - 1)
            self.tile: int | None = None

        def _run(self, x):
            moments = self.encoder(x)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
            return moments

        def encode(self, x):
            if self.tile is not None and (x.shape[-1] > self.tile or x.shape[-2] > self.tile):
                moments = tiled(x, self._run, self.tile, self.tile // self.scale)
            else:
                moments = self._run(x)
            return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(moments))

    return VaeEncoder


def encode_pixels(image, sizes, ctx, stage: str, seed: int):
    """An image (PIL, RGB) -> VAE latents [1, C, H/8, W/8] at ``sizes`` (a ``plan.Schedule``: the size the
    transformer runs at), as diffusers' img2img pipelines make them: resized and center-cropped by the image
    processor (``resize_mode="crop"``, to [-1, 1]), ``latent_dist.sample`` from a CPU generator seeded ``seed``,
    times the VAE's scaling factor. Loads only the VAE's encoder, full or tiled for the budget (the decoder's
    estimate: the encoder's activations are no larger). Returns (latents on the CPU, scaling factor); the stage
    ``stage`` is named in the plan's note and the memory report."""
    import dataclasses

    import torch

    from pixart_cli.models import memory
    from pixart_cli.models.facade import import_diffusers

    PixArtImageProcessor = import_diffusers("diffusers.image_processor").PixArtImageProcessor
    source = ctx.model
    meter = ctx.meter(stage)
    budget, context = ctx.budget()
    config = source.config("vae")
    skeleton = memory.meta_model(encoder_skeleton, config, ctx.dtype)
    chosen = dataclasses.replace(
        memory.plan_decode(
            budget,
            context,
            memory.parameter_bytes(skeleton),
            config["block_out_channels"][0],
            sizes.height,
            sizes.width,
            ctx.dtype.itemsize,
        ),
        stage=stage,
    )
    del skeleton
    ctx.note(chosen.describe())
    with meter.phase("load"):
        vae = load_vae_half(source, config, ctx, chosen.tile, "encoder")

    processor = PixArtImageProcessor(vae_scale_factor=source.vae_scale_factor)
    ctx.advance(stage, 0, 1)
    with meter.phase("compute"), torch.inference_mode():
        pixels = processor.preprocess(image, height=sizes.height, width=sizes.width, resize_mode="crop")
        posterior = vae.encode(pixels.to(ctx.device, ctx.dtype)).latent_dist
        latents = (posterior.sample(torch.Generator("cpu").manual_seed(seed)) * vae.config.scaling_factor).cpu()
    ctx.advance(stage, 1, 1)
    scaling_factor = float(vae.config.scaling_factor)
    del vae, posterior
    ctx.free()
    meter.finish(chosen.name if not chosen.tile else f"tiled-{chosen.tile}", ctx.reports)
    return latents, scaling_factor
