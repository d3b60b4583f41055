"""PROMPT arguments and --prompts-file lines (``-``: stdin)."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

from pixart_cli.errors import PixartError

# Read whole, up to this bound: 10,000 prompts (settings.MAX_IMAGES) of a few KB each fit many times over.
MAX_PROMPTS_FILE_BYTES = 64 * 2**20


def read_prompts(prompts: Optional[list[str]], prompts_file: Optional[str]) -> list[str]:
    """PROMPT arguments, then the lines of --prompts-file (``-``: stdin)."""
    from pixart_cli.settings import check_prompts

    collected = list(prompts or [])
    if prompts_file == "":
        raise PixartError("--prompts-file: the path is empty; give a file of prompts, one per line (- reads stdin)")
    if prompts_file == "-":
        from pixart_cli.scale.launch import Ranks

        world_size = Ranks.from_env().world_size
        if world_size > 1:
            raise PixartError(
                f"--prompts-file -: standard input reaches only one of the WORLD_SIZE={world_size} processes; "
                "save the prompts to a file and give its path"
            )
    if prompts_file is not None:
        text = _read_text(prompts_file)
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise PixartError(f"--prompts-file {prompts_file}: holds no prompts; write one prompt per line")
        collected += lines
    return check_prompts(collected)


def unquoted_note(prompts: Optional[list[str]]) -> Optional[str]:
    """The note for several PROMPT arguments of one word each (``pixart encode cute cat``: two prompts), or None."""
    if not prompts or len(prompts) < 2 or not all(len(prompt.split()) == 1 for prompt in prompts):
        return None
    joined = " ".join(prompts)
    shown = joined if len(joined) <= 60 else joined[:57] + "..."
    return (
        f"read {len(prompts)} prompts, one per PROMPT argument; a prompt with spaces needs quotes: "
        f'"{shown}" is one prompt'
    )


def _read_text(path: str) -> str:
    """The --prompts-file's text: a file, a pipe (``<(command)``) or ``-`` (stdin), at most MAX_PROMPTS_FILE_BYTES
    of UTF-8, read once (no buffer reserved beyond what is there)."""
    from pixart_cli.files.untrusted import read_at_most

    try:
        if path == "-":
            data = read_at_most(sys.stdin.buffer, MAX_PROMPTS_FILE_BYTES)
        else:
            with open(Path(path), "rb") as handle:
                data = read_at_most(handle, MAX_PROMPTS_FILE_BYTES, os.fstat(handle.fileno()).st_size)
    except IsADirectoryError:
        raise PixartError(f"--prompts-file {path}: is a folder; give a text file of prompts, one per line") from None
    except FileNotFoundError:
        raise PixartError(f"--prompts-file {path}: no such file; give a text file of prompts, one per line") from None
    except OSError as error:
        raise PixartError(f"--prompts-file {path}: cannot read it ({error.strerror or type(error).__name__})") from None
    if len(data) > MAX_PROMPTS_FILE_BYTES:
        raise PixartError(
            f"--prompts-file {path}: holds more than the {MAX_PROMPTS_FILE_BYTES // 2**20} MiB pixart reads as "
            "prompts; split it into several runs"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise PixartError(
            f"--prompts-file {path}: is not UTF-8 text (an image or a binary file?); give a text file of prompts, "
            "one per line"
        ) from None
