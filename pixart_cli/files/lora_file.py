"""Reading a LoRA file (untrusted): the three namings, alpha from keys, metadata or a sibling adapter_config.json,
every module checked on its own. Fitting it to the model and fusing it is ``models.lora``."""

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
PEFT_PREFIXES = ("unet.base_model.model.", "base_model.model.", "transformer.", "")
# PEFT's save_pretrained keeps lora_alpha beside the weights, not in them.
_PEFT_WEIGHTS, _PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# Prefixes of kohya-named transformer modules (OneTrainer, LyCORIS, kohya sd-scripts' denoiser prefix).
KOHYA_PREFIXES = ("lora_transformer_", "lycoris_", "lora_unet_")
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
        if not tensor.is_floating_point() or not _finite(tensor):
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


def _finite(tensor) -> bool:
    """Whether every element is finite. A NaN or an infinity makes the sum NaN or infinite, so one reduction
    answers for most tensors (``isfinite`` per element took 0.5 s of a 280-layer file on a CPU); only a sum that
    overflows (huge finite values) is checked element by element."""
    import torch

    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())


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
