"""The key layouts of a PixArt ControlNet file, checked against the base transformer from names and shapes alone
(no tensor data is read): which layout, how many adapter blocks, every key and shape, and what the frozen base
inside an original checkpoint says about the model it was trained on (its sample size and caption width). The layouts are described in ``models/controlnet.py``; reading the file is ``controlnet_file``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pixart_cli.errors import PixartError, detail

BASE_PREFIXES = ("base_model.",)  # the frozen base model inside the original checkpoint: never kept
MAX_CONFIG_BYTES = 1 << 20
# Largest file accepted, in fp32 parameters of one base block: the base (its blocks plus embeddings worth less
# than one block) and an adapter of at most num_layers - 1 blocks, twice over for whatever else a training
# checkpoint keeps (optimizer state); anything larger is not a PixArt ControlNet for this model.
SIZE_LIMIT_BLOCKS_PER_LAYER = 4
SIZE_LIMIT_SLACK = 256 * 2**20

_INDEX = "(0|[1-9][0-9]*)"  # no leading zeros: "controlnet.01" would name block 1 twice
_ORIGINAL_KEY = re.compile(rf"controlnet\.{_INDEX}\.(.+)", re.ASCII)
_DIFFUSERS_KEY = re.compile(rf"controlnet_blocks\.{_INDEX}\.(.+)", re.ASCII)
_PROJECTIONS = ("before_proj.weight", "before_proj.bias", "after_proj.weight", "after_proj.bias")
# One original (PixArt) block tensor -> the BasicTransformerBlock tensors it holds, split along dim 0 in order.
_ORIGINAL_BLOCK = {
    "scale_shift_table": ("scale_shift_table",),
    "attn.qkv.weight": ("attn1.to_q.weight", "attn1.to_k.weight", "attn1.to_v.weight"),
    "attn.qkv.bias": ("attn1.to_q.bias", "attn1.to_k.bias", "attn1.to_v.bias"),
    "attn.proj.weight": ("attn1.to_out.0.weight",),
    "attn.proj.bias": ("attn1.to_out.0.bias",),
    "cross_attn.q_linear.weight": ("attn2.to_q.weight",),
    "cross_attn.q_linear.bias": ("attn2.to_q.bias",),
    "cross_attn.kv_linear.weight": ("attn2.to_k.weight", "attn2.to_v.weight"),
    "cross_attn.kv_linear.bias": ("attn2.to_k.bias", "attn2.to_v.bias"),
    "cross_attn.proj.weight": ("attn2.to_out.0.weight",),
    "cross_attn.proj.bias": ("attn2.to_out.0.bias",),
    "mlp.fc1.weight": ("ff.net.0.proj.weight",),
    "mlp.fc1.bias": ("ff.net.0.proj.bias",),
    "mlp.fc2.weight": ("ff.net.2.weight",),
    "mlp.fc2.bias": ("ff.net.2.bias",),
}
# What the frozen base inside an original checkpoint tells, read as shapes only: its caption projection's input
# width (the caption channels it was trained with, T5-XXL: 4096), its sin-cos position table [1, tokens, hidden]
# (PixArt's pos_embed buffer: (sample_size / patch)^2 tokens, 4096 for the 1024 model, 1024 for the 512 one).
_BASE_CAPTION_KEY = "base_model.y_embedder.y_proj.fc1.weight"
_BASE_POSITIONS_KEY = "base_model.pos_embed"


@dataclass(frozen=True)
class Expected:
    """Facts of the base transformer's config that an adapter must match."""

    model_id: str
    hidden: int
    heads: int
    head_dim: int
    caption_channels: int | None
    num_layers: int
    sample_size: int | None
    patch_size: int
    pixels_per_latent: int  # the VAE's scale: what a sample size is in pixels
    block_shapes: dict  # BasicTransformerBlock tensor name -> shape, built with the base's arguments
    block_numel: int

    @property
    def max_file_bytes(self) -> int:
        return 4 * self.block_numel * SIZE_LIMIT_BLOCKS_PER_LAYER * self.num_layers + SIZE_LIMIT_SLACK

    def pixels(self, sample_size: int) -> str:
        return f"{sample_size * self.pixels_per_latent}px"


