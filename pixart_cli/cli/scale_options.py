"""The options of scale-out runs (generate with -o DIR/): --resume, --devices, --ray, --ray-address."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="With -o DIR/: skip images that DIR/manifest.jsonl lists and whose file is complete (size and "
        "sha256); make the missing or damaged ones. Without --seed, the seed recorded there is used.",
    ),
]


Devices = Annotated[
    Optional[str],
    typer.Option(
        "--devices",
        metavar="DEVICES",
        help="Spread the images over several devices of this machine from one process: all (every visible GPU), "
        "0,1 or cuda:0,cuda:1. T5 runs once; each device runs denoise and decode on its share "
        "[env: PIXART_DEVICES].",
        show_default=False,
    ),
]


Ray = Annotated[
    bool,
    typer.Option(
        "--ray",
        help="Spread the images over one Ray actor per GPU, each running the three stages (pip install "
        '"pixart-cli[ray]"): a local Ray, or the cluster at --ray-address / RAY_ADDRESS.',
    ),
]


RayAddress = Annotated[
    Optional[str],
    typer.Option(
        "--ray-address",
        metavar="ADDRESS",
        help="Ray cluster to join with --ray, e.g. ray://head:10001 or auto [env: RAY_ADDRESS; "
        "default: a local Ray on this machine].",
        show_default=False,
    ),
]
