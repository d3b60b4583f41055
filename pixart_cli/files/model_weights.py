"""A model folder's weights files, read without trusting them: safetensors headers through safetensors' own checks
(``pread``, no memory map), and the ``.bin`` checkpoints diffusers and transformers fall back to where a folder has
no safetensors, read as those loaders read them.

One rule for every component (text_encoder, transformer, vae), in every stage and in ``pixart convert``: a
component's weights are its safetensors files or, where it has none, its ``.bin`` checkpoint (``BIN_WEIGHTS``, or an
index of such shards). A ``.bin`` is a pickle, read only with ``torch.load(weights_only=True)``, which builds
tensors and plain containers and refuses every other object a pickle names, so it runs no code (torch 2.6 on:
CVE-2025-32434 broke it before, and transformers refuses older torch for the same reason). Before torch sees it, it
must be the zip archive torch.save writes, with stored entries that fit in the file (a legacy pickle declares its
storage sizes before their data); it is memory-mapped, so its names, dtypes and shapes are known before any tensor
data is read, and every tensor must be a dense CPU tensor of a plain dtype whose storage holds it. Other pickles
(``.pt``, ``.ckpt``, ``.pth``, ...) are not what the loaders read, and are never read.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail
from pixart_cli.files.formats import SAFETENSORS_DTYPES

# The pickle each component's loader reads where its folder has no safetensors (diffusers' and transformers' names);
# sharded: NAME.index.json beside shards of the same stem, as for safetensors.
BIN_WEIGHTS = {
    "transformer": "diffusion_pytorch_model.bin",
    "vae": "diffusion_pytorch_model.bin",
    "text_encoder": "pytorch_model.bin",
}
MAX_BIN_ENTRIES = 100_000  # archive entries: torch.save writes one per storage, plus a few (PixArt-XL's: ~700)
SAFE_TORCH = "2.6"  # the first torch whose weights_only load runs no code (CVE-2025-32434)
_CODES = {name: code for code, name in SAFETENSORS_DTYPES.items()}


def open_safetensors(path):
    """``safetensors.safe_open`` through ``pread`` where this safetensors has it (0.8 on): a memory map would count
    every page read in this process's RSS."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:  # an older safetensors: no backend argument
        return safe_open(str(path), framework="pt")


def safetensors_header(path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype code, shape) of one safetensors file, in the order of its data, from its header only
    (safetensors bounds the header and checks that its offsets cover the file exactly); ``what`` names the file."""
    from safetensors import SafetensorError

    try:
        with open_safetensors(path) as handle:
            names = handle.offset_keys() if hasattr(handle, "offset_keys") else handle.keys()
            entries = {}
            for name in names:
                view = handle.get_slice(name)
                entries[name] = (view.get_dtype(), tuple(int(n) for n in view.get_shape()))
            return entries
    except (SafetensorError, OSError, ValueError) as error:
        raise PixartError(
            f"{what} is damaged (truncated or not safetensors: {detail(error)}); download the model again",
            EXIT_RUNTIME,
        ) from error


def weights_header(path, what: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype code, shape) of a weights file of either kind (a ``.bin`` by its suffix)."""
    if Path(path).suffix == ".bin":
        with BinTensors(path, what) as checkpoint:
            return dict(checkpoint.entries)
    return safetensors_header(path, what)


def open_weights(path, what: str):
    """A weights file of either kind, with safe_open's ``get_tensor(name)``, as a context manager."""
    return BinTensors(path, what) if Path(path).suffix == ".bin" else open_safetensors(path)


class BinTensors:
    """The tensors of a ``.bin`` checkpoint, memory-mapped through ``torch.load(weights_only=True, mmap=True)``
    after the archive's checks (see the module's docstring); ``what`` names the file in errors. The interface of
    both readers pixart has: safe_open's (``keys``, ``get_tensor``, a context manager) and ``streaming.TensorFile``'s
    (``read``, ``check_shapes``, ``close``)."""

    def __init__(self, path, what: str):
        self.path, self.what = Path(path), what
        self.tensors = _load(self.path, what)
        self.entries = {
            name: (_CODES[str(t.dtype).removeprefix("torch.")], tuple(t.shape)) for name, t in self.tensors.items()
        }

    def keys(self):
        return self.tensors.keys()

    def get_tensor(self, name: str):
        return self.tensors[name]

    def read(self, name: str, device):
        """One tensor on ``device`` (its own copy: the memory map stays the file's)."""
        tensor = self.tensors[name]
        return tensor.clone() if device.type == "cpu" else tensor.to(device)

    def check_shapes(self, shapes: dict) -> None:
        """ValueError naming the first tensor whose shape in the file is not the one the model expects."""
        for name, shape in shapes.items():
            entry = self.entries.get(name)
            if entry is not None and list(entry[1]) != list(shape):
                raise ValueError(f"{self.path}: tensor {name} has shape {list(entry[1])}, but the config gives {shape}")

    def close(self) -> None:
        self.tensors = {}

    def __enter__(self):
        return self

    def __exit__(self, *_) -> None:
        self.close()


