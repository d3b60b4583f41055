"""The staged files: embeddings (.pt), latents (.pt) and images. Nothing else reads or writes them.

A .pt file is ``torch.save`` of a plain dict: tensors at the top level under diffusers' keyword names,
so ``pipe(**{k: v for k, v in d.items() if k != "meta"})`` works, and a ``meta`` dict of plain values.
Loading uses ``weights_only=True`` only, then validates everything before any model is loaded.
Every write goes to a temp file in the same folder and is moved into place with ``os.replace``.
"""

from __future__ import annotations

import io
import json
import math
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file, detail, signals_deferred

EMBEDDINGS_FORMAT = "pixart-cli/embeddings"
LATENTS_FORMAT = "pixart-cli/latents"
FORMAT_VERSION = 1

EMBEDDING_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
_PLAIN = (str, int, float, bool, type(None))


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


# --- limits on what a file may make pixart do -------------------------------------------------------------
# A file is untrusted, whatever wrote it: the work of reading it is bounded by its size on disk and these caps.
MAX_META_NODES = 1_000_000  # values and containers in meta (100k images need ~200k)
MAX_META_TEXT = 64 * 2**20  # characters of text in meta, keys included
MAX_META_DEPTH = 16  # pixart writes 3 levels
MAX_ZIP_ENTRIES = 4096  # torch.save writes one entry per storage, plus 4
MAX_INT = 2**63  # meta numbers beyond int64 are not ours (and str() of a huge int is slow or refused)
FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
MASK_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool")


def _empty_path_error(option: str) -> PixartError:
    return PixartError(
        f"{option}: the path is empty; if it came from $(pixart ...), that command failed: run it "
        "on its own to see its error"
    )


# --- writing ---------------------------------------------------------------------------------------------
STDOUT = "-"


def names_folder(output) -> bool:
    """Whether ``-o`` names a folder: a path ending in ``/`` (created when written) or an existing folder."""
    text = str(output)
    return text.endswith(("/", os.sep)) or os.path.isdir(text)


def is_stdout(path) -> bool:
    """``-o -``: the single output's bytes go to stdout (scripts pipe them) instead of a file."""
    return str(path) == STDOUT


@contextmanager
def atomic_path(path: Path, overwrite: bool = True, follow_link: bool = False):
    """Yield a temp path beside ``path``; put it in place only if the block succeeds (see ``place``).

    The temp name does not contain the output's name, so a name as long as the file system allows still works.
    A missing folder (``-o newdir/``) is created here, at the last moment, and removed again if this fails.
    ``follow_link``: an output the user named; a symbolic link to a regular file there is written through (see
    ``output_targets``). pixart's own files (cache entries, the manifest) replace a link instead: a link planted
    in a shared folder must not make pixart write elsewhere.
    """
    path = written_path(path) if follow_link else Path(path)
    created = _make_folders(path.parent)
    placed = False
    temp = None
    try:
        handle, temp = tempfile.mkstemp(prefix=".pixart-", suffix=".tmp", dir=path.parent)
        os.close(handle)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)  # mkstemp makes 0600; a finished file gets the usual permissions
        yield Path(temp)
        place(Path(temp), path, overwrite)
        placed = True
    except OSError as error:  # a full disk, a folder gone: named by the output, not by the temp file
        raise PixartError(
            f"--output {path}: cannot write it ({error.strerror or type(error).__name__})", EXIT_RUNTIME
        ) from error
    finally:
        if temp is not None and os.path.lexists(temp):
            os.unlink(temp)
        if not placed:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    break


def written_path(path) -> Path:
    """The file an output named ``path`` lands in: the file a symbolic link there points to, when it points to a
    regular file (as ``cp`` and PIL's ``save`` write through a link), else ``path`` itself."""
    path = Path(path)
    if os.path.islink(path) and _existing_kind(path) == "file":
        return Path(os.path.realpath(path))
    return path


def _make_folders(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    for item in reversed(missing):
        try:
            item.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            raise PixartError(f"--output: cannot create folder {item} ({error.strerror})", EXIT_RUNTIME) from None
        created.append(item)
    return created


def place(temp: Path, path: Path, overwrite: bool) -> None:
    """Move a finished temp file to ``path``. Decided now, at the moment it lands, not only at the start:
    never over anything but a regular file, and with ``overwrite=False`` never over anything at all."""
    found = _existing_kind(path)
    if found not in (None, "file"):
        raise PixartError(f"--output {path}: is now {found}; pixart never replaces one; the output was not written")
    if overwrite:
        os.replace(temp, path)
        return
    try:
        os.link(temp, path)  # fails if the name exists, atomically: a file that appeared meanwhile is kept
    except FileExistsError:
        raise PixartError(
            f"--output {path}: appeared while pixart worked and --no-overwrite was given; it was "
            "kept and the output was not written"
        ) from None
    except OSError:
        # A file system without hard links: reserve the name with O_EXCL, then move the temp file over it.
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            raise PixartError(
                f"--output {path}: appeared while pixart worked and --no-overwrite was given; it "
                "was kept and the output was not written"
            ) from None
        os.replace(temp, path)
        return
    os.unlink(temp)


_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "file"),
)


