"""LoRA for the PixArt transformer: read a .safetensors file, check it against the model, fuse it into the weights.

diffusers has no LoRA loader for PixArt (its issue #9887: no ``PeftAdapterMixin`` on ``PixArtTransformer2DModel``),
so pixart reads the files itself. Three namings are accepted, each found in the trainers' own code:

* diffusers / PEFT: ``transformer.<module>.lora_A.weight`` and ``.lora_B.weight`` (diffusers' ``pack_weights`` with
  the ``transformer`` prefix, as SimpleTuner saves PixArt LoRAs), also with PEFT's ``base_model.model.`` prefix
  (``PeftModel.save_pretrained``, the PixArt-Σ repo's LoRA script) or none. Alpha comes from ``.alpha`` keys, from
  the ``lora_adapter_metadata`` JSON that diffusers' ``write_lora_layers`` puts in the safetensors metadata
  (``transformer.lora_alpha``, ``transformer.alpha_pattern``, ``transformer.use_rslora``), else alpha = rank.
* kohya: ``<prefix>_<module with dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
  OneTrainer's PixArt saver writes prefix ``lora_transformer`` (its ``convert_to_legacy_diffusers``, the default);
  LyCORIS (SimpleTuner's ``lora_type=lycoris``, algo ``lora``) writes ``lycoris``; kohya's own trainers use
  ``lora_unet`` for the denoiser.
* OneTrainer's OMI naming (``enable_omi_format``): the original PixArt module names, ``transformer.blocks.N.attn.qkv.0``
  and so on, with ``lora_down`` / ``lora_up`` / ``alpha``.

The LoRA is fused into the weights when the transformer loads: W' = W + scale * alpha / rank * up @ down, computed
in fp32 and rounded once to the model's dtype. That costs nothing per step and works with every denoise plan (the
streamed plan fuses before diffusers' group offloading takes the weights). ``benchmarks/lora_bench.py`` measures
it against peft's unfused adapters.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError, detail

OPTION = "--lora"
DEFAULT_SCALE = 1.0

# (suffix, role) of the tensors a LoRA module has, in both namings.
_PEFT_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up"}
_KOHYA_SUFFIXES = {".lora_down.weight": "down", ".lora_up.weight": "up"}
_ALPHA_SUFFIX = ".alpha"
# Prefixes in front of the diffusers module name in PEFT-named files, longest first.
# "unet.base_model.model.": PixArt-Σ's train_pixart_lora_hf.py passes a PeftModel's state dict to
# StableDiffusionPipeline.save_lora_weights, which packs it under "unet"; bare names are seen in the wild too.
_PEFT_PREFIXES = ("unet.base_model.model.", "base_model.model.", "transformer.", "")
# PEFT's save_pretrained keeps lora_alpha beside the weights, not in them.
_PEFT_WEIGHTS, _PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Prefixes of kohya-named transformer modules (OneTrainer, LyCORIS, kohya sd-scripts' denoiser prefix).
_KOHYA_PREFIXES = ("lora_transformer_", "lycoris_", "lora_unet_")
_TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder.", "te.", "t5.")
# Adapter types other than plain LoRA: named so the error says what the file is.
_UNSUPPORTED = {
    "lokr_": "LoKr",
    "hada_": "LoHa",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
    ".oft_": "OFT",
    "lora_mid": "LoCon (Tucker)",
    ".diff": "full weight difference",
}


@dataclass(frozen=True)
class LoraSpec:
    """One --lora value: the file and its strength."""

    path: Path
    scale: float = DEFAULT_SCALE


@dataclass
class LoraModule:
    """One adapted layer: down [rank, in(, kh, kw)], up [out, rank(, 1, 1)], and alpha."""

    down: Any
    up: Any
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])


@dataclass
class LoraWeights:
    """A LoRA file, read and checked on its own. ``modules`` is keyed by the module names as the file spells them."""

    path: Path
    sha256: str
    scale: float
    naming: str  # "peft", "kohya" or "omi"
    modules: dict[str, LoraModule] = field(default_factory=dict)
    alpha_source: str = "alpha = rank"  # where alpha came from: .alpha keys, metadata, adapter_config.json

    @property
    def name(self) -> str:
        return self.path.name

    def record(self) -> dict:
        """What the latents meta and the image metadata keep of it."""
        return {"file": self.name, "sha256": self.sha256, "scale": self.scale}

    def describe(self) -> str:
        ranks = sorted({m.rank for m in self.modules.values()})
        rank = str(ranks[0]) if len(ranks) == 1 else f"{ranks[0]}-{ranks[-1]}"
        return (
            f"lora: {self.name} x{self.scale:g} ({len(self.modules)} layers, rank {rank}, {self.naming} naming, "
            f"alpha from {self.alpha_source})"
        )


# --- parsing and reading -----------------------------------------------------------------------------------
def parse_lora_spec(text: str) -> LoraSpec:
    """'FILE' or 'FILE:SCALE' -> LoraSpec. A colon followed by something that is not a number is part of FILE."""
    path, scale = text, DEFAULT_SCALE
    head, colon, tail = text.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass  # a path with a colon in it (C:\... or a:b.safetensors)
    if not math.isfinite(scale):
        raise PixartError(f"{OPTION} {text}: scale {tail} is not a finite number; give FILE:0.8 or FILE")
    if not path:
        raise PixartError(f"{OPTION} {text!r}: no file name; give FILE or FILE:SCALE")
    if path == text and colon and head and not os.path.lexists(text) and os.path.isfile(head):
        # FILE:SCALE with a scale that is not a number (no file is named so, with the colon)
        raise PixartError(f"{OPTION} {text}: the scale {tail!r} is not a number; give {head}:0.8 or {head}")
    return LoraSpec(Path(path), scale)


def read_lora(spec: LoraSpec) -> LoraWeights:
    """Read and validate a LoRA .safetensors file on its own (pairing, ranks, alphas); no model needed.

    safetensors holds only tensors and a string header, so reading it runs no code; a pickle (.pt, .ckpt, .bin)
    is refused. The whole file is read once: its sha256 and its tensors come from the same bytes.
    """
    path = spec.path
    where = f"{OPTION} {path}"
    if path.is_dir():
        inside = path / _PEFT_WEIGHTS
        fix = f"give {inside}" if inside.is_file() else "give the LoRA's .safetensors file"
        raise PixartError(f"{where}: is a folder; {fix}")
    if not path.is_file():
        broken = " (a broken symbolic link)" if path.is_symlink() else ""
        scale = "; FILE:SCALE takes a number after the colon" if ":" in path.name else ""
        raise PixartError(f"{where}: no such file{broken}{scale}")
    try:
        data = path.read_bytes()
    except OSError as error:
        raise PixartError(f"{where}: cannot read it ({error.strerror or error})") from None
    tensors, metadata = _parse_safetensors(data, where)
    config, source = _adapter_config(metadata, where), "lora_adapter_metadata"
    sibling = path.parent / _PEFT_CONFIG
    if not config and path.name == _PEFT_WEIGHTS and sibling.is_file():
        config, source = _sibling_config(sibling), _PEFT_CONFIG
    naming, modules, has_alpha_keys = _group_modules(tensors, config, where)
    if has_alpha_keys:
        source = ".alpha keys"
    elif config.get("lora_alpha") is None and not config.get("alpha_pattern"):
        source = "none in the file: alpha = rank"
    return LoraWeights(path, hashlib.sha256(data).hexdigest(), spec.scale, naming, modules, source)


def _sibling_config(path: Path) -> dict:
    """lora_alpha and friends from PEFT's adapter_config.json next to adapter_model.safetensors."""
    try:
        if path.stat().st_size > 2**20:
            raise ValueError("larger than 1 MB")
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise PixartError(f"{OPTION} {path}: cannot read it ({detail(error)})") from None
    return config if isinstance(config, dict) else {}


