"""DIR/manifest.jsonl: one JSON line per finished image, appended atomically by any number of writers.

A line is written only after its image is in place (the image itself is written atomically first), so a crash or
SIGTERM between the two leaves an image without a line, which ``--resume`` simply makes again. Each line is one
``os.write`` on an ``O_APPEND`` descriptor under an exclusive ``lockf`` lock: concurrent ranks never interleave
bytes, and a line cut short by a power loss is closed with a newline before the next one is added (readers skip it).
The newest valid line for an index wins; older ones stay (nothing is ever rewritten in place).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

NAME = "manifest.jsonl"
VERSION = 1
# A manifest is untrusted like any file: reading it is bounded before it is read. A line holds one image's prompt
# (at most settings.MAX_PROMPT_CHARS), its settings and options: a few KB, far below MAX_LINE_BYTES; a longer line
# is skipped (read in blocks, never held). A run of settings.MAX_IMAGES images writes a few MB; the lines of its
# resumes add to that, far below MAX_MANIFEST_BYTES.
MAX_LINE_BYTES = 2**20
MAX_MANIFEST_BYTES = 256 * 2**20
# What must match for a line to describe the image a run is about to make (options with defaults filled in).
IDENTITY = ("index", "path", "prompt", "negative_prompt", "seed", "options")


def manifest_path(folder: Path) -> Path:
    return Path(folder) / NAME


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def record(
    folder: Path, index: int, path: Path, prompt: str, negative_prompt: str, seed: int, options: dict, settings: dict
) -> dict:
    """The manifest line of a written image: identity, the settings stored in the image, size and sha256.
    The path is relative to the manifest's folder, so the folder can move (or be mounted elsewhere)."""
    path = Path(path)
    return {
        "version": VERSION,
        "index": index,
        "path": os.path.relpath(path, folder),
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "seed": seed,
        "options": options,
        "settings": settings,
        "size": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def append(folder: Path, line: dict) -> None:
    """Add one line atomically (one write under an exclusive lock); safe from many processes at once."""
    data = (json.dumps(line, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")
    fd = _open(manifest_path(folder), os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX)  # serialises the last-byte check below with other writers; freed on close
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data  # a line cut short by a crash stays one (skipped) line, not glued to ours
        while data:  # a regular file takes it in one write; the loop only guards a short write (we hold the lock)
            data = data[os.write(fd, data) :]
    finally:
        os.close(fd)


def start_new(folder: Path) -> None:
    """Begin a fresh manifest for a run without --resume (atomically: readers see the old file or an empty one).
    A folder that does not exist yet has no manifest to clear: the first line appended creates it, after the
    first image created the folder, so a run stopped before any image leaves no folder behind."""
    from pixart_cli.files.atomic import atomic_path

    if not folder.is_dir():
        return

    with atomic_path(manifest_path(folder)) as temp:
        temp.write_bytes(b"")


def _open(path: Path, flags: int) -> int:
    """A descriptor on the manifest, which must be a regular file: a link, FIFO or device planted in its place is
    neither followed nor read (it could redirect the appends, block, or never end)."""
    from pixart_cli.errors import PixartError

    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_NONBLOCK, 0o666)
    except FileNotFoundError:
        raise
    except OSError as error:
        if os.path.islink(path):  # O_NOFOLLOW: ELOOP (EMLINK, EFTYPE on some systems) for a link
            target = os.readlink(path)
            fix = (
                f"replace the link with the file itself (mv {os.path.realpath(path)} {path}), or give -o another folder"
                if os.path.isfile(path)
                else "remove it (it points nowhere), or give -o another folder"
            )
            raise PixartError(
                f"{path}: is a symbolic link (to {target}); the manifest must be a regular file, so that a link "
                f"cannot redirect its lines elsewhere: {fix}"
            ) from None
        raise PixartError(
            f"{path}: cannot be used as the manifest ({error.strerror}); remove it, or give -o another folder"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        from pixart_cli.files.atomic import FILE_KINDS

        kind = next((word for test, word in FILE_KINDS if test(mode)), "not a regular file")
        raise PixartError(
            f"{path}: is {kind}, not a regular file, so it cannot be the manifest; remove it, or give -o another folder"
        )
    return fd


def read(folder: Path, images: int | None = None) -> dict[int, dict]:
    """The newest well-formed line of each index (below ``images``, the run's count, when given: a line for an
    image the run does not make is not kept). Damaged, foreign or overlong lines are skipped, never fatal; a
    manifest beyond MAX_MANIFEST_BYTES is refused. It must be a regular file this process can append to (checked
    here, before any image is made)."""
    from pixart_cli.errors import PixartError

    path = manifest_path(folder)
    newest: dict[int, dict] = {}
    try:
        handle = os.fdopen(_open(path, os.O_RDONLY), "rb")
    except FileNotFoundError:
        return newest
    with handle:
        if not os.access(path, os.W_OK):
            raise PixartError(f"{path}: not writable, so finished images could not be recorded; fix its permissions")
        size = os.fstat(handle.fileno()).st_size
        if size > MAX_MANIFEST_BYTES:
            raise PixartError(
                f"{path}: {size:,} bytes is beyond the {MAX_MANIFEST_BYTES // 2**20} MiB pixart reads as a manifest; "
                "not one pixart wrote for a run: drop --resume to start a new run, or give -o another folder"
            )
        for raw in _lines(handle, MAX_MANIFEST_BYTES):
            try:
                line = json.loads(raw)
            except (ValueError, RecursionError):  # RecursionError: a line nested deeper than the parser goes
                continue
            if _well_formed(line) and (images is None or line["index"] < images):
                newest[line["index"]] = line
    return newest


def _lines(handle, budget: int):
    """The file's lines of at most MAX_LINE_BYTES, ``budget`` bytes in all; a longer line is read through in blocks
    of that size and skipped."""
    skipping = False
    while budget > 0:
        block = handle.readline(min(MAX_LINE_BYTES + 1, budget))
        if not block:
            return
        budget -= len(block)
        complete = block.endswith(b"\n")
        if not skipping and (complete or len(block) <= MAX_LINE_BYTES):
            yield block
        skipping = not complete


def _well_formed(line) -> bool:
    return (
        isinstance(line, dict)
        and line.get("version") == VERSION
        and type(line.get("index")) is int
        and line["index"] >= 0
        and isinstance(line.get("path"), str)
        and isinstance(line.get("sha256"), str)
        and type(line.get("size")) is int
        and type(line.get("seed")) is int
        and isinstance(line.get("options"), dict)
        and all(key in line for key in IDENTITY)
    )


@dataclass(frozen=True)
class Wanted:
    """What a run will make at one index; a manifest line matches it when every identity field is equal."""

    index: int
    path: str  # relative to the manifest's folder
    prompt: str
    negative_prompt: str
    seed: int
    options: dict

    def identity(self) -> dict:
        return {
            "index": self.index,
            "path": self.path,
            "prompt": self.prompt,
            "negative_prompt": self.negative_prompt,
            "seed": self.seed,
            "options": self.options,
        }


def complete(folder: Path, wanted: Wanted, lines: dict[int, dict], digest: bool = True) -> bool:
    """The image at ``wanted.index`` is done: its newest line matches, and the file has that size and sha256
    (``digest=False``: that size; for the account of a stopped run, whose lines were just appended)."""
    line = lines.get(wanted.index)
    if line is None or {key: line[key] for key in IDENTITY} != wanted.identity():
        return False
    path = Path(folder) / line["path"]
    try:
        # a link is followed, as writes follow it (-o LINK writes through, as cp does): else it is never complete
        if not path.is_file() or path.stat().st_size != line["size"]:
            return False
        return not digest or sha256_file(path) == line["sha256"]
    except OSError:
        return False


def base_seed(folder: Path, lines: dict[int, dict], images: int) -> int | None:
    """The seed of image 0 in the run that wrote these lines (image i has seed + i), or None; one line naming the
    manifest if that is not a seed a run of ``images`` images could have (a hand-edited or foreign line)."""
    from pixart_cli.errors import PixartError
    from pixart_cli.settings import MAX_SEED

    if not lines:
        return None
    newest = lines[max(lines)]
    seed = newest["seed"]
    if type(seed) is not int or not 0 <= seed - newest["index"] <= MAX_SEED + 1 - images:
        raise PixartError(
            f"{manifest_path(folder)}: line of image {newest['index']} has seed {seed!r}, not one pixart wrote; "
            "give --seed, or start a new run without --resume"
        )
    return seed - newest["index"]
