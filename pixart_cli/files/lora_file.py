"""Reading a LoRA file (untrusted): the three namings, alpha from keys, metadata or a sibling adapter_config.json,
every module checked on its own. Fitting it to the model and fusing it is ``models.lora``."""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError, detail
from pixart_cli.files.formats import entry_layout_valid
from pixart_cli.files.peft_patterns import MAX_PATTERNS, PatternError, PatternTable
from pixart_cli.files.untrusted import open_input, read_at_most
from pixart_cli.settings import MAX_ADAPTER_SCALE

OPTION = "--lora"
DEFAULT_SCALE = 1.0
# A LoRA file is untrusted: what reading it costs is bounded before it is read.
MAX_LORA_BYTES = 2 * 2**30  # read whole (rank 128 on every layer of PixArt-XL is about 0.3 GB in fp32)
MAX_ADAPTER_CONFIG_BYTES = 2**20  # PEFT's adapter_config.json beside adapter_model.safetensors (a few KB)
MAX_HEADER_BYTES = 100_000_000  # the safetensors header (safetensors' own limit)
MAX_ALPHA = 2.0**20  # |alpha|, from .alpha keys or the metadata (trainers use up to the rank, at most a few 1000)
# dtype in the header -> (its name, bytes per element): LoRA weights are float tensors of these
LORA_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}
LORA_DTYPES_SIZES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}

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
    if not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
        raise PixartError(
            f"{OPTION} {text}: scale {tail} is beyond ±{MAX_ADAPTER_SCALE:g}; published settings are 0 to 2 "
            "(give FILE:0.8 or FILE)"
        )
    if not path:
        raise PixartError(f"{OPTION} {text!r}: no file name; give FILE or FILE:SCALE")
    if path == text and colon and head and not os.path.lexists(text) and os.path.isfile(head):
        # FILE:SCALE with a scale that is not a number (no file is named so, with the colon)
        raise PixartError(f"{OPTION} {text}: the scale {tail!r} is not a number; give {head}:0.8 or {head}")
    return LoraSpec(Path(path), scale)


def read_lora(spec: LoraSpec) -> LoraWeights:
    """Read and validate a LoRA .safetensors file on its own (pairing, ranks, alphas); no model needed.

    safetensors holds only tensors and a string header, so reading it runs no code; a pickle (.pt, .ckpt, .bin)
    is refused. Only a regular file of at most MAX_LORA_BYTES is read, whole, once: its sha256 and its tensors come
    from the same bytes, and its header is checked (dtypes, shapes, offsets) before any tensor is made.
    """
    path = spec.path
    where = f"{OPTION} {path}"
    if path.is_dir():
        inside = path / _PEFT_WEIGHTS
        fix = f"give {inside}" if inside.is_file() else "give the LoRA's .safetensors file"
        raise PixartError(f"{where}: is a folder; {fix}")
    data = _read_bounded(path, MAX_LORA_BYTES, "a LoRA file")
    tensors, metadata = _parse_safetensors(data, where)
    config, source = _adapter_config(metadata, where), "lora_adapter_metadata"
    sibling = path.parent / _PEFT_CONFIG
    if not config and path.name == _PEFT_WEIGHTS and sibling.is_file():
        config, source = _sibling_config(sibling), _PEFT_CONFIG
    naming, modules, has_alpha_keys = _group_modules(tensors, _checked_config(config, where), where)
    if has_alpha_keys:
        source = ".alpha keys"
    elif config.get("lora_alpha") is None and not config.get("alpha_pattern"):
        source = "none in the file: alpha = rank"
    return LoraWeights(path, hashlib.sha256(data).hexdigest(), spec.scale, naming, modules, source)


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    """A regular file's bytes, refused (naming it and the limit) when it holds more than ``limit`` bytes."""
    try:
        handle, size = open_input(path, OPTION)
    except PixartError as error:  # the line names the option too: "--lora x.safetensors: no such file"
        scale = "; FILE:SCALE takes a number after the colon" if ":" in path.name and not path.exists() else ""
        raise PixartError(f"{OPTION} {error}{scale}", error.exit_code) from None
    with handle:
        if size > limit:
            raise PixartError(
                f"{OPTION} {path}: {size:,} bytes is beyond the {limit // 2**20:,} MiB pixart reads as {what}; "
                "is it the right file?"
            )
        try:
            data = read_at_most(handle, limit, size)
        except OSError as error:
            raise PixartError(f"{OPTION} {path}: cannot read it ({error.strerror or error})") from None
    if len(data) > limit:  # it grew while being read
        raise PixartError(f"{OPTION} {path}: holds more than the {limit // 2**20:,} MiB pixart reads as {what}")
    return data


