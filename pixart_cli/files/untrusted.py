"""Reading a file that may come from a stranger: regular files only, ``torch.load(weights_only=True)`` bounded by
the size on disk, meta walked with a node budget, only dense tensors whose storage holds their elements; a model
folder's JSON files below a size cap, and safetensors headers through safetensors' own checks."""

from __future__ import annotations

import io
import json
import math
import os
import stat

from pixart_cli.errors import EXIT_RUNTIME, PixartError, bad_file, detail
from pixart_cli.files.atomic import FILE_KINDS
from pixart_cli.files.formats import (
    CONTROL_FORMAT,
    EMBEDDINGS_FORMAT,
    FORMAT_KEYS,
    FORMAT_VERSION,
    LATENTS_FORMAT,
    MASK_FORMAT,
)
from pixart_cli.files.stdin import is_stdin, read_stdin

# A file is untrusted, whatever wrote it: the work of reading it is bounded by its size on disk and these caps.
MAX_META_NODES = 1_000_000  # values and containers in meta (100k images need ~200k)


MAX_META_TEXT = 64 * 2**20  # characters of text in meta, keys included


MAX_META_DEPTH = 16  # pixart writes 3 levels


MAX_ZIP_ENTRIES = 4096  # torch.save writes one entry per storage, plus 4


MAX_INT = 2**63  # meta numbers beyond int64 are not ours (and str() of a huge int is slow or refused)


FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")


MASK_DTYPES = ("int64", "int32", "int16", "int8", "uint8", "bool")


MAX_JSON_BYTES = 16 * 2**20  # a model folder's model_index.json, weights index or config (the real T5 index: 20 kB)


def empty_path_error(option: str) -> PixartError:
    return PixartError(
        f"{option}: the path is empty; if it came from $(pixart ...), that command failed: run it "
        "on its own to see its error"
    )


_STDIN_NAMES = ("/dev/stdin", "/dev/fd/0", "/proc/self/fd/0")


