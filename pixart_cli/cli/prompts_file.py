"""PROMPT arguments and --prompts-file lines (``-``: stdin)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Optional

from pixart_cli.errors import PixartError
from pixart_cli.files.stdin import STDIN

# Read whole, up to this bound: 10,000 prompts (settings.MAX_IMAGES) of a few KB each fit many times over.
MAX_PROMPTS_FILE_BYTES = 64 * 2**20


def read_prompts(
    prompts: Optional[list[str]], prompts_file: Optional[str], note: Optional[Callable[[str], None]] = None
) -> list[str]:
    """PROMPT arguments, then the lines of --prompts-file. ``-`` reads standard input in either place, as
    ``--prompts-file -`` reads it: one prompt per line (blank lines skipped), within the same bounds; a PROMPT
    ``-`` is replaced by those prompts where it stands (``note`` is told how many it read). A literal prompt "-"
    is a line of a prompts file."""
    from pixart_cli.settings import check_prompts

    given = list(prompts or [])
    if prompts_file == "":
        raise PixartError("--prompts-file: the path is empty; give a file of prompts, one per line (- reads stdin)")
    readers = ["PROMPT -"] * given.count(STDIN) + (["--prompts-file -"] if prompts_file == STDIN else [])
    if len(readers) > 1:
        raise PixartError(
            f"{' and '.join(dict.fromkeys(readers))}: standard input is read once, as one list of prompts (one per "
            "line); give - once, or the other prompts as arguments or in a file"
        )
    if readers:
        from pixart_cli.scale.launch import Ranks

        world_size = Ranks.from_env().world_size
        if world_size > 1:
            raise PixartError(
                f"{readers[0]}: standard input reaches only one of the WORLD_SIZE={world_size} processes; "
                "save the prompts to a file and give its path"
            )
    collected = []
    for prompt in given:
        if prompt != STDIN:
            collected.append(prompt)
            continue
        lines = _lines(STDIN, "PROMPT -", "pipe the prompts in, one per line")
        if note is not None and len(lines) > 1:
            note(f"PROMPT -: read {len(lines)} prompts from standard input, one per line")
        collected += lines
    if prompts_file is not None:
        collected += _lines(prompts_file, f"--prompts-file {prompts_file}", "write one prompt per line")
    return check_prompts(collected)


def _lines(path: str, shown: str, fix: str) -> list[str]:
    """The prompts of a prompts file or of standard input: its lines, stripped, blank ones skipped."""
    lines = [line.strip() for line in _read_text(path, shown).splitlines() if line.strip()]
    if not lines:
        raise PixartError(f"{shown}: holds no prompts; {fix}")
    return lines


def unquoted_note(prompts: Optional[list[str]]) -> Optional[str]:
    """The note for several PROMPT arguments of one word each (``pixart encode cute cat``: two prompts), or None."""
    prompts = [prompt for prompt in prompts or () if prompt != STDIN]  # standard input's prompts: a note of their own
    if len(prompts) < 2 or not all(len(prompt.split()) == 1 for prompt in prompts):
        return None
    joined = " ".join(prompts)
    shown = joined if len(joined) <= 60 else joined[:57] + "..."
    return (
        f"read {len(prompts)} prompts, one per PROMPT argument; a prompt with spaces needs quotes: "
        f'"{shown}" is one prompt'
    )


def _read_text(path: str, shown: str) -> str:
    """The --prompts-file's text: a file, a pipe (``<(command)``) or ``-`` (stdin), at most MAX_PROMPTS_FILE_BYTES
    of UTF-8, read once (no buffer reserved beyond what is there)."""
    from pixart_cli.files.untrusted import read_at_most

    try:
        if path == STDIN:
            data = read_at_most(sys.stdin.buffer, MAX_PROMPTS_FILE_BYTES)
        else:
            with open(Path(path), "rb") as handle:
                data = read_at_most(handle, MAX_PROMPTS_FILE_BYTES, os.fstat(handle.fileno()).st_size)
    except IsADirectoryError:
        raise PixartError(f"{shown}: is a folder; give a text file of prompts, one per line") from None
    except FileNotFoundError:
        raise PixartError(f"{shown}: no such file; give a text file of prompts, one per line") from None
    except OSError as error:
        raise PixartError(f"{shown}: cannot read it ({error.strerror or type(error).__name__})") from None
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise PixartError(
            f"{shown}: holds more than the {MAX_PROMPTS_FILE_BYTES // 2**20} MiB pixart reads as "
            "prompts; split it into several runs"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PixartError(
            f"{shown}: is not UTF-8 text (an image or a binary file?); give a text file of prompts, one per line"
        ) from None