def _existing_kind(path: Path) -> str | None:
    """None (nothing there), "file" (a regular file, or a link to one) or what else it is, in words."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a device is a device
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else None
    except OSError as error:
        return f"unreadable ({error.strerror})"
    for test, name in _KINDS:
        if test(mode):
            return name
    return "not a regular file"


def save(path: Path, artifact: Embeddings | Latents, overwrite: bool = True, follow_link: bool = True) -> Path:
    """Write an Embeddings or Latents file atomically (``-`` : to stdout), stamped with its format and version;
    tensors go to the CPU first. ``follow_link``: as ``atomic_path`` (an output the user named).

    Each tensor is saved with only its own elements: torch.save writes a view's whole storage, so a row sliced
    from a batch would otherwise carry the batch with it.
    """
    import torch

    payload = {key: _compact(value.detach().cpu()) for key, value in artifact.tensors().items()}
    payload["meta"] = _plain({**artifact.meta, "format": artifact.FORMAT, "version": FORMAT_VERSION})
    if is_stdout(path):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        _write_stdout(buffer.getvalue())
        return Path(STDOUT)
    with atomic_path(path, overwrite, follow_link) as temp:
        torch.save(payload, temp)
    return Path(path)


def _compact(tensor):
    """The tensor alone: a contiguous copy unless its storage holds exactly its own elements already."""
    import torch

    if tensor.is_contiguous() and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size():
        return tensor
    return tensor.clone(memory_format=torch.contiguous_format)


def _write_stdout(data: bytes) -> None:
    """All of an output's bytes at once, made before the first byte goes out."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        raise PixartError("--output -: stdout was closed before the output was written", EXIT_RUNTIME) from None


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


