"""Reading a PixArt ControlNet adapter file (untrusted): ``--controlnet FILE|DIR[:SCALE]`` parsed, the file found
(a folder holds one), checked against the base model from names and shapes alone before any model loads
(``check_controlnet``: the plan's check), and read later, where the transformer loads (``ControlNetFile.read``):
every adapter tensor read once, checked finite, converted to the diffusers layout and digested.

The digest (``weights_sha256``): sha256 over the adapter's tensors in the diffusers layout (each key, dtype and
shape, then its bytes, in key order), computed from the bytes the reader reads anyway. It is not the file's
sha256sum: the published .pth also holds the frozen base model (about 0.6B of its 0.9B parameters), which is
never read, and hashing it would cost a full read of the file in every run. The same adapter in either layout has one
digest, as it gives one image. The file's name is recorded beside it.
"""

from __future__ import annotations

import hashlib
import math
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pixart_cli.errors import PixartError
from pixart_cli.files.controlnet_keys import KeyPlan, check_folder_config, expected, plan_keys
from pixart_cli.files.controlnet_source import open_source
from pixart_cli.models.controlnet import DEFAULT_SCALE, config_of
from pixart_cli.settings import MAX_ADAPTER_SCALE

OPTION = "--controlnet"
# Where the weights are in a folder: diffusers' save_pretrained names, also under the controlnet/ subfolder that
# the circulating conversion writes; else the folder's only weights file.
FOLDER_FILES = (
    "diffusion_pytorch_model.safetensors",
    "controlnet/diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
    "controlnet/diffusion_pytorch_model.bin",
)
SUFFIXES = (".safetensors", ".pth", ".bin", ".pt")
_LAYOUT_NAMES = {"original": "original PixArt", "diffusers": "diffusers"}


@dataclass(frozen=True)
class ControlNetSpec:
    """One --controlnet value: the file or folder, and the scale of the adapter's skips."""

    path: Path
    scale: float = DEFAULT_SCALE


def parse_controlnet_spec(text: str, option: str = OPTION) -> ControlNetSpec:
    """'FILE', 'DIR' or either with ':SCALE'. A colon followed by something that is not a number is part of the
    path (C:\\... or a:b.pth)."""
    path, scale = text, DEFAULT_SCALE
    head, colon, tail = text.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    if not path:
        raise PixartError(f"{option} {text!r}: no file name; give FILE, DIR or FILE:SCALE")
    if not math.isfinite(scale):
        raise PixartError(f"{option} {text}: scale {tail} is not a finite number; give FILE:0.8 or FILE")
    if not -MAX_ADAPTER_SCALE <= scale <= MAX_ADAPTER_SCALE:
        raise PixartError(
            f"{option} {text}: scale {tail} is beyond ±{MAX_ADAPTER_SCALE:g}; published settings are 0 to 2 "
            "(give FILE:0.8 or FILE)"
        )
    if path == text and colon and head and not os.path.lexists(text) and os.path.exists(head):
        raise PixartError(f"{option} {text}: the scale {tail!r} is not a number; give {head}:0.8 or {head}")
    return ControlNetSpec(Path(path), scale)


def check_family(model, where: str) -> None:
    from pixart_cli.models.source import Model

    if isinstance(model, Model) and model.family.name == "sigma":
        raise PixartError(
            f"{where}: --model {model.id} is a PixArt-Σ model; the PixArt ControlNet adapter is trained on "
            "PixArt-α's latents (the SD VAE) and does not work with Σ: use a PixArt-α model such as "
            "PixArt-alpha/PixArt-XL-2-1024-MS"
        )


def _where(option: str | None, path) -> str:
    return f"{option} {path}" if option else str(path)


def _locate(path: Path, where: str) -> Path:
    """The weights file: ``path`` itself, or the one a folder holds."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        broken = " (a broken symbolic link)" if os.path.islink(path) else ""
        raise PixartError(
            f"{where}: no such file or folder{broken}; give the ControlNet's .pth or .safetensors file"
        ) from None
    except OSError as error:
        raise PixartError(f"{where}: cannot read it ({error.strerror or type(error).__name__})") from None
    if not stat.S_ISDIR(info.st_mode):
        return path
    for name in FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    try:
        found = sorted(entry.name for entry in os.scandir(path) if entry.name.endswith(SUFFIXES) and entry.is_file())
    except OSError as error:
        raise PixartError(f"{where}: cannot read the folder ({error.strerror or type(error).__name__})") from None
    if len(found) == 1:
        return path / found[0]
    if not found:
        raise PixartError(
            f"{where}: the folder holds no ControlNet weights file ({', '.join(SUFFIXES)}); give the file itself"
        )
    shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
    raise PixartError(f"{where}: the folder holds {len(found)} weights files ({shown}); give the one to use")


class _Opened:
    """The checked source of one weights file (family, location, size, format), closed on exit."""

    def __init__(self, path, model, option: str | None):
        self.path = Path(path)
        where = _where(option, self.path)
        check_family(model, where)
        self.file = _locate(self.path, where)
        self.where = where if self.file == self.path else f"{where} ({self.file.name})"
        config, model_id = config_of(model)
        scale = getattr(model, "vae_scale_factor", 8)
        self.expect = expected(config, model_id, scale)
        self.fd, self.source = open_source(self.file, self.where, self.expect.max_file_bytes)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.source.close()
        os.close(self.fd)

    def plan(self) -> KeyPlan:
        """Every name and shape checked (no data read), and a folder's config.json against them."""
        plan = plan_keys(self.source, self.expect, self.where)
        if self.file != self.path:
            check_folder_config(self.file, plan.num_blocks, self.where)
        return plan