def _parse_safetensors(data: bytes, where: str) -> tuple[dict, dict]:
    """(tensors, string metadata) of a safetensors file's bytes; anything else is one line naming the file."""
    from safetensors.torch import load

    if len(data) < 8 or data[8:9] != b"{":
        raise PixartError(
            f"{where}: not a .safetensors file (pixart reads LoRA files only in safetensors format, "
            "which cannot run code; convert a .pt/.ckpt LoRA first)"
        )
    header_size = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8 : 8 + header_size])
        tensors = load(data)
    except Exception as error:
        raise PixartError(f"{where}: damaged .safetensors file ({detail(error)[:120]})") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return tensors, metadata if isinstance(metadata, dict) else {}


def _split_key(key: str) -> tuple[str, str, str]:
    """key -> (module, role, naming); role is down, up or alpha."""
    for suffixes, naming in ((_PEFT_SUFFIXES, "peft"), (_KOHYA_SUFFIXES, "kohya")):
        for suffix, role in suffixes.items():
            if key.endswith(suffix):
                return key[: -len(suffix)], role, naming
    if key.endswith(_ALPHA_SUFFIX):
        return key[: -len(_ALPHA_SUFFIX)], "alpha", ""
    return key, "", ""


def _group_modules(tensors: dict, config: dict, where: str) -> tuple[str, dict[str, LoraModule], bool]:
    """(naming, modules, whether alphas came from .alpha keys) of a file's tensors."""
    import torch

    parts: dict[str, dict[str, Any]] = {}
    namings: set[str] = set()
    for key, tensor in tensors.items():
        for marker, kind in _UNSUPPORTED.items():
            if marker in key:
                raise PixartError(
                    f"{where}: holds {kind} weights ({key}); pixart applies plain LoRA only "
                    "(lora_A/lora_B or lora_down/lora_up)"
                )
        module, role, naming = _split_key(key)
        if module.startswith(_TEXT_ENCODER_PREFIXES):
            raise PixartError(
                f"{where}: holds text-encoder (T5) LoRA weights ({key}); pixart applies LoRA to the "
                "transformer only: save the LoRA without text-encoder training"
            )
        if not role:
            raise PixartError(
                f"{where}: unrecognised key {key!r}; pixart reads LoRA files named as diffusers/PEFT "
                "(lora_A/lora_B) or kohya (lora_down/lora_up) write them"
            )
        if not tensor.is_floating_point() or not bool(torch.isfinite(tensor).all()):
            raise PixartError(f"{where}: {key} is not a finite float tensor (dtype {tensor.dtype})")
        if naming:
            namings.add(naming)
        parts.setdefault(module, {})[role] = tensor
    if len(namings) > 1:
        raise PixartError(
            f"{where}: mixes diffusers (lora_A/lora_B) and kohya (lora_down/lora_up) keys; one file must use one naming"
        )
    if not namings:
        raise PixartError(f"{where}: holds no LoRA weights (no lora_A/lora_B or lora_down/lora_up keys)")
    naming = namings.pop()
    modules = {}
    for module, found in sorted(parts.items()):
        down, up = found.get("down"), found.get("up")
        if down is None or up is None:
            have, missing = ("down", "up") if up is None else ("up", "down")
            raise PixartError(
                f"{where}: {module} has a LoRA {have} matrix but no {missing} matrix; the file is incomplete"
            )
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise PixartError(
                f"{where}: {module} has down {list(down.shape)} and up {list(up.shape)}; expected "
                "2-D matrices (or 4-D for a convolution)"
            )
        if up.shape[1] != down.shape[0]:
            raise PixartError(
                f"{where}: {module}: wrong rank pairing, down {list(down.shape)} has rank "
                f"{down.shape[0]} but up {list(up.shape)} has {up.shape[1]}"
            )
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise PixartError(f"{where}: {module}: up {list(up.shape)} must be a 1x1 convolution")
        alpha = _alpha(module, found.get("alpha"), config, int(down.shape[0]), where)
        modules[module] = LoraModule(down, up, alpha)
    if naming == "kohya" and any("." in name for name in modules):
        naming = "omi"  # lora_down/lora_up on dotted, original PixArt module names (OneTrainer's OMI format)
    return naming, modules, any("alpha" in found for found in parts.values())