def json_safe(value):
    """A copy that ``json.dumps(..., allow_nan=False)`` accepts: NaN and inf become the strings "NaN",
    "Infinity" and "-Infinity". ``value`` is bounded already (meta passed ``plain_meta``)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {str(key): json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


# --- reading ---------------------------------------------------------------------------------------------
def open_input(path, option: str | None = None):
    """Open an input file for reading: (binary file object, size in bytes). Refuses, naming the file, an empty
    path, a missing file, a folder, and anything that is not a regular file (a FIFO would block, a device
    never ends)."""
    text = str(path)
    if text == "":
        raise _empty_path_error(option or "FILE")
    try:
        handle = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise bad_file(path, "no such file" + (" (a broken symbolic link)" if os.path.islink(text) else "")) from None
    except PermissionError:
        raise bad_file(path, "cannot read it (permission denied)") from None
    except OSError as error:
        raise bad_file(path, f"cannot open it ({error.strerror or type(error).__name__})") from None
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        kind = next((name for test, name in _KINDS if test(info.st_mode)), "not a regular file")
        fix = "give a file" if kind == "a folder" else "pixart reads only regular files"
        raise bad_file(path, f"is {kind}, not a file; {fix}")
    os.set_blocking(handle, True)
    return os.fdopen(handle, "rb"), info.st_size


def _read(
    path, expected_formats: tuple[str, ...], needed: str | None = None, argument: str | None = None
) -> tuple[dict, int]:
    """torch.load with weights_only=True, bounded by the file's size, then the checks common to every .pt file.
    ``needed``: what the command needs, for the error on a file of another format (default: the file of the
    first expected format); ``argument``: the argument that names the file."""
    if argument is None:
        argument = {(EMBEDDINGS_FORMAT,): "EMBEDDINGS", (LATENTS_FORMAT,): "LATENTS"}.get(expected_formats, "FILE")
    handle, size = open_input(path, argument)
    with handle:
        if size == 0:
            raise bad_file(path, "is empty (0 bytes); the command that wrote it may have failed: run it again")
        _check_archive(path, handle, size)
        handle.seek(0)
        import pickle

        import torch

        try:
            data = torch.load(handle, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            if "GLOBAL" in str(error) or "Unsupported global" in str(error):  # a class or function reference
                raise bad_file(
                    path,
                    "refused: it holds Python objects other than tensors, which could run code "
                    "(only files written by pixart are read)",
                ) from error
            raise bad_file(path, "not a pixart .pt file (its contents are not plain tensors and values)") from error
        except Exception as error:
            # found struct.error, EOFError, RuntimeError ...): whatever goes wrong inside it, the file is the problem
            raise bad_file(path, "is damaged: torch.load cannot read its contents; write it again") from error
    if not isinstance(data, dict) or not isinstance(data.get("meta"), dict):
        raise bad_file(path, "not a pixart .pt file (no meta dict)")
    data = dict(data)
    data["meta"] = plain_meta(path, data["meta"])
    meta = data["meta"]
    fmt, version = meta.get("format"), meta.get("version")
    if fmt not in expected_formats:
        kind = {
            EMBEDDINGS_FORMAT: "an embeddings file (from pixart encode)",
            LATENTS_FORMAT: "a latents file (from pixart denoise)",
        }
        if fmt in kind:
            raise bad_file(path, f"is {kind[fmt]}, but this command needs {needed or kind[expected_formats[0]]}")
        raise bad_file(path, f"unknown format {_short(fmt)}; expected {' or '.join(expected_formats)}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad_file(path, f"format version {_short(version)} is not a number")
    if version > FORMAT_VERSION:
        raise bad_file(
            path, f"format version {version} is newer than this pixart-cli reads ({FORMAT_VERSION}); upgrade pixart-cli"
        )
    if version < 1:
        raise bad_file(path, f"format version {version} is not valid")
    allowed = set(EMBEDDING_KEYS if fmt == EMBEDDINGS_FORMAT else ("latents",)) | {"meta"}
    extra = sorted(str(key) for key in data if key not in allowed)
    if extra:
        raise bad_file(
            path,
            f"holds unexpected entries ({_short(', '.join(extra))}); a {fmt} file holds only "
            f"{', '.join(sorted(allowed))}",
        )
    return data, size


def _check_archive(path, handle, size: int) -> None:
    """Before torch.load: the file must be the zip archive torch.save writes, with stored (uncompressed) entries
    that together fit in the file. A deflated entry could expand a few KB into GBs; a legacy (non-zip) .pt
    declares its storage sizes before their data, so a short file could ask for any amount of memory."""
    import zipfile

    head = handle.read(4)
    if head != b"PK\x03\x04":
        handle.seek(0)
        if _names_python_objects(handle.read(min(size, 1 << 20))):
            raise bad_file(
                path,
                "refused: it is a raw pickle that names Python functions or classes, which could "
                "run code (only files written by pixart are read)",
            )
        raise bad_file(
            path, "not a pixart .pt file (pixart writes zip archives with torch.save; this is something else)"
        )
    handle.seek(0)
    try:
        with zipfile.ZipFile(handle) as archive:
            entries = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError, NotImplementedError) as error:
        raise bad_file(path, "is damaged or truncated (its zip archive cannot be read); write it again") from error
    if len(entries) > MAX_ZIP_ENTRIES:
        raise bad_file(path, f"holds {len(entries)} archive entries; a pixart file holds a few")
    if any(entry.compress_type != zipfile.ZIP_STORED for entry in entries):
        raise bad_file(path, "holds compressed entries; torch.save never compresses, so this is not a pixart file")
    if sum(entry.file_size for entry in entries) > size:
        raise bad_file(path, "is damaged: its archive entries claim more bytes than the file holds")


def _names_python_objects(blob: bytes) -> bool:
    """Whether a raw pickle's opcodes name a global (the way pickles run code). Reading stops at the first error."""
    import pickletools

    try:
        for opcode, _, _ in pickletools.genops(blob):
            if opcode.name in ("GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE", "NEWOBJ", "NEWOBJ_EX"):
                return True
    except Exception:
        return False
    return False


def plain_meta(path, meta) -> dict:
    """Check that ``meta`` is a tree of plain values and return a copy, bounded in work whatever its shape.

    Iterative (no recursion), at most MAX_META_NODES values, MAX_META_TEXT characters and MAX_META_DEPTH levels;
    every container is visited once (tracked by identity): a container met twice is shared or cyclic, which
    pixart never writes, and walking it as a tree could take 2**depth steps.
    """
    seen: set[int] = set()
    nodes = text = 0
    root: dict = {}
    stack = [(meta, root, None, "meta", 0)]  # (value, parent copy, key in parent, where, depth)
    while stack:
        value, parent, key, where, depth = stack.pop()
        nodes += 1
        if nodes > MAX_META_NODES:
            raise bad_file(path, f"meta holds more than {MAX_META_NODES:,} values; not a pixart file")
        if isinstance(value, (dict, list, tuple)):
            if id(value) in seen:
                raise bad_file(
                    path,
                    f"{where} refers to a list or dict already used elsewhere (a shared or cyclic "
                    "structure); pixart never writes that",
                )
            seen.add(id(value))
            if depth >= MAX_META_DEPTH:
                raise bad_file(path, f"meta is nested more than {MAX_META_DEPTH} levels deep; not a pixart file")
            copy: dict | list = {} if isinstance(value, dict) else [None] * len(value)
            if isinstance(value, dict):
                items = []
                for item_key, item in value.items():
                    if not isinstance(item_key, str):
                        raise bad_file(path, f"{where} has a key of type {type(item_key).__name__}; meta keys are text")
                    text += len(item_key)
                    items.append((item_key, item, f"{where}.{_key_text(item_key)}"))
            else:
                items = [(index, item, where) for index, item in enumerate(value)]
            for item_key, item, item_where in reversed(items):
                stack.append((item, copy, item_key, item_where, depth + 1))
        elif isinstance(value, str):
            text += len(value)
            copy = value
        elif isinstance(value, bool) or value is None or isinstance(value, float):
            copy = value
        elif isinstance(value, int):
            if not -MAX_INT <= value < MAX_INT:
                raise bad_file(path, f"{where} holds a number beyond 64 bits; not a pixart file")
            copy = value
        else:
            raise bad_file(path, f"{where} holds a {type(value).__name__}; meta may hold only plain values")
        if text > MAX_META_TEXT:
            raise bad_file(
                path, f"meta holds more than {MAX_META_TEXT // 2**20} M characters of text; not a pixart file"
            )
        if parent is None:
            continue
        if key is None:
            if not isinstance(copy, dict):
                raise bad_file(path, "meta is not a dict")
            root = copy
        else:
            parent[key] = copy
    return root


