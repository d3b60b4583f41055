"""Writing outputs: a temp file in the same folder moved into place with ``os.replace``; never replacing what is
not a regular file; ``--no-overwrite`` refused by the final step itself; ``-`` writes to stdout in one go."""

from __future__ import annotations

import math
import os
import stat
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError

PLAIN_TYPES = (str, int, float, bool, type(None))


STDOUT = "-"

# Every temp file pixart writes is named TEMP_PREFIX + (the process's tag + "-") + random + TEMP_SUFFIX. A Ray
# actor's files carry the run's tag, so that the run's driver can remove what a killed actor left half-written
# (remove_temps) and nothing else.
TEMP_PREFIX, TEMP_SUFFIX = ".pixart-", ".tmp"
_temp_tag = ""


def tag_temps(tag: str) -> None:
    """Name this process's temp files ``.pixart-TAG-*.tmp`` (``process.tag_temp_files``, at a worker's edge)."""
    global _temp_tag
    _temp_tag = tag


def remove_temps(folders, tag: str) -> int:
    """Remove the regular files named ``.pixart-TAG-*.tmp`` directly in ``folders`` (a killed writer's leftovers
    of the run tagged ``tag``); nothing else is touched. Returns how many were removed."""
    if not tag:
        return 0
    start, removed = f"{TEMP_PREFIX}{tag}-", 0
    for folder in set(folders):
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            if (
                entry.name.startswith(start)
                and entry.name.endswith(TEMP_SUFFIX)
                and entry.is_file(follow_symlinks=False)
            ):
                try:
                    os.unlink(entry.path)
                    removed += 1
                except OSError:
                    pass
    return removed


def is_stdout(path) -> bool:
    """``-o -``: the single output's bytes go to stdout (scripts pipe them) instead of a file."""
    return str(path) == STDOUT


def creation_problem(folder: Path, make_folder: bool = False) -> str | None:
    """Why a file (``make_folder``: a folder) cannot be made in the existing ``folder``, or None: found by making one
    (a hidden temp name) and removing it at once, which tells what ``os.access`` cannot (root in /proc or /sys, a
    file system that refuses new names). Nothing is left behind; a signal waits until it is removed."""
    from pixart_cli.signals import GUARD

    try:
        with GUARD.deferred():
            if make_folder:
                os.rmdir(tempfile.mkdtemp(prefix=".pixart-probe-", dir=folder))
            else:
                handle, name = tempfile.mkstemp(prefix=".pixart-probe-", dir=folder)
                os.close(handle)
                os.unlink(name)
    except OSError as error:
        return error.strerror or type(error).__name__
    return None


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
        prefix = f"{TEMP_PREFIX}{_temp_tag}-" if _temp_tag else TEMP_PREFIX
        handle, temp = tempfile.mkstemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent)
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
    if os.path.islink(path) and existing_kind(path) == "file":
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
    found = existing_kind(path)
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


FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISREG, "file"),
)


def existing_kind(path: Path) -> str | None:
    """None (nothing there), "file" (a regular file, or a link to one) or what else it is, in words."""
    try:
        mode = os.stat(path).st_mode  # follows links: a link to a device is a device
    except FileNotFoundError:
        return "a broken symbolic link" if os.path.islink(path) else None
    except OSError as error:
        return f"unreadable ({error.strerror})"
    for test, name in FILE_KINDS:
        if test(mode):
            return name
    return "not a regular file"


def write_stdout(data: bytes) -> None:
    """All of an output's bytes at once, made before the first byte goes out."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        raise PixartError("--output -: stdout was closed before the output was written", EXIT_RUNTIME) from None
    except OSError as error:  # a full disk behind `> file`, /dev/full: what went out is not the whole output
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        raise PixartError(
            f"--output -: cannot write the output to stdout ({error.strerror or type(error).__name__}), so what "
            "reached it is incomplete; give -o a file name instead",
            EXIT_RUNTIME,
        ) from None


def plain(meta: dict) -> dict:
    """Meta holds only plain values, so a weights_only load can always read it back."""

    def check(value):
        if isinstance(value, (list, tuple)):
            return [check(item) for item in value]
        if isinstance(value, dict):
            return {str(k): check(v) for k, v in value.items()}
        if isinstance(value, PLAIN_TYPES):
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