def _adapter_config(metadata: dict, where: str) -> dict:
    """The transformer's LoraConfig fields from diffusers' ``lora_adapter_metadata`` (empty when there is none)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError:
        raise PixartError(f"{where}: its lora_adapter_metadata is not valid JSON") from None
    if not isinstance(packed, dict):
        return {}
    # diffusers packs each component's LoraConfig under its name: "transformer.lora_alpha", ...
    prefix = "transformer."
    fields = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
    return fields or packed


def _alpha(module: str, tensor, config: dict, rank: int, where: str) -> float:
    """alpha of one module: its .alpha tensor, else the adapter config (alpha_pattern, lora_alpha), else rank.

    PEFT's rsLoRA scales by alpha / sqrt(rank); returned here as the equivalent alpha for alpha / rank.
    """
    if tensor is not None:
        if tensor.numel() != 1:
            raise PixartError(f"{where}: {module}.alpha has shape {list(tensor.shape)}; expected one number")
        return float(tensor.reshape(()).item())
    alpha = None
    patterns = config.get("alpha_pattern")
    if isinstance(patterns, dict):
        for pattern, value in patterns.items():
            try:  # PEFT matches these keys as regular expressions against module names
                matched = re.fullmatch(rf"(.*\.)?({pattern})", module) is not None
            except re.error:
                matched = module == pattern or module.endswith(f".{pattern}")
            if matched:
                alpha = value
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return float(rank)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise PixartError(f"{where}: lora_alpha {alpha!r} in its metadata is not a number")
    if config.get("use_rslora") is True:
        return float(alpha) * math.sqrt(rank)
    return float(alpha)


# --- fitting the model ------------------------------------------------------------------------------------
def _omi_names(num_layers: int) -> dict[str, str]:
    """OneTrainer's OMI names (the original PixArt checkpoint's) -> diffusers module names.

    The same table as OneTrainer's modules/util/convert/lora/convert_pixart_lora.py.
    """
    names = {
        "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
        "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
        "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
        "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "final_layer.linear": "proj_out",
    }
    block = {
        "attn.qkv.0": "attn1.to_q",
        "attn.qkv.1": "attn1.to_k",
        "attn.qkv.2": "attn1.to_v",
        "attn.proj": "attn1.to_out.0",
        "cross_attn.q_linear": "attn2.to_q",
        "cross_attn.kv_linear.0": "attn2.to_k",
        "cross_attn.kv_linear.1": "attn2.to_v",
        "cross_attn.proj": "attn2.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
    }
    for index in range(num_layers):
        names.update({f"blocks.{index}.{k}": f"transformer_blocks.{index}.{v}" for k, v in block.items()})
    return {f"transformer.{k}": v for k, v in names.items()}


def _layers(transformer) -> dict[str, Any]:
    """The transformer's Linear and Conv2d layers by name (works on a meta-device skeleton too)."""
    import torch

    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def resolve(lora: LoraWeights, transformer) -> dict[str, LoraModule]:
    """Map the file's module names onto the transformer's layers and check every shape.

    Raises PixartError (exit 2) naming the file and the first module that does not fit: unknown to this
    transformer, or of the wrong shape. Needs only module names and shapes, so a meta-device skeleton will do.
    """
    where = f"{OPTION} {lora.path}"
    layers = _layers(transformer)
    underscored = {name.replace(".", "_"): name for name in layers}
    table = _omi_names(len(getattr(transformer, "transformer_blocks", ()))) if lora.naming == "omi" else {}

    def lookup(key: str) -> str | None:
        """The transformer layer a file's module name means, in the file's naming, or None."""
        if lora.naming == "kohya":
            prefixes, names = _KOHYA_PREFIXES, underscored
        elif lora.naming == "omi":
            return table.get(key) if table.get(key) in layers else None
        else:
            prefixes, names = _PEFT_PREFIXES, {name: name for name in layers}
        return next((names[key[len(p) :]] for p in prefixes if key.startswith(p) and key[len(p) :] in names), None)

    resolved: dict[str, LoraModule] = {}
    for key, module in lora.modules.items():
        name = lookup(key)
        if name is None:
            raise PixartError(
                f"{where}: module {key} is not a layer of this model's transformer; the LoRA was made "
                "for another model (pixart applies PixArt transformer LoRAs)"
            )
        if name in resolved:
            raise PixartError(f"{where}: two entries adapt the same layer {name}; the file is inconsistent")
        layer = layers[name]
        weight_shape = tuple(layer.weight.shape)
        down_shape, up_shape = tuple(module.down.shape), tuple(module.up.shape)
        fits = (
            up_shape[0] == weight_shape[0]
            and down_shape[1:] == weight_shape[1:]
            and len(down_shape) == len(weight_shape)
        )
        if not fits:
            raise PixartError(
                f"{where}: {key} does not fit: down {list(down_shape)} and up {list(up_shape)} for a "
                f"layer of weight {list(weight_shape)}; the LoRA was made for another model size"
            )
        resolved[name] = module
    return resolved