def _short(value, limit: int = 80) -> str:
    """A value for an error line: its repr (control characters escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def _key_text(key: str) -> str:
    return key if key.isidentifier() and len(key) <= 40 else _short(key, 40)


def _tensor(path, data: dict, key: str, rank: int, kinds: str, file_size: int):
    """One required tensor, checked from its metadata before anything is computed on it: a dense strided CPU
    tensor of a plain dtype, of the given rank, whose storage holds all its elements and whose size fits in
    the file; then non-empty and (floats) finite, or (masks) only 0 and 1. kinds: 'f' float, 'i' mask."""
    import torch

    value = data.get(key)
    if value is None:
        raise bad_file(path, f"missing tensor {key!r}")
    if not isinstance(value, torch.Tensor):
        raise bad_file(path, f"{key} is a {type(value).__name__}, not a tensor")
    if value.layout != torch.strided:
        raise bad_file(
            path, f"{key} is a {str(value.layout).removeprefix('torch.')} tensor; pixart reads only dense tensors"
        )
    if value.is_quantized:
        raise bad_file(
            path,
            f"{key} is a quantized tensor ({str(value.dtype).removeprefix('torch.')}); pixart "
            "reads only plain float tensors",
        )
    if value.device.type != "cpu":
        raise bad_file(path, f"{key} is a tensor on the {value.device.type} device, which holds no data")
    dtype = str(value.dtype).removeprefix("torch.")
    allowed = FLOAT_DTYPES if kinds == "f" else MASK_DTYPES
    if dtype not in allowed:
        expected = "a float tensor (float32, float16, bfloat16)" if kinds == "f" else "an integer mask"
        raise bad_file(path, f"{key} has dtype {dtype}; expected {expected}")
    if value.dim() != rank:
        raise bad_file(path, f"{key} has shape {_short(list(value.shape))}; expected {rank} dimensions")
    shape, strides = list(value.shape), list(value.stride())
    if 0 in shape:
        raise bad_file(path, f"{key} is empty (shape {shape})")
    if not _dense(shape, strides):
        raise bad_file(
            path,
            f"{key} is a strided view (shape {_short(shape)}, strides {_short(strides)}) whose "
            "elements overlap or skip memory; pixart reads only dense tensors",
        )
    numel = math.prod(shape)
    needed = (value.storage_offset() + numel) * value.element_size()
    if needed > value.untyped_storage().nbytes():
        raise bad_file(path, f"{key} claims {numel:,} elements but its storage holds fewer")
    if numel * value.element_size() > file_size:
        raise bad_file(path, f"{key} claims {numel:,} elements, more than the file holds")
    if kinds == "f":
        if not bool(torch.isfinite(value).all()):
            raise bad_file(path, f"{key} contains NaN or inf values")
    elif not bool(((value == 0) | (value == 1)).all()):
        raise bad_file(path, f"{key} holds values other than 0 and 1; an attention mask is 0 or 1")
    return value


def _dense(shape: list[int], strides: list[int]) -> bool:
    """Whether sizes and strides describe every element exactly once, with no gaps (any dimension order)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(shape, strides) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _meta_field(path, meta: dict, key: str, kind: type | tuple):
    value = meta.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise bad_file(path, f"meta.{key} is {_short(value)}; expected {getattr(kind, '__name__', kind)}")
    return value