def open_input(path, option: str | None = None, name: str | None = None):
    """Open an input file for reading: (binary file object, size in bytes). Refuses, naming the file (``name``,
    else its path), an empty path, a missing file, a folder, and anything that is not a regular file (a FIFO
    would block, a device never ends)."""
    text = str(path)
    if text == "":
        raise empty_path_error(option or "FILE")
    if is_stdin(text):
        data = read_stdin(option or "FILE")
        return io.BytesIO(data), len(data)
    shown = path if name is None else name
    try:
        handle = os.open(text, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise bad_file(shown, "no such file" + (" (a broken symbolic link)" if os.path.islink(text) else "")) from None
    except PermissionError:
        raise bad_file(shown, "cannot read it (permission denied)") from None
    except OSError as error:
        raise bad_file(shown, f"cannot open it ({error.strerror or type(error).__name__})") from None
    info = os.fstat(handle)
    if not stat.S_ISREG(info.st_mode):
        os.close(handle)
        kind = next((word for test, word in FILE_KINDS if test(info.st_mode)), "not a regular file")
        fix = "give a file" if kind == "a folder" else "pixart reads only regular files"
        if option is not None and (stat.S_ISFIFO(info.st_mode) or text in _STDIN_NAMES):  # /dev/stdin, <(cmd)
            fix = f"pixart reads regular files, and standard input as -: pipe the data in and give - in place of {text}"
        raise bad_file(shown, f"is {kind}, not a file; {fix}")
    os.set_blocking(handle, True)
    return os.fdopen(handle, "rb"), info.st_size


# What an image file starts with (PNG, JPEG, GIF; WebP is checked in its RIFF form): a .pt input that is an image
# was most likely meant for image to image.
_IMAGE_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")


def is_image_data(head: bytes) -> bool:
    """Whether the first 12 bytes of a file are an image's."""
    return head.startswith(_IMAGE_MAGIC) or (head[:4] == b"RIFF" and head[8:12] == b"WEBP")


def read_at_most(handle, limit: int, expected: int | None = None) -> bytes:
    """The bytes of ``handle``, up to ``limit`` + 1 (one more than the bound, so that the caller sees it passed).
    No buffer is reserved beyond what is there: ``expected`` (the size on disk) is read at once, and anything more
    (a pipe, a file that grows) in blocks."""
    first = handle.read(min(limit, expected) + 1) if expected else b""
    blocks, total = [first], len(first)
    while total <= limit:
        block = handle.read(min(2**20, limit + 1 - total))
        if not block:
            break
        blocks.append(block)
        total += len(block)
    return first if len(blocks) == 1 else b"".join(blocks)


def read_pt(
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
        check_archive(path, handle, size, argument)
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
            CONTROL_FORMAT: "a control file (from pixart encode-control)",
            MASK_FORMAT: "a mask file (from pixart encode-mask)",
        }
        if fmt == LATENTS_FORMAT and meta.get("sample") == "latent_dist.sample":  # staged.encoded_image_meta
            kind[fmt] = "an init latents file (from pixart encode-image)"
        if fmt in kind:
            raise bad_file(path, f"is {kind[fmt]}, but this command needs {needed or kind[expected_formats[0]]}")
        raise bad_file(path, f"unknown format {short(fmt)}; expected {' or '.join(expected_formats)}")
    if not isinstance(version, int) or isinstance(version, bool):
        raise bad_file(path, f"format version {short(version)} is not a number")
    if version > FORMAT_VERSION:
        raise bad_file(
            path, f"format version {version} is newer than this pixart-cli reads ({FORMAT_VERSION}); upgrade pixart-cli"
        )
    if version < 1:
        raise bad_file(path, f"format version {version} is not valid")
    allowed = set(FORMAT_KEYS[fmt]) | {"meta"}
    extra = sorted(str(key) for key in data if key not in allowed)
    if extra:
        raise bad_file(
            path,
            f"holds unexpected entries ({short(', '.join(extra))}); a {fmt} file holds only "
            f"{', '.join(sorted(allowed))}",
        )
    return data, size


_IMAGE_HINTS = {
    "EMBEDDINGS": "image to image starts with `pixart encode-image IMAGE -o init.pt`, then "
    "`pixart denoise EMBEDDINGS --init-latents init.pt`",
    "--init-latents": "encode it first with `pixart encode-image IMAGE -o init.pt` and pass --init-latents init.pt",
    "LATENTS": "decode reads the latents file from `pixart denoise` (this image is decoded already)",
    None: "pixart reads images by their name (.png, .jpg, .webp)",
}


def check_archive(path, handle, size: int, argument: str | None = None) -> None:
    """Before torch.load: the file must be the zip archive torch.save writes, with stored (uncompressed) entries
    that together fit in the file. A deflated entry could expand a few KB into GBs; a legacy (non-zip) .pt
    declares its storage sizes before their data, so a short file could ask for any amount of memory."""
    import zipfile

    head = handle.read(12)
    if head[:4] != b"PK\x03\x04":
        if is_image_data(head):
            raise bad_file(path, f"is an image, not a .pt file; {_IMAGE_HINTS.get(argument, _IMAGE_HINTS[None])}")
        handle.seek(0)
        if names_python_objects(handle.read(min(size, 1 << 20))):
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


def names_python_objects(blob: bytes) -> bool:
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
                    items.append((item_key, item, f"{where}.{key_text(item_key)}"))
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


def short(value, limit: int = 80) -> str:
    """A value for an error line: its repr (control characters escaped), cut to ``limit``."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


def key_text(key: str) -> str:
    return key if key.isidentifier() and len(key) <= 40 else short(key, 40)


def tensor_field(path, data: dict, key: str, rank: int, kinds: str, file_size: int):
    """One required tensor, checked from its metadata before anything is computed on it: a dense strided CPU
    tensor of a plain dtype, of the given rank, whose storage holds all its elements and whose size fits in
    the file; then non-empty and (floats) finite, or (masks) only 0 and 1. kinds: 'f' float, 'i' mask, 'p' pixels
    (uint8, any value)."""
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
    allowed = {"f": FLOAT_DTYPES, "i": MASK_DTYPES, "p": ("uint8",)}[kinds]
    if dtype not in allowed:
        expected = {"f": "a float tensor (float32, float16, bfloat16)", "i": "an integer mask", "p": "uint8 pixels"}
        expected = expected[kinds]
        raise bad_file(path, f"{key} has dtype {dtype}; expected {expected}")
    if value.dim() != rank:
        raise bad_file(path, f"{key} has shape {short(list(value.shape))}; expected {rank} dimensions")
    shape, strides = list(value.shape), list(value.stride())
    if 0 in shape:
        raise bad_file(path, f"{key} is empty (shape {shape})")
    if not is_dense(shape, strides):
        raise bad_file(
            path,
            f"{key} is a strided view (shape {short(shape)}, strides {short(strides)}) whose "
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
    elif kinds == "i" and not bool(((value == 0) | (value == 1)).all()):
        raise bad_file(path, f"{key} holds values other than 0 and 1; an attention mask is 0 or 1")
    return value


def is_dense(shape: list[int], strides: list[int]) -> bool:
    """Whether sizes and strides describe every element exactly once, with no gaps (any dimension order)."""
    expected = 1
    for stride, size in sorted((stride, size) for size, stride in zip(shape, strides) if size != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def meta_field(path, meta: dict, key: str, kind: type | tuple):
    value = meta.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise bad_file(path, f"meta.{key} is {short(value)}; expected {getattr(kind, '__name__', kind)}")
    return value


def model_fields(path, meta: dict) -> None:
    """The model a file names (loaded from local disk only, see models.Model) and its recorded settings."""
    for key in ("model", "family", "dtype"):
        value = meta_field(path, meta, key, str)
        if not value.strip() or len(value) > 4096:
            raise bad_file(path, f"meta.{key} is {short(value)}; expected a name")
    revision = meta.get("revision")
    if revision is not None and (not isinstance(revision, str) or not revision.strip() or len(revision) > 256):
        raise bad_file(path, f"meta.revision is {short(revision)}; expected a revision name or none")


def text_list(path, meta: dict, key: str, count: int, what: str) -> list:
    values = meta_field(path, meta, key, list)
    if len(values) != count or not all(isinstance(value, what) for value in values):
        raise bad_file(
            path,
            f"meta.{key} lists {len(values)} entries of the wrong kind for {count} "
            f"{'prompts' if key == 'prompts' else 'images'}",
        )
    return values


# --- a model folder's files: bounded JSON (its weights files: files/model_weights.py) ----------------------------
def read_json(path, what: str, limit: int = MAX_JSON_BYTES):
    """A JSON file of a model folder, opened as ``open_input`` opens (regular files only, a FIFO never blocks) and
    parsed only below ``limit`` bytes; ``what`` names it in errors ("--model ID: vae/config.json")."""
    handle, _ = open_input(path, name=what)
    try:
        with handle:
            data = handle.read(limit + 1)
    except OSError as error:
        raise PixartError(f"{what} cannot be read ({error.strerror})", EXIT_RUNTIME) from None
    if len(data) > limit:
        raise PixartError(f"{what} is larger than {limit // 2**20} MiB; pixart refuses it")
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as error:
        raise PixartError(f"{what} is broken ({detail(error)}); the model folder is damaged", EXIT_RUNTIME) from None
