"""The registry of staged .pt kinds (embeddings, latents, init latents, control latents, masks): keys, loaders, the
writer.

A .pt file is ``torch.save`` of a plain dict: tensors at the top level under diffusers' keyword names, so
``pipe(**{k: v for k, v in d.items() if k != "meta"})`` works, and a ``meta`` dict of plain values. Loading goes
through ``untrusted`` (weights_only, bounded by the file size); then each kind checks its own keys and meta.
"""

from __future__ import annotations

import errno
import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_cli.errors import bad_file
from pixart_cli.files.atomic import STDOUT, atomic_path, is_stdout, json_safe, plain, write_stdout
from pixart_cli.files.formats import (
    CONTROL_FORMAT,
    EMBEDDING_KEYS,
    EMBEDDINGS_FORMAT,
    FORMAT_VERSION,
    LATENTS_FORMAT,
    MASK_FORMAT,
    OVERLAY_KEYS,
)
from pixart_cli.files.image_io import IMAGE_FORMATS, read_image_metadata
from pixart_cli.files.stdin import is_stdin
from pixart_cli.files.untrusted import (
    empty_path_error,
    is_image_data,
    meta_field,
    model_fields,
    open_input,
    read_pt,
    short,
    tensor_field,
    text_list,
)


@dataclass
class Embeddings:
    """T5 output for B prompts. embeds: [B, L, C] float; masks: [B, L] int64."""

    prompt_embeds: Any
    prompt_attention_mask: Any
    negative_prompt_embeds: Any
    negative_prompt_attention_mask: Any
    meta: dict = field(default_factory=dict)
    FORMAT = EMBEDDINGS_FORMAT

    def tensors(self) -> dict:
        return {key: getattr(self, key) for key in EMBEDDING_KEYS}


@dataclass
class Latents:
    """Denoised latents for N images at the binned size. latents: [N, C, H/8, W/8].

    Inpainted with --keep-unmasked, also what decode pastes back outside the mask, at the requested size H' x W'
    (one for every image): ``overlay_image`` [1, 3, H', W'] and ``overlay_mask`` [1, 1, H', W'], uint8."""

    latents: Any
    meta: dict = field(default_factory=dict)
    overlay_image: Any = None
    overlay_mask: Any = None
    FORMAT = LATENTS_FORMAT

    def tensors(self) -> dict:
        return {"latents": self.latents, **_overlay(self)}


class ControlLatents(Latents):
    """A ControlNet's condition (encode-control): VAE latents of an edge map [1, C, H/8, W/8] at the binned size,
    with the sizes they were encoded for and the image's {name, sha256} (meta ``control_image``)."""

    FORMAT = CONTROL_FORMAT


def encoded_image_meta(source, dtype_name: str, sizes, scaling_factor: float, seed: int) -> dict:
    """The meta of latents encoded from an image (init or control latents): the model (a ``models.source.Model``),
    the sizes they were encoded for (a ``plan.Schedule``) and the VAE's scaling factor, which denoise checks."""
    return {
        "model": source.recorded,
        "revision": source.revision,
        "family": source.family.name,
        "dtype": dtype_name,
        "prompts": [""],  # decode can show the image; it has no prompt
        "seeds": [seed],
        "sample": "latent_dist.sample",
        "vae_scaling_factor": scaling_factor,
        "height": sizes.height,
        "width": sizes.width,
        "requested_height": sizes.requested_height,
        "requested_width": sizes.requested_width,
        "binned": sizes.binned,
    }