def _model_fields(path, meta: dict) -> None:
    """The model a file names (loaded from local disk only, see models.Model) and its recorded settings."""
    for key in ("model", "family", "dtype"):
        value = _meta_field(path, meta, key, str)
        if not value.strip() or len(value) > 4096:
            raise bad_file(path, f"meta.{key} is {_short(value)}; expected a name")
    revision = meta.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or len(revision) > 256):
        raise bad_file(path, f"meta.revision is {_short(revision)}; expected a revision name or none")


def _text_list(path, meta: dict, key: str, count: int, what: str) -> list:
    values = _meta_field(path, meta, key, list)
    if len(values) != count or not all(isinstance(value, what) for value in values):
        raise bad_file(
            path,
            f"meta.{key} lists {len(values)} entries of the wrong kind for {count} "
            f"{'prompts' if key == 'prompts' else 'images'}",
        )
    return values


def load_any(path) -> Embeddings | Latents:
    """An embeddings or a latents file, whichever ``path`` is (validated as such)."""
    data, size = _read(path, (EMBEDDINGS_FORMAT, LATENTS_FORMAT))
    if data["meta"]["format"] == EMBEDDINGS_FORMAT:
        return _embeddings(path, data, size)
    return _latents(path, data, size)


def file_kind(path) -> str:
    """ "pt" or "image", for the commands that take either (info, compare): what the file holds decides (torch.save
    writes a zip archive), then its name; a file that is neither is read as a .pt file, whose checks name it."""
    if str(path) == "":
        raise _empty_path_error("FILE")
    handle, _ = open_input(path, "FILE")
    with handle:
        if handle.read(4) == b"PK\x03\x04":
            return "pt"
    return "image" if Path(path).suffix.lower() in IMAGE_FORMATS else "pt"


def describe(path) -> dict:
    """What `pixart info` shows: a .pt file's tensors and meta, or an image's embedded settings.
    Everything in it is bounded and JSON-safe (NaN and inf as strings)."""
    if file_kind(path) == "image":
        return json_safe({"file": str(path), "kind": "image", **read_image_metadata(path)})
    artifact = load_any(path)
    tensors = {
        key: {"shape": list(value.shape), "dtype": str(value.dtype).removeprefix("torch.")}
        for key, value in artifact.tensors().items()
    }
    kind = "embeddings" if isinstance(artifact, Embeddings) else "latents"
    return json_safe({"file": str(path), "kind": kind, "tensors": tensors, "meta": artifact.meta})


def load_embeddings(path) -> Embeddings:
    """Read and validate an embeddings file (shapes agree with each other; not yet with a model)."""
    return _embeddings(path, *_read(path, (EMBEDDINGS_FORMAT,)))


def _embeddings(path, data: dict, size: int) -> Embeddings:
    meta = data["meta"]
    embeds = _tensor(path, data, "prompt_embeds", 3, "f", size)
    mask = _tensor(path, data, "prompt_attention_mask", 2, "i", size)
    negative = _tensor(path, data, "negative_prompt_embeds", 3, "f", size)
    negative_mask = _tensor(path, data, "negative_prompt_attention_mask", 2, "i", size)
    if tuple(mask.shape) != tuple(embeds.shape[:2]):
        raise bad_file(
            path, f"prompt_attention_mask shape {list(mask.shape)} does not match prompt_embeds {list(embeds.shape)}"
        )
    if negative.shape != embeds.shape or negative_mask.shape != mask.shape:
        raise bad_file(
            path, f"negative embeddings {list(negative.shape)} do not match prompt embeddings {list(embeds.shape)}"
        )
    _text_list(path, meta, "prompts", embeds.shape[0], str)
    _model_fields(path, meta)
    length = _meta_field(path, meta, "max_sequence_length", int)
    if embeds.shape[1] != length:
        raise bad_file(path, f"embeddings hold {embeds.shape[1]} tokens but meta.max_sequence_length is {length}")
    if not 1 <= length <= 4096:
        raise bad_file(path, f"sequence length {length} is out of range (1 to 4096)")
    return Embeddings(embeds, mask, negative, negative_mask, meta)


def load_latents(path) -> Latents:
    """Read and validate a latents file (internally consistent; not yet checked against a VAE)."""
    return _latents(path, *_read(path, (LATENTS_FORMAT,)))


def load_init_latents(path) -> Latents:
    """Init latents for image to image (--init-latents): any latents file, validated as load_latents does
    (`pixart encode-image` writes them from an image)."""
    data, size = _read(
        path, (LATENTS_FORMAT,), needed="init latents (from pixart encode-image)", argument="--init-latents"
    )
    return _latents(path, data, size)


