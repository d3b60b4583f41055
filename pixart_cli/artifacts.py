"""The staged files: embeddings (.pt), latents (.pt) and images. Nothing else reads or writes them.

A .pt file is ``torch.save`` of a plain dict: tensors at the top level under diffusers' keyword names,
so ``pipe(**{k: v for k, v in d.items() if k != "meta"})`` works, and a ``meta`` dict of plain values.
Loading uses ``weights_only=True`` only, then validates everything before any model is loaded.
Every write goes to a temp file in the same folder and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError, bad_file, detail

EMBEDDINGS_FORMAT = "pixart-cli/embeddings"
LATENTS_FORMAT = "pixart-cli/latents"
FORMAT_VERSION = 1

EMBEDDING_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
_PLAIN = (str, int, float, bool, type(None))
_WRITER = {EMBEDDINGS_FORMAT: "encode", LATENTS_FORMAT: "denoise"}


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
    """Denoised latents for N images at the binned size. latents: [N, C, H/8, W/8]."""

    latents: Any
    meta: dict = field(default_factory=dict)
    FORMAT = LATENTS_FORMAT

    def tensors(self) -> dict:
        return {"latents": self.latents}


# --- writing ---------------------------------------------------------------------------------------------
@contextmanager
def atomic_path(path: Path):
    """Yield a temp path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
    try:
        yield Path(temp)
        os.replace(temp, path)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)


def save(path: Path, artifact: Embeddings | Latents) -> Path:
    """Write an Embeddings or Latents file atomically, stamped with its format and version; tensors go to the
    CPU first."""
    import torch

    payload = {key: value.detach().cpu().contiguous() for key, value in artifact.tensors().items()}
    payload["meta"] = _plain({**artifact.meta, "format": artifact.FORMAT, "version": FORMAT_VERSION})
    with atomic_path(path) as temp:
        torch.save(payload, temp)
    return Path(path)


def _plain(meta: dict) -> dict:
    """Meta holds only plain values, so a weights_only load can always read it back."""
    def check(value):
        if isinstance(value, (list, tuple)):
            return [check(item) for item in value]
        if isinstance(value, dict):
            return {str(k): check(v) for k, v in value.items()}
        if isinstance(value, _PLAIN):
            return value
        raise TypeError(f"meta value {value!r} is not a plain value")
    return check(meta)


# --- reading ---------------------------------------------------------------------------------------------
def _read(path: Path, expected_formats: tuple[str, ...], writer: str | None = None) -> dict:
    """torch.load with weights_only=True, then the checks common to every .pt file. ``writer``: the command
    that writes the file wanted here (default: the one that writes its format)."""
    import pickle

    import torch

    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "GLOBAL" in str(error) or "Unsupported global" in str(error):  # a class or function reference
            raise bad_file(path, "refused: it holds Python objects other than tensors, which could run code "
                                 "(only files written by pixart are read)") from error
        raise bad_file(path, "not a pixart .pt file (its contents are not plain tensors and values)") from error
    except Exception as error:  # noqa: BLE001 - torch.load raises many types on damaged input (the fuzz test
        # found struct.error too): whatever goes wrong inside it, the file is the problem
        raise bad_file(path, f"not a pixart .pt file, or damaged ({detail(error)[:120]})") from error
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise bad_file(path, "not a pixart .pt file (no meta dict)")
    meta = data["meta"]
    fmt, version = meta.get("format"), meta.get("version")
    if fmt not in expected_formats:
        kind = {EMBEDDINGS_FORMAT: "an embeddings", LATENTS_FORMAT: "a latents"}
        if fmt in kind:
            raise bad_file(path, f"is {kind[fmt]} file, but {kind[expected_formats[0]].split()[-1]} are needed here; give "
                                 f"the file `pixart {writer or _WRITER[expected_formats[0]]}` wrote")
        raise bad_file(path, f"unknown format {fmt!r}; expected {' or '.join(expected_formats)}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad_file(path, f"format version {version!r} is not a number")
    if version > FORMAT_VERSION:
        raise bad_file(path, f"format version {version} is newer than this pixart-cli reads ({FORMAT_VERSION}); "
                             "upgrade pixart-cli")
    if version < 1:
        raise bad_file(path, f"format version {version} is not valid")
    _check_meta_values(path, meta)
    return data


def _check_meta_values(path: Path, meta: dict) -> None:
    def walk(value, where):
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{where}.{key}")
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item, where)
        elif not isinstance(value, _PLAIN):
            raise bad_file(path, f"{where} holds a {type(value).__name__}; meta may hold only plain values")
    walk(meta, "meta")