def expected(config: Mapping, model_id: str, pixels_per_latent: int = 8) -> Expected:
    """What ``config`` (a transformer config) asks of an adapter."""
    from pixart_cli.models import controlnet

    hidden, arguments = controlnet.block_arguments(config)
    shapes = controlnet.block_shapes(config)
    defaults = controlnet.transformer_defaults()
    caption = config.get("caption_channels", defaults["caption_channels"])
    sample_size = config.get("sample_size", defaults["sample_size"])
    return Expected(
        model_id=model_id,
        hidden=hidden,
        heads=arguments["num_attention_heads"],
        head_dim=arguments["attention_head_dim"],
        caption_channels=None if caption is None else int(caption),
        num_layers=int(config.get("num_layers", defaults["num_layers"])),
        sample_size=None if sample_size is None else int(sample_size),
        patch_size=int(config.get("patch_size", defaults["patch_size"]) or 2),
        pixels_per_latent=pixels_per_latent,
        block_shapes=shapes,
        block_numel=sum(math.prod(shape) for shape in shapes.values()),
    )


def short(text: str, limit: int = 80) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class KeyPlan:
    """What a checked file holds: its layout, its adapter blocks, and how each file tensor maps to the diffusers
    layout."""

    layout: str  # "original" or "diffusers"
    num_blocks: int
    targets: dict[str, tuple[str, ...]]  # file key -> the diffusers-layout keys it holds (split along dim 0)
    splits: dict[str, tuple[int, ...]]  # file key -> dim-0 sizes of its parts
    dropped: int  # base_model tensors ignored
    numel: int  # the adapter's parameters