def _latents(path, data: dict, size: int) -> Latents:
    meta = data["meta"]
    latents = _tensor(path, data, "latents", 4, "f", size)
    for key in ("height", "width", "requested_height", "requested_width"):
        value = _meta_field(path, meta, key, int)
        if value < 8 or value > 16384:
            raise bad_file(path, f"meta.{key} is {value}; expected a size in pixels")
    _model_fields(path, meta)
    _text_list(path, meta, "seeds", latents.shape[0], int)
    _text_list(path, meta, "prompts", latents.shape[0], str)
    scale = meta["height"] / latents.shape[2]
    if scale != meta["width"] / latents.shape[3] or scale < 1 or math.log2(scale) % 1:
        raise bad_file(
            path, f"latents {list(latents.shape)} do not fit the recorded size {meta['width']}x{meta['height']}"
        )
    return Latents(latents, meta)


# --- images ----------------------------------------------------------------------------------------------
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
_EXIF_IFD, _USER_COMMENT, _IMAGE_DESCRIPTION = 0x8769, 0x9286, 0x010E


def image_format(path: Path, option: str = "--output") -> str:
    """PIL format name for an output path's extension."""
    fmt = IMAGE_FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise PixartError(
            f"{option} {path}: unknown image type {Path(path).suffix or '(none)'}; use .png, .jpg or .webp"
        )
    return fmt


def save_image(path, image, parameters: str, settings: dict, overwrite: bool = True) -> Path:
    """Write an image atomically (``-``: PNG bytes to stdout), its format chosen by the extension, with the
    generation settings inside.

    PNG: an A1111-style "parameters" text chunk and a "pixart" chunk with every setting as JSON.
    JPEG/WebP: the same two in EXIF (UserComment, as A1111 writes it, and ImageDescription).
    """
    fmt = "PNG" if is_stdout(path) else image_format(path)
    settings_json = json.dumps(json_safe(_plain(settings)), sort_keys=True)
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
    if is_stdout(path):
        buffer = io.BytesIO()
        image.save(buffer, format=fmt, **extra)
        _write_stdout(buffer.getvalue())
        return Path(STDOUT)
    with atomic_path(path, overwrite, follow_link=True) as temp:
        image.save(temp, format=fmt, **extra)
    return Path(path)


# Images encoded at once: PNG's zlib and libjpeg release the GIL, so several threads write several images at a
# time (32 PNGs at 1024² took ~6 s one by one on the benchmark machine).
IMAGE_WRITERS = 8


def save_images(images: list[tuple], overwrite: bool = True, on_written=None) -> list[Path]:
    """Write several images as ``save_image`` does, ``(path, image, parameters, settings)`` each, encoded in
    parallel threads. ``on_written(index, path)`` is called in order, in this thread, as each is in place.

    On a failure or a signal, images not yet started are not written, the ones being written finish, and every
    image in place is still reported before the error goes on, so a failure can say truthfully what was written.
    """
    if len(images) <= 1 or any(is_stdout(item[0]) for item in images):
        paths = []
        for index, item in enumerate(images):
            with signals_deferred():  # placed and reported together
                paths.append(save_image(*item, overwrite=overwrite))
                if on_written is not None:
                    on_written(index, paths[-1])
        return paths
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(min(IMAGE_WRITERS, len(images)), thread_name_prefix="image-write")
    futures = [pool.submit(save_image, *item, overwrite=overwrite) for item in images]
    reported = 0
    try:
        for index, future in enumerate(futures):
            path = future.result()
            if on_written is not None:
                on_written(index, path)
            reported += 1
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        for index in range(reported, len(futures)):
            future = futures[index]
            if on_written is not None and future.done() and not future.cancelled() and future.exception() is None:
                on_written(index, future.result())
        raise
    pool.shutdown()
    return [future.result() for future in futures]


def read_image_metadata(path: Path) -> dict:
    """{"parameters": str | None, "settings": dict | None, "format", "size"} of an image pixart wrote."""
    from PIL import Image, UnidentifiedImageError

    handle, size_on_disk = open_input(path)
    if size_on_disk == 0:
        handle.close()
        raise bad_file(path, "is empty (0 bytes); the command that wrote it may have failed: run it again")
    try:
        with handle, Image.open(handle) as image:
            image.load()  # the pixels too: a truncated or damaged file fails here, not only a bad header
            fmt, size = image.format, list(image.size)
            if fmt == "PNG":
                parameters, settings = image.text.get("parameters"), image.text.get("pixart")
            else:
                exif = image.getexif()
                settings = exif.get(_IMAGE_DESCRIPTION)
                comment = exif.get_ifd(_EXIF_IFD).get(_USER_COMMENT)
                parameters = (
                    comment[8:].decode("utf-16-be", "replace")
                    if isinstance(comment, bytes) and comment.startswith(b"UNICODE")
                    else comment
                )
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise bad_file(path, image_problem(error)) from error
    try:
        settings = plain_meta(path, json.loads(settings)) if isinstance(settings, (str, bytes)) else None
    except (ValueError, RecursionError, PixartError):  # not JSON, too deep or too big: another program's, not ours
        settings = None
    if not isinstance(parameters, str):
        parameters = None
    return {"format": fmt, "size": size, "parameters": parameters, "settings": settings}