def _tensor(path: Path, data: dict, key: str, rank: int, kinds: str):
    """One required tensor: present, of the given rank, dtype kind ('f' float, 'i' integer/bool), finite."""
    import torch

    value = data.get(key)
    if value is None:
        raise bad_file(path, f"missing tensor {key!r}")
    if not isinstance(value, torch.Tensor):
        raise bad_file(path, f"{key} is a {type(value).__name__}, not a tensor")
    if value.dim() != rank:
        raise bad_file(path, f"{key} has shape {list(value.shape)}; expected {rank} dimensions")
    if value.numel() == 0:
        raise bad_file(path, f"{key} is empty (shape {list(value.shape)})")
    if kinds == "f":
        if not value.is_floating_point():
            raise bad_file(path, f"{key} has dtype {value.dtype}; expected a float tensor")
        if not bool(torch.isfinite(value).all()):
            raise bad_file(path, f"{key} contains NaN or inf values")
    elif value.is_floating_point() or value.is_complex():
        raise bad_file(path, f"{key} has dtype {value.dtype}; expected an integer mask")
    return value


def _meta_field(path: Path, meta: dict, key: str, kind: type | tuple):
    value = meta.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise bad_file(path, f"meta.{key} is {value!r}; expected {getattr(kind, '__name__', kind)}")
    return value


def load_any(path: Path) -> Embeddings | Latents:
    """An embeddings or a latents file, whichever ``path`` is (validated as such)."""
    data = _read(path, (EMBEDDINGS_FORMAT, LATENTS_FORMAT))
    if data["meta"]["format"] == EMBEDDINGS_FORMAT:
        return _embeddings(path, data)
    return _latents(path, data)


def describe(path: Path) -> dict:
    """What `pixart info` shows: a .pt file's tensors and meta, or an image's embedded settings."""
    path = Path(path)
    if path.suffix.lower() in IMAGE_FORMATS:
        return {"file": str(path), "kind": "image", **read_image_metadata(path)}
    artifact = load_any(path)
    tensors = {key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
               for key, value in artifact.tensors().items()}
    kind = "embeddings" if isinstance(artifact, Embeddings) else "latents"
    return {"file": str(path), "kind": kind, "tensors": tensors, "meta": artifact.meta}


def load_embeddings(path: Path) -> Embeddings:
    """Read and validate an embeddings file (shapes agree with each other; not yet with a model)."""
    return _embeddings(path, _read(path, (EMBEDDINGS_FORMAT,)))


def _embeddings(path: Path, data: dict) -> Embeddings:
    meta = data["meta"]
    embeds = _tensor(path, data, "prompt_embeds", 3, "f")
    mask = _tensor(path, data, "prompt_attention_mask", 2, "i")
    negative = _tensor(path, data, "negative_prompt_embeds", 3, "f")
    negative_mask = _tensor(path, data, "negative_prompt_attention_mask", 2, "i")
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise bad_file(path, f"prompt_attention_mask shape {list(mask.shape)} does not match prompt_embeds "
                             f"{list(embeds.shape)}")
    if negative.shape != embeds.shape or negative_mask.shape != mask.shape:
        raise bad_file(path, f"negative embeddings {list(negative.shape)} do not match prompt embeddings "
                             f"{list(embeds.shape)}")
    prompts = _meta_field(path, meta, "prompts", list)
    if len(prompts) != embeds.shape[0] or not all(isinstance(p, str) for p in prompts):
        raise bad_file(path, f"meta.prompts lists {len(prompts)} prompts for {embeds.shape[0]} embeddings")
    for key in ("model", "family", "dtype"):
        _meta_field(path, meta, key, str)
    length = _meta_field(path, meta, "max_sequence_length", int)
    if embeds.shape[1] != length:
        raise bad_file(path, f"embeddings hold {embeds.shape[1]} tokens but meta.max_sequence_length is {length}")
    if not 1 <= length <= 4096:
        raise bad_file(path, f"sequence length {length} is out of range (1 to 4096)")
    return Embeddings(embeds, mask, negative, negative_mask, meta)


