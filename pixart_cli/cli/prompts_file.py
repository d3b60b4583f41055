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
        try:
            from pixart_cli.files.untrusted import read_at_most

            if prompts_file == "-":
                data = read_at_most(sys.stdin.buffer, MAX_PROMPTS_FILE_BYTES)
            else:  # a file, or a pipe (<(command)): read up to the bound (a device's endless stream too)
                with open(Path(prompts_file), "rb") as handle:
                    data = read_at_most(handle, MAX_PROMPTS_FILE_BYTES, os.fstat(handle.fileno()).st_size)
            if len(data) > MAX_PROMPTS_FILE_BYTES:
                raise PixartError(
                    f"--prompts-file {prompts_file}: holds more than the {MAX_PROMPTS_FILE_BYTES // 2**20} MiB pixart "
                    "reads as prompts; split it into several runs"
                )
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise PixartError(
                f"--prompts-file {prompts_file}: cannot read it ({error.__class__.__name__}: "
                f"{getattr(error, 'strerror', None) or error})"
            ) from None
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines:
            raise PixartError(f"--prompts-file {prompts_file}: holds no prompts; write one prompt per line")
        collected += lines
    return check_prompts(collected)