@dataclass(frozen=True)
class SourceImage:
    """An image to start from (image to image): RGB pixels, upright as its EXIF orientation says, and the
    file's name and sha256, which the outputs record."""

    path: Path
    sha256: str
    pixels: Any  # PIL.Image.Image, mode RGB
    option: str = "IMAGE"  # the argument that named it (IMAGE, --image): errors about the image name it

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.pixels.size

    def record(self) -> dict:
        return {"name": self.name, "sha256": self.sha256}


# A source image larger than this on disk is refused before it is read (PIL refuses decompression bombs itself).
MAX_SOURCE_IMAGE_BYTES = 256 * 2**20


def read_source_image(path, option: str = "IMAGE") -> SourceImage:
    """Read and decode an image file whole (a damaged or truncated one fails here, before any model loads).
    Untrusted like any input: only a regular file, bounded in size, decoded by PIL within its pixel limit."""
    import hashlib

    from PIL import Image, ImageOps

    if str(path) == "":
        raise _empty_path_error(option)
    try:
        handle, size = open_input(path, option)
    except PixartError as error:  # the line names the option too: "--image x.png: no such file"
        raise PixartError(f"{option} {error}", error.exit_code) from None
    with handle:
        if size == 0:
            raise PixartError(f"{option} {path}: is empty (0 bytes); give a .png, .jpg or .webp file")
        if size > MAX_SOURCE_IMAGE_BYTES:
            raise PixartError(
                f"{option} {path}: {size} bytes is beyond the {MAX_SOURCE_IMAGE_BYTES // 2**20} MiB "
                "pixart reads as a source image; give a smaller .png, .jpg or .webp file"
            )
        data = handle.read(MAX_SOURCE_IMAGE_BYTES + 1)
    try:
        with Image.open(io.BytesIO(data)) as image:
            # as diffusers.utils.load_image: upright per EXIF, then RGB (alpha dropped, palettes expanded)
            pixels = ImageOps.exif_transpose(image).convert("RGB")
    except Exception as error:
        raise PixartError(f"{option} {path}: {image_problem(error)}; give a .png, .jpg or .webp file") from None
    return SourceImage(Path(path), hashlib.sha256(data).hexdigest(), pixels, option)


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
    except Exception as error:
        raise bad_file(path, image_problem(error)) from None


def image_problem(error: Exception) -> str:
    """Why PIL could not read an image, for a line that names the file already: PIL's own text names the file
    object it was given (``<_io.BytesIO object at 0x...>``), which says nothing to a user."""
    import re

    from PIL import UnidentifiedImageError

    if isinstance(error, UnidentifiedImageError):
        return "not an image pixart can read (PIL does not recognise its format)"
    reason = re.sub(r"\s*<[^<>]*>", "", detail(error)).strip(" :") or type(error).__name__
    return f"not an image pixart can read ({reason[:120]})"


# --- where outputs go: one policy for every command ----------------------------------------------------------
PT_SUFFIX = ".pt"
DEFAULT_NAMES = {
    "embeddings": "embeddings.pt",
    "latents": "latents.pt",
    "init latents": "init.pt",
    "image": "image.png",
}


def output_targets(
    output: str | Path,
    count: int,
    kind: str,
    *,
    inputs: tuple = (),
    overwrite: bool = True,
    allow_stdout: bool = True,
    option: str = "--output",
) -> list[Path]:
    """The final path of each of a command's ``count`` outputs, checked before any work. One rule for all:

    - ``-``: the single output's bytes go to stdout (not with several outputs, --json, or a terminal);
    - an existing folder, or a path ending in ``/`` (created when the output is written): the default name
      inside it (``embeddings.pt``, ``latents.pt``, ``image.png``; several images ``image-0.png``, ...);
    - a file name: used as is; several images become ``out-0.png``, ``out-1.png``, ...; an image's extension
      picks its format (.png, .jpg, .webp), and a .pt output (embeddings, latents, init latents) must end in .pt.

    A path with a line break in it is refused: stdout lists each written path on one line.
    Each target must be new or a regular file (a device, FIFO or socket, or a link to one, is never replaced
    or written into), not an input, in a writable folder, with a name the file system takes; with
    ``overwrite=False`` it must not exist (checked again when the file is put in place). A symbolic link to a
    regular file is written through, as ``cp`` and PIL do: the file it points to gets the output (replaced
    atomically), the link stays, and the path printed is the one given.
    """
    text = str(output)
    if text == "":
        raise _empty_path_error(option)
    if len(f"_{text}_".splitlines()) > 1:  # \n, \r and the other breaks str.splitlines knows
        raise PixartError(
            f"{option} {_short(text)}: the path holds a line break, but each written path is one line of "
            "stdout; choose a name without one"
        )
    if is_stdout(text):
        if count != 1:
            raise PixartError(
                f"{option} -: writes one output to stdout, but this run makes {count}; give a file name or a folder"
            )
        if not allow_stdout:
            raise PixartError(f"{option} -: --json also prints on stdout; drop one of them")
        if sys.stdout.isatty():
            raise PixartError(f"{option} -: stdout is a terminal; redirect it (> file) or give a file name")
        return [Path(STDOUT)]
    images = kind == "image"
    folder_given = names_folder(text)
    if folder_given:
        folder = Path(text)
        if images and count > 1:
            paths = [folder / f"image-{index}.png" for index in range(count)]
        else:
            paths = [folder / DEFAULT_NAMES[kind]]
    else:
        path = Path(text)
        if images:
            image_format(path, option)
        paths = [path] if count == 1 else [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(count)]
    for path in paths:
        _check_target(path, option, inputs, overwrite, create_folder=folder_given)
    if not images and not folder_given and paths[0].suffix.lower() != PT_SUFFIX:
        raise PixartError(
            f"{option} {text}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} file is a torch .pt file; "
            f"name it {paths[0].with_suffix(PT_SUFFIX)}"
        )
    return paths