def load_latents(path: Path) -> Latents:
    """Read and validate a latents file (internally consistent; not yet checked against a VAE)."""
    return _latents(path, _read(path, (LATENTS_FORMAT,)))


def load_init_latents(path: Path) -> Latents:
    """Init latents for image to image: any latents file (`pixart encode-image` writes them from an image)."""
    return _latents(path, _read(path, (LATENTS_FORMAT,), writer="encode-image"))


def _latents(path: Path, data: dict) -> Latents:
    meta = data["meta"]
    latents = _tensor(path, data, "latents", 4, "f")
    for key in ("height", "width", "requested_height", "requested_width"):
        value = _meta_field(path, meta, key, int)
        if value < 8 or value > 16384:
            raise bad_file(path, f"meta.{key} is {value}; expected a size in pixels")
    for key in ("model", "family", "dtype"):
        _meta_field(path, meta, key, str)
    seeds = _meta_field(path, meta, "seeds", list)
    if len(seeds) != latents.shape[0]:
        raise bad_file(path, f"meta.seeds lists {len(seeds)} seeds for {latents.shape[0]} latents")
    scale = meta["height"] / latents.shape[2]
    if scale != meta["width"] / latents.shape[3] or scale < 1 or math.log2(scale) % 1:
        raise bad_file(path, f"latents {list(latents.shape)} do not fit the recorded size "
                             f"{meta['width']}x{meta['height']}")
    return Latents(latents, meta)


# --- images ----------------------------------------------------------------------------------------------
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def image_format(path: Path, option: str = "--output") -> str:
    """PIL format name for an output path's extension."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PixartError(f"{option} {path}: unknown image type {Path(path).suffix or '(none)'}; use .png, .jpg "
                          "or .webp")
    return fmt


def save_image(path: Path, image, parameters: str, settings: dict) -> Path:
    """Write an image atomically, its format chosen by the extension, with the generation settings inside.

    PNG: an A1111-style "parameters" text chunk and a "pixart" chunk with every setting as JSON.
    JPEG/WebP: the same two in EXIF (UserComment, as A1111 writes it, and ImageDescription).
    """
    fmt = image_format(path)
    settings_json = json.dumps(_plain(settings), sort_keys=True)
    if fmt == "PNG":
        from PIL.PngImagePlugin import PngInfo

        info = PngInfo()
        info.add_text("parameters", parameters)
        info.add_text("pixart", settings_json)
        extra = {"pnginfo": info}
    else:
        from PIL import Image

        exif = Image.Exif()
        exif[_IMAGE_DESCRIPTION] = settings_json
        exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\0" + parameters.encode("utf-16-be")
        extra = {"exif": exif.tobytes(), "quality": 95}
    with atomic_path(path) as temp:
        image.save(temp, format=fmt, **extra)
    return Path(path)


def read_image_metadata(path: Path) -> dict:
    """{"parameters": str | None, "settings": dict | None, "format", "size"} of an image pixart wrote."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            fmt, size = image.format, list(image.size)
            if fmt == "PNG":
                parameters, settings = image.text.get("parameters"), image.text.get("pixart")
            else:
                exif = image.getexif()
                settings = exif.get(_IMAGE_DESCRIPTION)
                comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                parameters = (comment[8:].decode("utf-16-be", "replace") if isinstance(comment, bytes)
                              and comment.startswith(b"UNICODE") else comment)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as error:
        raise bad_file(path, f"not an image pixart can read ({detail(error)})") from error
    try:
        settings = json.loads(settings) if settings else None
    except ValueError:
        settings = None
    if not isinstance(settings, dict):  # another program's description, not ours
        settings = None
    return {"format": fmt, "size": size, "parameters": parameters, "settings": settings}