def tensor_sha256(tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (CPU, contiguous): what the outputs record of control latents."""
    import hashlib

    import torch

    tensor = tensor.detach().cpu().contiguous()
    hasher = hashlib.sha256(f"{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
    hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


@dataclass
class Mask:
    """An inpainting mask for init latents [*, C, h, w]: ``mask`` [1, 1, h, w] float32 (1 repaints, 0 keeps), and for
    --keep-unmasked the source image and the blurred mask at the requested size (``overlay_*``, uint8), which
    denoise carries into its latents for decode. Made by ``stages/encode_mask.py``."""

    mask: Any
    meta: dict = field(default_factory=dict)
    overlay_image: Any = None
    overlay_mask: Any = None
    FORMAT = MASK_FORMAT

    def tensors(self) -> dict:
        return {"mask": self.mask, **_overlay(self)}

    @property
    def keeps_unmasked(self) -> bool:
        return self.overlay_image is not None

    def without_overlay(self) -> Mask:
        """--no-keep-unmasked: decode pastes nothing back."""
        return Mask(self.mask, self.meta)


def _overlay(artifact) -> dict:
    if artifact.overlay_image is None:
        return {}
    return {"overlay_image": artifact.overlay_image, "overlay_mask": artifact.overlay_mask}


def save(path: Path, artifact: Embeddings | Latents | Mask, overwrite: bool = True, follow_link: bool = True) -> Path:
    """Write an Embeddings or Latents file atomically (``-`` : to stdout), stamped with its format and version;
    tensors go to the CPU first. ``follow_link``: as ``atomic_path`` (an output the user named).

    Each tensor is saved with only its own elements: torch.save writes a view's whole storage, so a row sliced
    from a batch would otherwise carry the batch with it.
    """
    import torch

    payload = {key: compact(value.detach().cpu()) for key, value in artifact.tensors().items()}
    payload["meta"] = plain({**artifact.meta, "format": artifact.FORMAT, "version": FORMAT_VERSION})
    if is_stdout(path):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        write_stdout(buffer.getvalue())
        return Path(STDOUT)
    with atomic_path(path, overwrite, follow_link) as temp, open(temp, "wb", buffering=0) as handle:
        # through _WholeWrites: a full disk (or a file size limit) is then an OSError that names the output
        # (atomic_path); torch writing to a path reports it as "[enforce fail at inline_container.cc] unexpected pos"
        try:
            torch.save(payload, _WholeWrites(handle))
        except RuntimeError as error:  # torch's archive writer, ending after our OSError, masks it: the OSError
            if isinstance(error.__context__, OSError):
                raise error.__context__ from None
            raise
    return Path(path)


class _WholeWrites:
    """A raw file for torch.save: each write goes out whole or raises the OSError that stopped it (a short write,
    as a nearly full disk gives, is continued; the next write's error is the reason)."""

    def __init__(self, raw):
        self.raw = raw

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        while view:
            written = self.raw.write(view)
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            view = view[written:]
        return len(data) if isinstance(data, (bytes, bytearray)) else memoryview(data).nbytes

    def flush(self) -> None:
        self.raw.flush()


def compact(tensor):
    """The tensor alone: a contiguous copy unless its storage holds exactly its own elements already."""
    import torch

    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def load_any(path, formats: tuple = (EMBEDDINGS_FORMAT, LATENTS_FORMAT, CONTROL_FORMAT)) -> Embeddings | Latents | Mask:
    """An embeddings, latents or control-latents file (or another of ``formats``), whichever ``path`` is (validated
    as such)."""
    data, size = read_pt(path, formats)
    loader = {
        EMBEDDINGS_FORMAT: _embeddings,
        LATENTS_FORMAT: _latents,
        MASK_FORMAT: _mask,
        CONTROL_FORMAT: lambda *args: _latents(*args, ControlLatents),
    }
    return loader[data["meta"]["format"]](path, data, size)


def file_kind(path) -> str:
    """ "pt" or "image", for the commands that take either (info, compare): what the file holds decides (torch.save
    writes a zip archive), then its name (standard input has none: what it holds); a file that is neither is read as
    a .pt file, whose checks name it."""
    if str(path) == "":
        raise empty_path_error("FILE")
    handle, _ = open_input(path, "FILE")
    with handle:
        head = handle.read(12)
    if head[:4] == b"PK\x03\x04":
        return "pt"
    if is_stdin(path):
        return "image" if is_image_data(head) else "pt"
    return "image" if Path(path).suffix.lower() in IMAGE_FORMATS else "pt"


def describe(path) -> dict:
    """What `pixart info` shows: a .pt file's tensors and meta, or an image's embedded settings.
    Everything in it is bounded and JSON-safe (NaN and inf as strings)."""
    if file_kind(path) == "image":
        return json_safe({"file": str(path), "kind": "image", **read_image_metadata(path)})
    artifact = load_any(path, (EMBEDDINGS_FORMAT, LATENTS_FORMAT, MASK_FORMAT, CONTROL_FORMAT))
    tensors = {
        key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        for key, value in artifact.tensors().items()
    }
    kind = {Embeddings: "embeddings", Latents: "latents", ControlLatents: "control latents", Mask: "mask"}[
        type(artifact)
    ]
    return json_safe({"file": str(path), "kind": kind, "tensors": tensors, "meta": artifact.meta})


def load_embeddings(path) -> Embeddings:
    """Read and validate an embeddings file (shapes agree with each other; not yet with a model)."""
    return _embeddings(path, *read_pt(path, (EMBEDDINGS_FORMAT,)))


def _embeddings(path, data: dict, size: int) -> Embeddings:
    meta = data["meta"]
    embeds = tensor_field(path, data, "prompt_embeds", 3, "f", size)
    mask = tensor_field(path, data, "prompt_attention_mask", 2, "i", size)
    negative = tensor_field(path, data, "negative_prompt_embeds", 3, "f", size)
    negative_mask = tensor_field(path, data, "negative_prompt_attention_mask", 2, "i", size)
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise bad_file(
            path, f"prompt_attention_mask shape {list(mask.shape)} does not match prompt_embeds {list(embeds.shape)}"
        )
    if negative.shape != embeds.shape or negative_mask.shape != mask.shape:
        raise bad_file(
            path, f"negative embeddings {list(negative.shape)} do not match prompt embeddings {list(embeds.shape)}"
        )
    text_list(path, meta, "prompts", embeds.shape[0], str)
    model_fields(path, meta)
    length = meta_field(path, meta, "max_sequence_length", int)
    if embeds.shape[1] != length:
        raise bad_file(path, f"embeddings hold {embeds.shape[1]} tokens but meta.max_sequence_length is {length}")
    if not 1 <= length <= 4096:
        raise bad_file(path, f"sequence length {length} is out of range (1 to 4096)")
    return Embeddings(embeds, mask, negative, negative_mask, meta)


def load_latents(path) -> Latents:
    """Read and validate a latents file (internally consistent; not yet checked against a VAE)."""
    return _latents(path, *read_pt(path, (LATENTS_FORMAT,)))


def load_init_latents(path) -> Latents:
    """Init latents for image to image (--init-latents): any latents file, validated as load_latents does
    (`pixart encode-image` writes them from an image)."""
    data, size = read_pt(
        path, (LATENTS_FORMAT,), needed="init latents (from pixart encode-image)", argument="--init-latents"
    )
    return _latents(path, data, size)


def load_control(path, argument: str = "--control") -> ControlLatents:
    """Control latents for a ControlNet (--control), from `pixart encode-control`; validated as load_latents does
    (their sizes and the model are checked against the run by the plan)."""
    data, size = read_pt(
        path, (CONTROL_FORMAT,), needed="control latents (from pixart encode-control)", argument=argument
    )
    return _latents(path, data, size, ControlLatents)


def _latents(path, data: dict, size: int, kind: type = Latents) -> Latents:
    meta = data["meta"]
    latents = tensor_field(path, data, "latents", 4, "f", size)
    _sizes(path, meta)
    model_fields(path, meta)
    text_list(path, meta, "seeds", latents.shape[0], int)
    text_list(path, meta, "prompts", latents.shape[0], str)
    scale = meta["height"] / latents.shape[2]
    if scale != meta["width"] / latents.shape[3] or scale < 1 or math.log2(scale) % 1:
        raise bad_file(
            path, f"latents {list(latents.shape)} do not fit the recorded size {meta['width']}x{meta['height']}"
        )
    return kind(latents, meta, *_overlay_fields(path, data, size, meta))


def _sizes(path, meta: dict) -> None:
    for key in ("height", "width", "requested_height", "requested_width"):
        value = meta_field(path, meta, key, int)
        if value < 8 or value > 16384:
            raise bad_file(path, f"meta.{key} is {value}; expected a size in pixels")


def _overlay_fields(path, data: dict, size: int, meta: dict) -> tuple:
    """(overlay_image, overlay_mask), both or neither, at the requested size the file records."""
    present = [key for key in OVERLAY_KEYS if key in data]
    if not present:
        return None, None
    if len(present) == 1:
        raise bad_file(path, f"holds {present[0]} without {[k for k in OVERLAY_KEYS if k not in present][0]}")
    image = tensor_field(path, data, "overlay_image", 4, "p", size)
    mask = tensor_field(path, data, "overlay_mask", 4, "p", size)
    requested = [1, 3, meta["requested_height"], meta["requested_width"]]
    if list(image.shape) != requested or list(mask.shape) != [1, 1, *requested[2:]]:
        raise bad_file(
            path,
            f"overlay_image {list(image.shape)} and overlay_mask {list(mask.shape)} do not fit the recorded size "
            f"{meta['requested_width']}x{meta['requested_height']}",
        )
    return image, mask


def load_mask(path, argument: str = "--mask") -> Mask:
    """An inpainting mask file (`pixart encode-mask`), validated on its own (not yet against init latents)."""
    data, size = read_pt(path, (MASK_FORMAT,), needed="a mask file (from pixart encode-mask)", argument=argument)
    return _mask(path, data, size)


def _mask(path, data: dict, size: int) -> Mask:
    meta = data["meta"]
    mask = tensor_field(path, data, "mask", 4, "f", size)
    _sizes(path, meta)
    model_fields(path, meta)
    if mask.shape[:2] != (1, 1) or not bool(((mask == 0) | (mask == 1)).all()):
        raise bad_file(path, f"mask {list(mask.shape)} is not one mask of 0s and 1s ([1, 1, h, w])")
    scale = meta["height"] / mask.shape[2]
    if scale != meta["width"] / mask.shape[3] or scale < 1 or math.log2(scale) % 1:
        raise bad_file(path, f"mask {list(mask.shape)} does not fit the recorded size {meta['width']}x{meta['height']}")
    blur = meta_field(path, meta, "mask_blur", int)
    if not 0 <= blur <= 16384:
        raise bad_file(path, f"meta.mask_blur is {blur}; expected pixels")
    for key in ("mask", "source_image"):  # recorded in the outputs: {name, sha256} of short strings
        value = meta.get(key)
        if (key == "mask" or value is not None) and not (
            isinstance(value, dict)
            and set(value) == {"name", "sha256"}
            and all(isinstance(text, str) and len(text) <= 1024 for text in value.values())
        ):
            raise bad_file(path, f"meta.{key} is {short(value)}; expected the image's name and sha256")
    return Mask(mask, meta, *_overlay_fields(path, data, size, meta))
