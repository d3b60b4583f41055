"""``-`` as an input: standard input, read whole into memory once per process and bounded (a file on disk is
bounded by its size; a pipe by MAX_STDIN_BYTES), then checked as any file is (``untrusted``)."""

from __future__ import annotations

import io
import sys

from pixart_cli.errors import PixartError

# ``-`` names standard input: read whole into memory, at most this much (a file on disk is bounded by its size).
MAX_STDIN_BYTES = 4 * 2**30


STDIN = "-"


_STDIN_CHUNK = 1 << 20


def is_stdin(path) -> bool:
    """An input named ``-``: the bytes come from standard input (``pixart encode ... -o - | pixart denoise -``)."""
    return str(path) == STDIN


def check_one_stdin(*named: tuple[str, object]) -> None:
    """Standard input holds one file: refuse a command line that names ``-`` for two inputs (``compare - -``).
    ``named``: (argument or option, value given or None) pairs."""
    readers = [name for name, value in named if value is not None and is_stdin(value)]
    if len(readers) > 1:
        raise PixartError(
            f"{' and '.join(readers)}: both are -, but standard input holds one file; give one of them as a path"
        )


# (the stream read, its bytes): kept, as a stream can be read once; a new sys.stdin (a test's) is read anew
_read: tuple[object, bytes] | None = None


def read_stdin(option: str) -> bytes:
    """All of standard input, read once and kept (``info`` and ``compare`` look at a file twice): at most
    MAX_STDIN_BYTES, read in chunks so that nothing past the limit + 1 byte is ever held. A terminal is refused
    (it would wait for typing), as is a closed stdin."""
    global _read
    stream = sys.stdin
    if _read is not None and _read[0] is stream:
        return _read[1]
    if stream is None or getattr(stream, "closed", False):
        raise PixartError(f"{option} -: standard input is closed; pipe a file into it or give a path")
    if stream.isatty():
        raise PixartError(
            f"{option} -: standard input is a terminal; pipe a file into it "
            "(pixart encode PROMPT -o - | pixart denoise -) or give a path"
        )
    limit = MAX_STDIN_BYTES
    buffer, held = io.BytesIO(), 0
    source = getattr(stream, "buffer", stream)
    try:
        while held <= limit:
            chunk = source.read(min(_STDIN_CHUNK, limit + 1 - held))
            if not chunk:
                break
            buffer.write(chunk)
            held += len(chunk)
    except OSError as error:
        raise PixartError(
            f"{option} -: cannot read standard input ({error.strerror or type(error).__name__})"
        ) from None
    if held > limit:
        raise PixartError(
            f"{option} -: standard input holds more than {size_text(limit)}, the most pixart reads from a pipe; "
            "write it to a file and give its path"
        )
    _read = (stream, buffer.getvalue())
    return _read[1]


def size_text(count: int) -> str:
    """A byte count for people: 4 GiB, 12 MiB, 512 bytes."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"
