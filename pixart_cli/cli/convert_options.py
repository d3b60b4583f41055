"""The options of `pixart convert`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pixart_cli.models.convert import CONVERTIBLE
from pixart_cli.models.convert import DTYPE_WORDS as CONVERT_DTYPES

ConvertModel = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="The model to copy: a local diffusers folder or a Hugging Face id (downloaded once, as by every stage).",
        show_default=False,
    ),
]
ConvertOutput = Annotated[
    str,
    typer.Option(
        "--output",
        "-o",
        metavar="DIR",
        help="The folder to write: a new path, written beside it under a temp name and renamed into place when "
        "complete (nothing is left if it fails).",
        show_default=False,
    ),
]
ConvertDtype = Annotated[
    str,
    typer.Option(
        "--dtype",
        metavar="|".join(CONVERT_DTYPES),
        help="The copy's dtype. What transformers keeps in fp32 when it loads fp16 (T5's wo layers) stays fp32, so "
        "the copy holds exactly the weights loading the original with this --dtype gives.",
    ),
]
Components = Annotated[
    Optional[str],
    typer.Option(
        "--components",
        metavar="NAMES",
        help=f"The components to convert, separated by commas: {', '.join(CONVERTIBLE)} [default: all of them "
        "the model has]. The others are copied as they are.",
        show_default=False,
    ),
]
OverwriteFolder = Annotated[
    bool,
    typer.Option(
        "--overwrite/--no-overwrite",
        help="Replace an existing DIR (a model folder), once the new copy is complete; without it an existing DIR "
        "is refused.",
    ),
]