def check_lora(lora: LoraWeights, transformer) -> None:
    """Raise PixartError unless every module of ``lora`` fits ``transformer`` (a meta skeleton is enough)."""
    resolve(lora, transformer)


def fuse_peak_bytes(transformer, loras: list[LoraWeights]) -> int:
    """Device memory that fusing adds for a moment: an fp32 copy of the largest adapted weight and its delta,
    plus that layer's LoRA matrices. Nothing stays after fusing."""
    peak = 0
    for lora in loras:
        layers = _layers(transformer)
        for name, module in resolve(lora, transformer).items():
            weight = layers[name].weight
            peak = max(peak, 2 * 4 * weight.numel() + 4 * (module.down.numel() + module.up.numel()))
    return peak


def apply_loras(transformer, loras: list[LoraWeights]) -> None:
    """Fuse each LoRA into the transformer's weights, in place, where the weights are (CPU or device).

    Per layer: W' = W + sum_i scale_i * alpha_i / rank_i * up_i @ down_i, accumulated in fp32 in the given order
    (one addmm per LoRA, no full-size temporaries) and rounded once to W's dtype. Call before diffusers' group
    offloading takes over the weights.
    """
    import torch

    if not loras:
        return
    layers = _layers(transformer)
    per_layer: dict[str, list[tuple[float, LoraModule]]] = {}
    for lora in loras:
        for name, module in resolve(lora, transformer).items():
            per_layer.setdefault(name, []).append((lora.scale, module))
    with torch.no_grad():
        for name, adapters in per_layer.items():
            weight = layers[name].weight
            # fp32 weights are updated in place; others through one fp32 copy, rounded once at the end.
            exact = weight.dtype == torch.float32 and weight.is_contiguous()
            target = weight if exact else weight.to(torch.float32).contiguous()
            matrix = target.view(target.shape[0], -1)
            for scale, module in adapters:
                down = module.down.to(device=weight.device, dtype=torch.float32).flatten(1)
                up = module.up.to(device=weight.device, dtype=torch.float32).flatten(1)
                matrix.addmm_(up, down, alpha=scale * module.alpha / module.rank)
            if not exact:
                weight.copy_(target)


def records(loras: list[LoraWeights]) -> list[dict]:
    """The meta entry: one {file, sha256, scale} per LoRA, in the order they were applied."""
    return [lora.record() for lora in loras]


def check_loras_for_model(loras: list[LoraWeights], model) -> None:
    """Check LoRAs against a Model's transformer config on the meta device (no weights read), before any model
    loads (the run plan: generate must fail before T5 does any work)."""
    if not loras:
        return
    import torch

    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.memory import meta_model

    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d"
    ).PixArtTransformer2DModel
    skeleton = meta_model(PixArtTransformer2DModel.from_config, model.config("transformer"), torch.float32)
    for adapter in loras:
        check_lora(adapter, skeleton)