def _load(path: Path, what: str) -> dict:
    import pickle
    import zipfile

    import torch

    from pixart_cli.files.untrusted import is_dense, open_input

    fix = "get the model's safetensors files"
    if torch.torch_version.TorchVersion(torch.__version__) < SAFE_TORCH:
        raise PixartError(
            f"{what}: is a pickle, and torch {torch.__version__}'s weights_only load can run code (CVE-2025-32434); "
            f"upgrade torch to {SAFE_TORCH} or later, or {fix}",
            EXIT_RUNTIME,
        )
    try:
        handle, size = open_input(path, name=what)  # regular files only: a FIFO never blocks
    except PixartError as error:
        raise PixartError(f"{error}; the model folder is incomplete or damaged", EXIT_RUNTIME) from None
    with handle:
        if handle.read(4) != b"PK\x03\x04":
            raise PixartError(
                f"{what}: is not the zip archive torch.save writes (a legacy or raw pickle, which pixart never "
                f"loads); {fix}, or re-save it with a current torch.save",
                EXIT_RUNTIME,
            )
        handle.seek(0)
        try:
            with zipfile.ZipFile(handle) as archive:
                entries = archive.infolist()
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
            raise PixartError(f"{what}: is damaged ({detail(error)}); download the model again", EXIT_RUNTIME) from None
    if len(entries) > MAX_BIN_ENTRIES or any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise PixartError(f"{what}: is not a checkpoint torch.save wrote (its archive entries); {fix}", EXIT_RUNTIME)
    if sum(entry.file_size for entry in entries) > size:
        raise PixartError(
            f"{what}: is damaged (its entries claim more than the file holds); download it again", EXIT_RUNTIME
        )
    try:
        data = torch.load(os.fspath(path), map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL ([\w.]+)", str(error))
        raise PixartError(
            f"{what}: refused: it holds Python objects other than tensors, which could run code"
            f"{f' (it names {named.group(1)})' if named else ''}; pixart reads a .bin checkpoint with weights_only, "
            f"which loads tensors only: {fix}",
            EXIT_RUNTIME,
        ) from None
    except Exception as error:  # RuntimeError, EOFError, struct.error: the file is the problem
        raise PixartError(
            f"{what}: is damaged ({detail(error)[:120]}); download the model again", EXIT_RUNTIME
        ) from None
    if not isinstance(data, Mapping):
        raise PixartError(f"{what}: holds a {type(data).__name__}, not a state dict of tensors; {fix}", EXIT_RUNTIME)
    for name, tensor in data.items():
        problem = _tensor_problem(tensor, torch, is_dense) if isinstance(name, str) else "a key that is not a name"
        if problem is not None:
            raise PixartError(f"{what}: {str(name)[:80]} is {problem}; {fix}", EXIT_RUNTIME)
    return dict(data)


def _tensor_problem(tensor, torch, is_dense) -> str | None:
    """What keeps ``tensor`` from being a weight, in words, or None."""
    if not isinstance(tensor, torch.Tensor):
        return f"a {type(tensor).__name__}, not a tensor"
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.device.type != "cpu":
        return "not a dense CPU tensor"
    if str(tensor.dtype).removeprefix("torch.") not in _CODES:
        return f"of dtype {tensor.dtype}, which pixart does not read"
    shape, strides = list(tensor.shape), list(tensor.stride())
    needed = (tensor.storage_offset() + math.prod(shape)) * tensor.element_size()
    if not is_dense(shape, strides) or needed > tensor.untyped_storage().nbytes():
        return "a view whose storage does not hold it densely"
    return None
