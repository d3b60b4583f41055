"""Where outputs go: one policy for every command (a file, a folder of numbered files, or ``-`` for stdout)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.files.atomic import STDOUT, creation_problem, existing_kind, is_stdout, written_path
from pixart_cli.files.image_io import image_format
from pixart_cli.files.stdin import is_stdin
from pixart_cli.files.untrusted import empty_path_error, short


def names_folder(output) -> bool:
    """Whether ``-o`` names a folder: a path ending in ``/`` (created when written) or an existing folder."""
    text = str(output)
    return text.endswith(("/", os.sep)) or os.path.isdir(text)


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
        raise empty_path_error(option)
    if len(f"_{text}_".splitlines()) > 1:  # \n, \r and the other breaks str.splitlines knows
        raise PixartError(
            f"{option} {short(text)}: the path holds a line break, but each written path is one line of "
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
    probed: dict = {}  # (folder, whether folders are made in it) -> why nothing can be made there, or None
    for path in paths:
        _check_target(path, option, inputs, overwrite, create_folder=folder_given, probed=probed)
    if not images and not folder_given and paths[0].suffix.lower() != PT_SUFFIX:
        raise PixartError(
            f"{option} {text}: {'an' if kind[0] in 'aeiou' else 'a'} {kind} file is a torch .pt file; "
            f"name it {paths[0].with_suffix(PT_SUFFIX)}"
        )
    return paths


def _check_target(
    path: Path, option: str, inputs: tuple, overwrite: bool, create_folder: bool, probed: dict | None = None
) -> None:
    found = existing_kind(path)
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
        raise PixartError(f"{option} {path}: {existing} is not a folder; give -o a path in a folder")
    writable = "give -o a path in a folder you can write"
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PixartError(f"{option} {path}: folder {existing} is not writable; {writable}")
    # what access() cannot tell (root in /proc, a file system that takes no new names): a file, or the folder to
    # create, made there and removed at once, before any work
    probed = {} if probed is None else probed
    key = (existing, existing != folder)
    if key not in probed:
        probed[key] = creation_problem(existing, make_folder=existing != folder)
    if probed[key] is not None:
        made = f"cannot create folder {folder}" if existing != folder else f"cannot create files in {existing}"
        raise PixartError(f"{option} {path}: {made} ({probed[key]}); {writable}")
    destination = written_path(path)
    if destination != path and (
        not os.access(destination.parent, os.W_OK) or creation_problem(destination.parent) is not None
    ):
        raise PixartError(f"{option} {path}: links to {destination}, whose folder is not writable; give another path")
    try:
        name_max = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    for part in path.relative_to(existing).parts if existing != folder else (path.name,):
        if len(os.fsencode(part)) > name_max:
            raise PixartError(
                f"{option} {short(str(path))}: the name {short(part, 40)} is longer than this file "
                f"system allows ({name_max} bytes); choose a shorter name"
            )
    for source in inputs:
        if found is not None and not is_stdin(source) and os.path.exists(source) and os.path.samefile(source, path):
            raise PixartError(f"{option} {path}: is also the input file; choose another output path")