def _check_target(path: Path, option: str, inputs: tuple, overwrite: bool, create_folder: bool) -> None:
    found = _existing_kind(path)
    if found == "a folder":
        raise PixartError(f"{option} {path}: is a folder; give a file name")
    if found not in (None, "file"):
        raise PixartError(
            f"{option} {path}: is {found}; pixart writes only regular files and never replaces "
            "anything else; give a file path, or -o - to write to stdout"
        )
    if found is not None and not overwrite:
        raise PixartError(
            f"{option} {path}: already exists and --no-overwrite was given; remove it or choose another path"
        )
    folder = path.parent
    existing = folder
    while not existing.exists() and existing.parent != existing and not os.path.islink(existing):
        existing = existing.parent
    if existing != folder and not create_folder:
        raise PixartError(
            f"{option} {path}: folder {folder} does not exist; create it first, or end the path "
            "with / to have pixart create it"
        )
    if not existing.is_dir():
        raise PixartError(f"{option} {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK):
        raise PixartError(f"{option} {path}: folder {existing} is not writable")
    destination = written_path(path)
    if destination != path and not os.access(destination.parent, os.W_OK):
        raise PixartError(f"{option} {path}: links to {destination}, whose folder is not writable; give another path")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.relative_to(existing).parts if existing != folder else (path.name,):
        if len(os.fsencode(part)) > name_max:
            raise PixartError(
                f"{option} {_short(str(path))}: the name {_short(part, 40)} is longer than this file "
                f"system allows ({name_max} bytes); choose a shorter name"
            )
    for source in inputs:
        if found is not None and os.path.exists(source) and os.path.samefile(source, path):
            raise PixartError(f"{option} {path}: is also the input file; choose another output path")


def image_metadata(meta: dict, index: int) -> tuple[str, dict]:
    """(A1111 "parameters" text, JSON settings) for image ``index`` of a latents meta."""
    settings = {
        key: meta.get(key)
        for key in (
            "model",
            "revision",
            "family",
            "negative_prompt",
            "steps",
            "timesteps",
            "guidance_scale",
            "scheduler",
            "dtype",
            "clean_caption",
            "max_sequence_length",
            "binned",
            "loras",
            "step_cache",
            "compiled",
        )
    }
    # image to image only: the strength, the steps that ran, and the source image (name, sha256)
    settings.update({key: meta[key] for key in ("strength", "steps_run", "source_image") if key in meta})
    settings.update(
        prompt=meta["prompts"][index],
        seed=meta["seeds"][index],
        width=meta["requested_width"],
        height=meta["requested_height"],
        denoise_width=meta["width"],
        denoise_height=meta["height"],
        generator="pixart-cli",
    )
    from pixart_cli.settings import sampler_name

    sampler = sampler_name(str(meta.get("scheduler")))
    parameters = (
        f"{settings['prompt']}\nNegative prompt: {settings['negative_prompt']}\n"
        f"Steps: {settings['steps']}, Sampler: {sampler}, CFG scale: {settings['guidance_scale']}, "
        f"Seed: {settings['seed']}, Size: {settings['width']}x{settings['height']}, "
        f"Model: {settings['model']}"
    )
    if "strength" in settings:  # image to image, as A1111 writes it
        parameters += f", Denoising strength: {settings['strength']}"
    if settings["step_cache"] is not None:  # approximate: a reader must know the image is not the exact one
        parameters += f", Step cache: {settings['step_cache']}"
    return parameters, settings