@dataclass(frozen=True)
class SourceImage:
    """An image to start from (image to image): RGB pixels, upright as its EXIF orientation says, and the
    file's name and sha256, which the outputs record."""

    path: Path
    sha256: str
    pixels: Any  # PIL.Image.Image, mode RGB

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.size

    def record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


def read_source_image(path: Path, option: str = "IMAGE") -> SourceImage:
    """Read and decode an image file whole (a damaged or truncated one fails here, before any model loads)."""
    import hashlib
    import io

    from PIL import Image, ImageOps

    path = Path(path)
    if not path.is_file():
        raise PixartError(f"{option} {path}: no such file" + ("; it is a folder" if path.is_dir() else ""))
    try:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            # as diffusers.utils.load_image: upright per EXIF, then RGB (alpha dropped, palettes expanded)
            pixels = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as error:  # noqa: BLE001 - PIL raises many types on damaged input (and on decompression bombs)
        raise PixartError(f"{option} {path}: not an image pixart can read ({detail(error)[:120]}); give a .png, "
                          ".jpg or .webp file") from None
    return SourceImage(path, hashlib.sha256(data).hexdigest(), pixels)


def load_image_pixels(path: Path):
    """An image's pixels as a uint8 array [H, W, 3] (RGB), for comparing; any unreadable file is one line."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise bad_file(path, "no such file")
    try:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # noqa: BLE001 - PIL raises many types on damaged input (and on decompression bombs)
        raise bad_file(path, f"not an image pixart can read ({detail(error)[:120]})") from None


def require_writable(path: Path, option: str, inputs: tuple[Path, ...] = (), overwrite: bool = True) -> Path:
    """Check an output path before any work: its folder exists and is writable, it is not an input, and
    (with ``overwrite=False``) it does not exist yet."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise PixartError(f"{option} {path}: is a folder; give a file name")
    if not folder.is_dir():
        raise PixartError(f"{option} {path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK):
        raise PixartError(f"{option} {path}: folder {folder} is not writable")
    for source in inputs:
        if Path(source).resolve() == path.resolve():
            raise PixartError(f"{option} {path}: is also the input file; choose another output path")
    if not overwrite and path.exists():
        raise PixartError(f"{option} {path}: already exists and --no-overwrite was given; remove it or choose "
                          "another path")
    return path


def image_metadata(meta: dict, index: int) -> tuple[str, dict]:
    """(A1111 "parameters" text, JSON settings) for image ``index`` of a latents meta."""
    settings = {key: meta.get(key) for key in ("model", "revision", "family", "negative_prompt", "steps", "timesteps",
                                                "guidance_scale", "scheduler", "dtype", "clean_caption",
                                                "max_sequence_length", "binned", "loras")}
    # image to image only: the strength, the steps that ran, and the source image (name, sha256)
    settings.update({key: meta[key] for key in ("strength", "steps_run", "source_image") if key in meta})
    settings.update(prompt=meta["prompts"][index], seed=meta["seeds"][index], width=meta["requested_width"],
                    height=meta["requested_height"], denoise_width=meta["width"], denoise_height=meta["height"],
                    generator="pixart-cli")
    from pixart_cli.settings import sampler_name

    sampler = sampler_name(str(meta.get("scheduler")))
    parameters = (f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n"
                  f"Steps: {settings['steps']}, Sampler: {sampler}, CFG scale: {settings['guidance_scale']}, "
                  f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
                  f"Model: {settings['model']}")
    if "strength" in settings:  # image to image, as A1111 writes it
        parameters += f", Denoising strength: {settings['strength']}"
    return parameters, settings


def output_paths(output: Path, count: int) -> list[Path]:
    """Where ``count`` images go: ``out.png`` for one; ``out-0.png``, ``out-1.png``... for more; ``DIR/`` works."""
    text = str(output)
    if text.endswith(("/", os.sep)) or Path(output).is_dir():
        return [Path(output) / (f"image-{i}.png" if count > 1 else "image.png") for i in range(count)]
    image_format(output)
    output = Path(output)
    if count == 1:
        return [output]
    return [output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]