def _sibling_config(path: Path) -> dict:
    """lora_alpha and friends from PEFT's adapter_config.json next to adapter_model.safetensors."""
    data = _read_bounded(path, MAX_ADAPTER_CONFIG_BYTES, "an adapter_config.json")
    try:
        config = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
        reason = "nested too deeply" if isinstance(error, RecursionError) else detail(error)
        raise PixartError(f"{OPTION} {path}: not valid JSON ({reason}); fix or remove it") from None
    return config if isinstance(config, dict) else {}


def _parse_safetensors(data: bytes, where: str) -> tuple[dict, dict]:
    """(tensors, string metadata) of a safetensors file's bytes; anything else is one line naming the file. The
    header is checked first: only float tensors of the dtypes LoRA_DTYPES, each shape's size equal to its bytes
    and inside the file, so that nothing is made that the file does not hold."""
    from safetensors.torch import load

    if len(data) < 8 or data[8:9] != b"{":
        raise PixartError(
            f"{where}: not a .safetensors file (pixart reads LoRA files only in safetensors format, "
            "which cannot run code; convert a .pt/.ckpt LoRA first)"
        )
    header_size = int.from_bytes(data[:8], "little")
    if header_size > min(len(data) - 8, MAX_HEADER_BYTES):
        raise PixartError(f"{where}: damaged .safetensors file (its header claims {header_size:,} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_size])
    except (ValueError, RecursionError) as error:
        reason = "nested too deeply" if isinstance(error, RecursionError) else detail(error)[:120]
        raise PixartError(f"{where}: damaged .safetensors file (its header is not JSON: {reason})") from None
    if not isinstance(header, dict):
        raise PixartError(f"{where}: damaged .safetensors file (its header is not a JSON object)")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise PixartError(f"{where}: damaged .safetensors file (its __metadata__ is not text values)")
    for key, entry in header.items():
        _check_entry(key, entry, len(data) - 8 - header_size, where)
    try:
        tensors = load(data)
    except Exception as error:
        raise PixartError(f"{where}: damaged .safetensors file ({detail(error)[:120]})") from None
    return tensors, metadata or {}


def _check_entry(key: str, entry, data_size: int, where: str) -> None:
    """One header entry: a dtype LoRA weights come in, a shape of whole numbers whose bytes are its offsets'."""
    fields = entry if isinstance(entry, dict) else {}
    dtype, shape, offsets = fields.get("dtype"), fields.get("shape"), fields.get("data_offsets")
    if not entry_layout_valid(shape, offsets, data_size):
        raise PixartError(f"{where}: damaged .safetensors file (the header entry of {key} is not valid)")
    if dtype not in LORA_DTYPES:
        raise PixartError(
            f"{where}: {key} has dtype {dtype}; pixart reads LoRA weights in {', '.join(LORA_DTYPES.values())}"
        )
    if math.prod(shape) * LORA_DTYPES_SIZES[dtype] != offsets[1] - offsets[0]:
        raise PixartError(f"{where}: damaged .safetensors file ({key}'s shape {shape} does not fit its bytes)")


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
        if not key.isprintable():
            raise PixartError(f"{where}: a key holds control characters ({key!r}); not a LoRA file pixart reads")
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
        if tensor.numel() == 0:
            rank = " (rank 0)" if role in ("down", "up") and 0 in tensor.shape[:2] else ""
            raise PixartError(f"{where}: {key} is empty{rank}, shape {list(tensor.shape)}; the file is incomplete")
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
    table = _pattern_table(config, where)
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
        alpha = _alpha(module, found.get("alpha"), config, table, int(down.shape[0]), where)
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
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
        nested = " (nested too deeply)" if isinstance(error, RecursionError) else ""
        raise PixartError(f"{where}: its lora_adapter_metadata is not valid JSON{nested}") from None
    if not isinstance(packed, dict):
        return {}
    # diffusers packs each component's LoraConfig under its name: "transformer.lora_alpha", ...
    prefix = "transformer."
    fields = {k[len(prefix) :]: v for k, v in packed.items() if k.startswith(prefix)}
    return fields or packed


def _checked_config(config: dict, where: str) -> dict:
    """The LoraConfig fields pixart uses, each of the type PEFT gives it: lora_alpha and each alpha_pattern value
    a number within MAX_ALPHA, alpha_pattern and rank_pattern maps of at most MAX_PATTERNS keys, use_rslora a
    flag. Anything else is refused, naming the field: before any pattern runs or any model loads."""
    alpha = config.get("lora_alpha")
    if alpha is not None:
        _check_alpha(alpha, "lora_alpha", where)
    for name in ("alpha_pattern", "rank_pattern"):
        patterns = config.get(name)
        if patterns is None:
            continue
        if not isinstance(patterns, dict):
            raise PixartError(f"{where}: {name} in its metadata is not a map of module patterns")
        if len(patterns) > MAX_PATTERNS:
            raise PixartError(f"{where}: {name} has {len(patterns):,} keys, beyond the {MAX_PATTERNS:,} pixart reads")
        for key, value in patterns.items():
            if name == "alpha_pattern":
                _check_alpha(value, f"alpha_pattern[{key[:80]!r}]", where)
            elif type(value) is not int or not 0 < value <= 2**16:
                raise PixartError(f"{where}: rank_pattern[{key[:80]!r}] {str(value)[:40]} is not a rank")
    if config.get("use_rslora") not in (None, True, False):
        raise PixartError(f"{where}: use_rslora {str(config['use_rslora'])[:40]} in its metadata is not true or false")
    return config


def _check_alpha(value, name: str, where: str) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # an int is compared as it is: float() of a 400-digit one overflows
    if not number or (isinstance(value, float) and not math.isfinite(value)) or not -MAX_ALPHA <= value <= MAX_ALPHA:
        shown = str(value) if len(str(value)) <= 40 else f"{str(value)[:20]}... ({len(str(value))} characters)"
        raise PixartError(
            f"{where}: {name} {shown} in its metadata is not a number within ±{MAX_ALPHA:,.0f}; fix or remove the metadata"
        )


def _pattern_table(config: dict, where: str) -> PatternTable | None:
    patterns = config.get("alpha_pattern")
    if not patterns:
        return None
    try:
        return PatternTable(patterns)
    except PatternError as error:
        raise PixartError(f"{where}: its alpha_pattern cannot be used: {error}") from None


def _peft_name(module: str) -> str:
    """The module's name in the transformer, as PEFT matched alpha_pattern against it (the file's prefix off)."""
    prefix = next(p for p in PEFT_PREFIXES if module.startswith(p))
    return module[len(prefix) :]


def _alpha(module: str, tensor, config: dict, table: PatternTable | None, rank: int, where: str) -> float:
    """alpha of one module: its .alpha tensor, else the adapter config (alpha_pattern, lora_alpha), else rank.

    alpha_pattern as PEFT reads it: the first key that matches the module's name (files/peft_patterns.py).
    PEFT's rsLoRA scales by alpha / sqrt(rank); returned here as the equivalent alpha for alpha / rank.
    """
    if rank == 0:
        raise PixartError(f"{where}: {module} has rank 0 (no LoRA matrices); the file is incomplete")
    if tensor is not None:
        if tensor.numel() != 1:
            raise PixartError(f"{where}: {module}.alpha has shape {list(tensor.shape)}; expected one number")
        value = float(tensor.reshape(()).item())
        if not -MAX_ALPHA <= value <= MAX_ALPHA:
            raise PixartError(f"{where}: {module}.alpha is {value:g}, beyond ±{MAX_ALPHA:,.0f}; not a LoRA's alpha")
        return value
    alpha = None
    if table is not None:
        try:
            alpha = table.lookup(_peft_name(module))
        except PatternError as error:
            raise PixartError(f"{where}: its alpha_pattern cannot be used: {error}") from None
    if alpha is None:
        alpha = config.get("lora_alpha")
    if alpha is None:
        return float(rank)
    if config.get("use_rslora") is True:
        return float(alpha) * math.sqrt(rank)
    return float(alpha)