@dataclass
class ControlNetWeights:
    """A ControlNet adapter file, read and checked against one base transformer; tensors in the diffusers layout
    (CPU, in the file's dtype, memory-mapped where the file allows)."""

    path: Path
    layout: str  # "original" (PixArt's controlnet.N.*) or "diffusers" (controlnet_blocks.N.*)
    num_blocks: int
    tensors: dict[str, Any]
    base_tensors_ignored: int = 0
    weights_sha256: str = ""

    @property
    def name(self) -> str:
        return self.path.name

    def parameter_bytes(self, dtype=None) -> int:
        """Bytes of the adapter's parameters, in ``dtype`` (None: as stored)."""
        itemsize = None if dtype is None else _itemsize(dtype)
        return sum(t.numel() * (t.element_size() if itemsize is None else itemsize) for t in self.tensors.values())

    def describe(self) -> str:
        ignored = f", {self.base_tensors_ignored} base_model tensors ignored" if self.base_tensors_ignored else ""
        return f"controlnet: {self.name} ({self.num_blocks} blocks, {_LAYOUT_NAMES[self.layout]} layout{ignored})"

    def record(self) -> dict:
        """What the latents meta and the image metadata keep of it."""
        return {"file": self.name, "weights_sha256": self.weights_sha256}


@dataclass(frozen=True)
class ControlNetFile:
    """A --controlnet file checked against the model from names and shapes (nothing read yet): what the plan
    keeps, the memory planner counts and the denoise stage reads."""

    spec: ControlNetSpec
    file: Path  # the weights file (inside the folder, when a folder was given)
    layout: str
    num_blocks: int
    numel: int
    base_tensors_ignored: int
    option: str = OPTION

    @property
    def scale(self) -> float:
        return self.spec.scale

    def parameter_bytes(self, itemsize: int) -> int:
        return self.numel * itemsize

    def describe(self) -> str:
        ignored = f", {self.base_tensors_ignored} base_model tensors ignored" if self.base_tensors_ignored else ""
        return (
            f"controlnet: {self.file.name} x{self.scale:g} ({self.num_blocks} blocks, {_LAYOUT_NAMES[self.layout]} "
            f"layout{ignored})"
        )

    def read(self, model) -> ControlNetWeights:
        """The tensors, checked again as they are read (the file may have changed since the plan's check)."""
        return read_controlnet(self.spec.path, model, option=self.option)


def check_controlnet(spec: ControlNetSpec, model, option: str = OPTION) -> ControlNetFile:
    """The plan's check: ``spec``'s file against ``model`` (a ``models.source.Model``), names and shapes only.
    Raises PixartError (exit 2): one line naming the file, what is wrong and the fix."""
    with _Opened(spec.path, model, option) as opened:
        plan = opened.plan()
    return ControlNetFile(spec, opened.file, plan.layout, plan.num_blocks, plan.numel, plan.dropped, option)


def read_controlnet(path, model, *, option: str | None = OPTION) -> ControlNetWeights:
    """Read a PixArt ControlNet adapter (a .pth/.bin torch.save archive, a .safetensors file, or a folder holding
    one) and check it against ``model``'s transformer: a ``models.source.Model`` (its family too), a transformer,
    or its config mapping. Every key, shape and dtype is checked before any tensor data is read; then each adapter
    tensor is read once (checked finite), the original layout is converted to diffusers', and the weights digested.

    Raises PixartError (exit 2): one line naming the file (after ``option``), what is wrong and the fix.
    """
    with _Opened(path, model, option) as opened:
        plan = opened.plan()
        tensors = _take_all(opened.source, plan, opened.where)
    return ControlNetWeights(opened.file, plan.layout, plan.num_blocks, tensors, plan.dropped, weights_digest(tensors))


def _take_all(source, plan: KeyPlan, where: str) -> dict:
    import torch

    tensors = {}
    for key, parts in plan.targets.items():
        tensor = source.take(key)  # popped from the source: one copy at most, whichever layout
        if tensor.layout != torch.strided:
            raise PixartError(f"{where}: {key} is a {tensor.layout} tensor; a ControlNet checkpoint holds dense ones")
        if not bool(torch.isfinite(tensor).all()):
            raise PixartError(
                f"{where}: {key} holds NaN or infinite values; the file is damaged or the training diverged: "
                "use another checkpoint"
            )
        pieces = (tensor,) if len(parts) == 1 else tensor.split(plan.splits[key], dim=0)
        tensors.update(zip(parts, pieces))
    return tensors


def weights_digest(tensors: dict) -> str:
    """sha256 over the tensors in key order: each key, dtype and shape, then its bytes (see the module's notes)."""
    import torch

    hasher = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        hasher.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().data)
    return hasher.hexdigest()


def adapter_parameter_bytes(path, model, dtype=None, *, option: str | None = OPTION) -> int:
    """Bytes the adapter's parameters take in ``dtype`` (None: as stored), from the file's header (safetensors) or
    its tensor records (torch archive, memory-mapped: no data read), after the same checks as read_controlnet
    except the finite-values one. Nothing is built, on the device or elsewhere."""
    with _Opened(path, model, option) as opened:
        plan = opened.plan()
        size = 0
        for key in plan.targets:
            itemsize = _itemsize(opened.source.dtype(key) if dtype is None else dtype)
            size += math.prod(opened.source.shape(key)) * itemsize
    return size


def file_size_limit(model) -> int:
    """The largest ControlNet file read for ``model`` (its transformer config): anything larger is refused."""
    config, model_id = config_of(model)
    return expected(config, model_id).max_file_bytes


def _itemsize(dtype) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()
