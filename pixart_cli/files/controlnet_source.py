"""The tensors of an untrusted ControlNet weights file, read without running code and without reading data that
is not asked for: a torch.save zip archive through ``torch.load(weights_only=True, mmap=True)``, or a .safetensors
file through its header. Both answer names, shapes and dtypes before any tensor data is read, and hand out each
tensor once (``take``); what is dropped is never read. The file is opened once and read through its descriptor
(``/proc/self/fd``), so a file swapped for another after the checks changes nothing.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path

from pixart_cli.errors import PixartError, detail
from pixart_cli.files.controlnet_keys import short
from pixart_cli.files.formats import SAFETENSORS_DTYPES

MAX_ZIP_ENTRIES = 100_000
GIB = 2**30
_KINDS = (
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def open_source(file: Path, where: str, limit: int):
    """(file descriptor, source) of a regular, non-empty file of at most ``limit`` bytes that is a .safetensors
    file or a torch.save zip archive. The caller closes both (``source.close()``, ``os.close(fd)``)."""
    fd, size, head = _open_checked(file, where, limit)
    try:
        if _is_safetensors(head, size):
            return fd, SafetensorsSource(fd, file, where)
        if head[:4] == b"PK\x03\x04":
            return fd, TorchSource(fd, file, size, where)
        raise PixartError(
            f"{where}: is neither a .safetensors file nor a zip checkpoint of torch.save (a legacy or raw pickle, "
            "which could run code, is never loaded); re-save it with torch.save or as .safetensors"
        )
    except BaseException:
        os.close(fd)
        raise


def _open_checked(file: Path, where: str, limit: int) -> tuple[int, int, bytes]:
    """(file descriptor, size, first bytes) of a regular, non-empty file of at most ``limit`` bytes."""
    try:
        info = os.stat(file)
    except OSError as error:
        raise PixartError(f"{where}: cannot read it ({error.strerror or type(error).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        raise PixartError(f"{where}: is {kind}, not a file; give the ControlNet's .pth or .safetensors file")
    try:  # O_NONBLOCK: a file swapped for a FIFO after the stat above must not block the open
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as error:
        raise PixartError(f"{where}: cannot open it ({error.strerror or type(error).__name__})") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise PixartError(f"{where}: is not a regular file; give the ControlNet's .pth or .safetensors file")
    size = info.st_size
    if size == 0:
        os.close(fd)
        raise PixartError(f"{where}: is empty (0 bytes); download the ControlNet file again")
    if size > limit:
        os.close(fd)
        raise PixartError(
            f"{where}: is {_size(size)}, more than a PixArt ControlNet for this model can be (at most "
            f"{_size(limit)}: adapter and base model in fp32, twice over); give the ControlNet weights file"
        )
    os.set_blocking(fd, True)
    head = os.pread(fd, 16, 0)
    return fd, size, head


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GB" if count >= GIB else f"{count / 2**20:.1f} MB"


def _fd_path(fd: int, file: Path) -> str:
    """A path to the very file behind ``fd`` (Linux's /proc), so a swap after the checks changes nothing."""
    proc = f"/proc/self/fd/{fd}"
    return proc if os.path.exists(proc) else os.fspath(file)


def _is_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    length = int.from_bytes(head[:8], "little")
    return 0 < length <= size - 8 and head[8:9] == b"{"


class TorchSource:
    """The tensors of a torch.save zip archive, memory-mapped, read with weights_only (no code runs)."""

    def __init__(self, fd: int, file: Path, size: int, where: str):
        import pickle
        import zipfile

        import torch

        with os.fdopen(os.dup(fd), "rb") as handle:
            try:
                with zipfile.ZipFile(handle) as archive:
                    entries = archive.infolist()
            except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as error:
                raise PixartError(
                    f"{where}: is damaged or truncated (its zip archive cannot be read: {detail(error)}); "
                    "download the ControlNet file again"
                ) from None
        if len(entries) > MAX_ZIP_ENTRIES:
            raise PixartError(f"{where}: holds {len(entries)} archive entries; not a ControlNet checkpoint")
        if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
            raise PixartError(
                f"{where}: holds compressed archive entries; torch.save never compresses, so this is not a "
                "checkpoint torch.save wrote"
            )
        if sum(entry.file_size for entry in entries) > size:
            raise PixartError(
                f"{where}: is damaged: its archive entries claim more bytes than the file holds; download it again"
            )
        try:
            data = torch.load(_fd_path(fd, file), map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as error:
            named = re.search(r"GLOBAL ([\w.]+)", str(error))
            what = f" (it names {named.group(1)})" if named else ""
            raise PixartError(
                f"{where}: refused: it holds Python objects other than tensors, which could run code{what}; a "
                "ControlNet checkpoint holds tensors only, and pixart loads it with weights_only"
            ) from None
        except Exception as error:  # RuntimeError, struct.error, EOFError...: the file is the problem
            raise PixartError(
                f"{where}: is damaged: torch.load cannot read it ({detail(error)[:120]}); download it again"
            ) from None
        if isinstance(data, Mapping) and isinstance(data.get("state_dict"), Mapping):
            data = data["state_dict"]  # the published .pth: {"state_dict": {...}} (app_controlnet.py reads that)
        if not isinstance(data, Mapping):
            raise PixartError(
                f"{where}: holds a {type(data).__name__}, not a state dict of tensors; not a ControlNet checkpoint"
            )
        for key, value in data.items():
            if not isinstance(key, str):
                raise PixartError(f"{where}: has a key {key!r} that is not a name; not a ControlNet checkpoint")
            if not isinstance(value, torch.Tensor):
                raise PixartError(
                    f"{where}: entry {short(key)} is a {type(value).__name__}, not a tensor; not a ControlNet "
                    "checkpoint"
                )
        self.tensors = dict(data)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].shape)

    def dtype(self, key: str):
        return self.tensors[key].dtype

    def take(self, key: str):
        return self.tensors.pop(key)

    def drop(self, key: str) -> None:
        self.tensors.pop(key, None)  # a memory-mapped tensor: never read, and now not kept either

    def close(self) -> None:
        self.tensors.clear()


class SafetensorsSource:
    """The tensors of a .safetensors file: names, shapes and dtypes from its header; data only when taken."""

    def __init__(self, fd: int, file: Path, where: str):
        from safetensors import safe_open

        try:
            self.handle = safe_open(_fd_path(fd, file), framework="pt", device="cpu")
            self._keys = list(self.handle.keys())
        except Exception as error:
            raise PixartError(
                f"{where}: damaged .safetensors file ({detail(error)[:120]}); download it again"
            ) from None
        self.where = where

    def keys(self) -> list[str]:
        return self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.handle.get_slice(key).get_shape())

    def dtype(self, key: str):
        """The torch dtype, or the header's name of one torch lacks (F8_E4M3 on an old torch, ...)."""
        import torch

        stored = self.handle.get_slice(key).get_dtype()
        return getattr(torch, SAFETENSORS_DTYPES.get(stored, ""), None) or stored

    def take(self, key: str):
        try:
            return self.handle.get_tensor(key)
        except Exception as error:
            raise PixartError(
                f"{self.where}: cannot read tensor {key} ({detail(error)[:80]}); download it again"
            ) from None

    def drop(self, key: str) -> None:
        pass  # never read

    def close(self) -> None:
        self.handle = None
