"""The decoding half of diffusers' AutoencoderKL, built from diffusers' own ``Decoder`` without importing
``AutoencoderKL``.

``diffusers.models.autoencoders.autoencoder_kl`` imports diffusers' LoRA loaders, which import all of
transformers' modeling code and torch's compiler stack: seconds of a decode process (issue 10). Decoding
needs only ``post_quant_conv`` and ``decoder`` (``AutoencoderKL._decode`` without tiling), so this module builds
those two from the same classes and reads their tensors from the same safetensors file. The forward pass is
the same code, so images are identical (tests/test_lean.py, tests/test_parity.py).

Encoding an image (``pixart encode-image``) is the other half, built the same way: ``encoder`` and
``quant_conv``, then diffusers' ``DiagonalGaussianDistribution`` (``AutoencoderKL.encode`` without tiling).

Anything else (tiled decode or encode, a checkpoint in another layout or with renamed keys) uses ``AutoencoderKL``.
"""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

WEIGHTS = "diffusion_pytorch_model.safetensors"


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


def vae_skeleton(config: dict):
    """All of AutoencoderKL's parameters as a module (for sizes, on the meta device): the memory plan counts
    the whole VAE, as the tiled plan loads it."""
    import torch

    return torch.nn.ModuleDict(_parts(config, with_encoder=True))


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
    """The VAE half a stage runs (``half`` "decoder" or "encoder") on ``ctx.device``, in eval mode.

    Untiled: the compact module above, read from the same safetensors file, without importing AutoencoderKL.
    Tiled (``tile`` pixels), or a checkpoint in another layout: diffusers' AutoencoderKL with its tiling, the
    other half dropped before it reaches the device.
    """
    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.source import load_component

    compact = load_vae_decoder if half == "decoder" else load_vae_encoder
    if tile is None:
        vae = load_component(source, "vae", lambda **_: compact(source.folder("vae"), config, ctx.dtype, ctx.device))
        if vae is not None:  # None: a checkpoint in another layout, which AutoencoderKL reads below
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


def _load_weights(module, folder: Path, dtype, device):
    """``module``'s tensors (built on the meta device) read from the folder's one safetensors file, or None."""
    from pixart_cli.models.streaming import TensorFile

    path = Path(folder) / WEIGHTS
    if not path.is_file():
        return None
    shapes = {name: tuple(tensor.shape) for name, tensor in module.state_dict().items()}
    wanted = set(shapes)
    tensor_file = TensorFile(path)
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
        """``post_quant_conv`` then ``decoder``: AutoencoderKL._decode without tiling."""

        def __init__(self, parts: dict, config: dict):
            super().__init__()
            self.decoder = parts["decoder"]
            self.post_quant_conv = parts.get("post_quant_conv")
            self.config = SimpleNamespace(scaling_factor=config.get("scaling_factor", 0.18215))

        def decode(self, z, return_dict: bool = False):
            if self.post_quant_conv is not None:
                z = self.post_quant_conv(z)
            return (self.decoder(z),)

    return VaeDecoder


@functools.cache
def _encoder_class():
    """Defined on first use: torch is imported only when a stage runs."""
    import torch

    from pixart_cli.models.facade import import_diffusers

    DiagonalGaussianDistribution = import_diffusers("diffusers.models.autoencoders.vae").DiagonalGaussianDistribution

    class VaeEncoder(torch.nn.Module):
        """``encoder`` then ``quant_conv``, as a posterior: AutoencoderKL.encode without tiling or slicing."""

        def __init__(self, parts: dict, config: dict):
            super().__init__()
            self.encoder = parts["encoder"]
            self.quant_conv = parts.get("quant_conv")
            self.config = SimpleNamespace(scaling_factor=config.get("scaling_factor", 0.18215))

        def encode(self, x):
            moments = self.encoder(x)
            if self.quant_conv is not None:
                moments = self.quant_conv(moments)
            return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(moments))

    return VaeEncoder