def plan_keys(source, expect: Expected, where: str) -> KeyPlan:
    """Every key, shape and dtype checked against the base transformer, before any tensor data is read."""
    from pixart_cli.models.controlnet import adapter_shapes

    found: dict[str, tuple[str, int, str]] = {}  # file key -> (layout, block index, rest of the key)
    unknown: list[str] = []
    base: dict[str, tuple[int, ...]] = {}  # the frozen base's keys, with their shapes
    for key in source.keys():
        if key.startswith(BASE_PREFIXES):
            base[key] = source.shape(key)
            source.drop(key)
            continue
        for layout, pattern in (("original", _ORIGINAL_KEY), ("diffusers", _DIFFUSERS_KEY)):
            match = pattern.fullmatch(key)
            if match:
                found[key] = (layout, int(match.group(1)), match.group(2))
                break
        else:
            unknown.append(key)
    if not found:
        pixart_base = any(
            k.startswith(("blocks.", "transformer_blocks.", "x_embedder.", "pos_embed.")) for k in unknown
        )
        what = "a PixArt transformer checkpoint, not a ControlNet adapter" if pixart_base else "no ControlNet adapter"
        raise PixartError(
            f"{where}: holds {what} (no controlnet.N.copied_block.* or controlnet_blocks.N.transformer_block.* "
            "keys); give a PixArt ControlNet file such as PixArt-XL-2-1024-ControlNet.pth"
        )
    layouts = sorted({layout for layout, _, _ in found.values()})
    if len(layouts) > 1:
        raise PixartError(
            f"{where}: mixes the original (controlnet.N.*) and the diffusers (controlnet_blocks.N.*) key layouts; "
            "one file must use one layout"
        )
    layout = layouts[0]
    if unknown:
        more = f" and {len(unknown) - 1} more" if len(unknown) > 1 else ""
        raise PixartError(
            f"{where}: unknown key {short(sorted(unknown)[0])}{more}; a PixArt ControlNet file holds only "
            f"{'base_model.* and controlnet.N.*' if layout == 'original' else 'controlnet_blocks.N.*'} tensors"
        )
    num_blocks = max(index for _, index, _ in found.values()) + 1
    if num_blocks + 1 > expect.num_layers:
        raise PixartError(
            f"{where}: has {num_blocks} adapter blocks, which need a base transformer of at least "
            f"{num_blocks + 1} layers; {expect.model_id} has {expect.num_layers}: use an adapter made for this model"
        )
    _check_hidden(source, found, expect, where)
    check_base(base, expect, where)

    shapes = adapter_shapes(expect.hidden, num_blocks, expect.block_shapes)
    targets: dict[str, tuple[str, ...]] = {}
    if layout == "diffusers":
        targets = {key: (key,) for key in shapes}
    else:
        for index in range(num_blocks):
            for rest, parts in _ORIGINAL_BLOCK.items():
                targets[f"controlnet.{index}.copied_block.{rest}"] = tuple(
                    f"controlnet_blocks.{index}.transformer_block.{part}" for part in parts
                )
            for rest in _PROJECTIONS[2:] if index else _PROJECTIONS:
                targets[f"controlnet.{index}.{rest}"] = (f"controlnet_blocks.{index}.{rest}",)
    produced = {target for parts in targets.values() for target in parts}
    unmapped = sorted(produced ^ set(shapes))
    if unmapped:  # a diffusers release whose block holds other tensors than the mapping above knows
        raise PixartError(
            f"{where}: this diffusers version's transformer block does not match PixArt's original block layout "
            f"({unmapped[0]}); the original layout cannot be converted: report it"
        )
    missing = [key for key in targets if key not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise PixartError(
            f"{where}: {missing[0]} is missing{more}; the file is incomplete or not a PixArt ControlNet: "
            "download it again"
        )
    extra = sorted(key for key in found if key not in targets)
    if extra:
        more = f" and {len(extra) - 1} more" if len(extra) > 1 else ""
        raise PixartError(
            f"{where}: unexpected adapter tensor {short(extra[0])}{more}; a PixArt ControlNet block holds only the "
            "copied transformer block and its projections (before_proj in block 0 only)"
        )
    splits: dict[str, tuple[int, ...]] = {}
    for key, parts in targets.items():
        part_shapes = [shapes[part] for part in parts]
        rest = {shape[1:] for shape in part_shapes}
        wanted = (sum(shape[0] for shape in part_shapes), *part_shapes[0][1:]) if len(rest) == 1 else None
        have = source.shape(key)
        if wanted is None or have != wanted:
            raise PixartError(
                f"{where}: {key} has shape {list(have)}, but {expect.model_id} needs {list(wanted or part_shapes[0])}; "
                "use an adapter made for this model"
            )
        dtype = source.dtype(key)
        if isinstance(dtype, str) or not dtype.is_floating_point:
            raise PixartError(
                f"{where}: {key} is not a float tensor (dtype {str(dtype).removeprefix('torch.')}); the file is not "
                "a ControlNet checkpoint"
            )
        splits[key] = tuple(shape[0] for shape in part_shapes)
    numel = sum(math.prod(shape) for shape in shapes.values())
    return KeyPlan(layout, num_blocks, targets, splits, len(base), numel)


def _check_hidden(source, found: dict, expect: Expected, where: str) -> None:
    """The adapter's hidden size (from its projections and modulation tables) against heads x head dim."""
    for key, (_, _, rest) in sorted(found.items()):
        if rest in ("after_proj.weight", "before_proj.weight") or rest.endswith(".scale_shift_table"):
            shape = source.shape(key)
            size = shape[-1] if shape else None
            if size != expect.hidden:
                raise PixartError(
                    f"{where}: is an adapter for a transformer of hidden size {size} ({key} is {list(shape)}), but "
                    f"{expect.model_id} has hidden size {expect.hidden} ({expect.heads} heads x {expect.head_dim}); "
                    "use a ControlNet made for this model"
                )


def check_base(base: dict[str, tuple[int, ...]], expect: Expected, where: str) -> None:
    """What the frozen base of an original checkpoint says about the model the adapter was trained on, against
    ``--model``: the caption width, the sample size (the 512 and the 1024 model have the same shapes otherwise,
    so an adapter for one fits the other's blocks and would give wrong images)."""
    caption = base.get(_BASE_CAPTION_KEY)
    if caption is not None and expect.caption_channels is not None and len(caption) == 2:
        if caption[1] != expect.caption_channels:
            raise PixartError(
                f"{where}: was trained with a base model of {caption[1]} caption channels, but "
                f"{expect.model_id} takes {expect.caption_channels}; use an adapter made for this model"
            )
    positions = base.get(_BASE_POSITIONS_KEY)
    if positions is not None and len(positions) == 3 and expect.sample_size is not None:
        side = math.isqrt(positions[1])
        trained = side * expect.patch_size
        if side * side == positions[1] and trained != expect.sample_size:
            raise PixartError(
                f"{where}: is the ControlNet of a {expect.pixels(trained)} model (its base_model.pos_embed holds "
                f"{positions[1]} positions: sample size {trained}), but {expect.model_id} is a "
                f"{expect.pixels(expect.sample_size)} model (sample size {expect.sample_size}); use the ControlNet "
                f"made for it (PixArt-XL-2-{expect.pixels(expect.sample_size).removesuffix('px')}-ControlNet)"
            )


def check_folder_config(weights_file: Path, num_blocks: int, where: str) -> None:
    """diffusers' save_pretrained writes config.json ({"num_layers": N}) beside the weights: it must agree."""
    config = weights_file.parent / "config.json"
    if not config.is_file():
        return
    try:
        if config.stat().st_size > MAX_CONFIG_BYTES:
            raise ValueError("larger than 1 MB")
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PixartError(f"{where}: its config.json cannot be read ({detail(error)}); fix or remove it") from None
    layers = data.get("num_layers") if isinstance(data, dict) else None
    if isinstance(layers, int) and not isinstance(layers, bool) and layers != num_blocks:
        raise PixartError(
            f"{where}: config.json says num_layers {layers} but the weights hold {num_blocks} blocks; the folder "
            "is inconsistent: download it again"
        )
