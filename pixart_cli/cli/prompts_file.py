"""PROMPT arguments and --prompts-file lines (``-``: stdin)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

from pixart_cli.errors import (
    PixartError,
)


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
            text = sys.stdin.read() if prompts_file == "-" else Path(prompts_file).read_text(encoding="utf-8")
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
