"""Options shared by the commands, defined once. ``None`` means "not given": the stage picks the default.

Help text is built from the constants and the family table, so a default is written in one place only.
No torch here: ``pixart --help`` must stay instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pixart_cli.models.memory import AUTO_MARGIN, GIB
from pixart_cli.models.source import BASE_MODEL_ENV, DEFAULT_MODEL, FAMILIES, MODEL_ENV
from pixart_cli.settings import MAX_GUIDANCE, MAX_IMAGES, MAX_SEED, MAX_STEPS, PRECISIONS, SCHEDULERS


def _by_family(attribute: str) -> str:
    """'20 for alpha, sigma; 4 for lcm; 1 for dmd': one family default, from the family table."""
    values: dict = {}
    for family in FAMILIES.values():
        values.setdefault(getattr(family, attribute), []).append(family.name)
    return "; ".join(f"{value:g} for {', '.join(names)}" for value, names in values.items())


MODEL_HELP = (
    f"Hugging Face id or local diffusers folder [env: {MODEL_ENV}; default: {DEFAULT_MODEL}]. "
    "A hub model is downloaded once on first use (about 20 GB for PixArt-XL-2-1024-MS). A model without "
    f"its own T5, tokenizer or VAE (PixArt-DMD) takes them from ${BASE_MODEL_ENV} [default: "
    f"{DEFAULT_MODEL}]."
)

Prompts = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="PROMPT",
        help="Text prompt(s), each quoted; - reads prompts from stdin, one per line (as --prompts-file -).",
        show_default=False,
    ),
]
PromptsFile = Annotated[
    Optional[str],
    typer.Option(
        "--prompts-file",
        metavar="FILE",
        help="Read prompts from FILE, one per line (blank lines skipped); - reads stdin.",
        show_default=False,
    ),
]
NoOverwrite = Annotated[bool, typer.Option("--no-overwrite", help="Refuse to replace an existing output file.")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", metavar="ID|DIR", help=MODEL_HELP, show_default=False)]
ModelFromFile = Annotated[
    Optional[str],
    typer.Option(
        "--model",
        "-m",
        metavar="ID|DIR",
        help="Model folder or Hugging Face id [default: the one recorded in the input file].",
        show_default=False,
    ),
]
Revision = Annotated[
    Optional[str],
    typer.Option(
        "--revision",
        metavar="REV",
        help="Branch, tag or commit of a Hugging Face model [default: main, or the one recorded in the input file].",
        show_default=False,
    ),
]
Device = Annotated[
    str, typer.Option(metavar="DEVICE", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")
]
Dtype = Annotated[str, typer.Option(metavar="DTYPE", help="auto (fp16 on CUDA/MPS, fp32 on CPU), fp32, fp16 or bf16.")]
NegativePrompt = Annotated[
    str, typer.Option("--negative-prompt", "-n", metavar="TEXT", help="What to steer away from.")
]
MaxSequenceLength = Annotated[
    Optional[int],
    typer.Option(
        metavar="N",
        help=f"Tokens per prompt, padded [default: the model family's: {_by_family('max_sequence_length')}].",
        show_default=False,
    ),
]
CleanCaption = Annotated[
    bool,
    typer.Option("--clean-caption/--no-clean-caption", help="Clean prompts as the diffusers pipeline does by default."),
]
Steps = Annotated[
    Optional[int],
    typer.Option(
        metavar="N",
        help=f"Denoising steps, 1 to {MAX_STEPS} [default: the model family's: {_by_family('steps')}].",
        show_default=False,
    ),
]
GuidanceScale = Annotated[
    Optional[float],
    typer.Option(
        "--guidance-scale",
        "-g",
        metavar="SCALE",
        help=f"Classifier-free guidance, 0 to {MAX_GUIDANCE:g}; ≤1 turns it off [default: the model family's: "
        f"{_by_family('guidance_scale')}].",
        show_default=False,
    ),
]
Seed = Annotated[
    Optional[int],
    typer.Option(
        metavar="N",
        help=f"Seed of the first image (image-0), 0 to {MAX_SEED}; image i gets seed+i [default: random, shown on "
        "stderr and recorded].",
        show_default=False,
    ),
]
Width = Annotated[
    Optional[int],
    typer.Option(metavar="PX", help="Image width in pixels [default: the model's native size].", show_default=False),
]
Height = Annotated[
    Optional[int],
    typer.Option(metavar="PX", help="Image height in pixels [default: the model's native size].", show_default=False),
]
NoBinning = Annotated[
    bool,
    typer.Option(
        "--no-binning", help="Denoise at exactly --width x --height instead of the nearest trained aspect-ratio bin."
    ),
]
NumImages = Annotated[
    int, typer.Option("--num-images", metavar="N", help=f"Images per prompt (at most {MAX_IMAGES} in one run).")
]
# File arguments stay text (not Path): Path("") is ".", and an empty argument must be reported as empty.
EmbeddingsFile = Annotated[
    str,
    typer.Argument(
        metavar="EMBEDDINGS", help="Embeddings file written by `pixart encode`; - reads stdin.", show_default=False
    ),
]
LatentsFile = Annotated[
    str,
    typer.Argument(
        metavar="LATENTS", help="Latents file written by `pixart denoise`; - reads stdin.", show_default=False
    ),
]
InfoFile = Annotated[
    str,
    typer.Argument(
        metavar="FILE",
        help="A .pt file (embeddings or latents) or an image pixart wrote; - reads stdin.",
        show_default=False,
    ),
]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only the written paths (or errors).")]
Json = Annotated[
    bool,
    typer.Option(
        "--json", help='One JSON document on stdout instead of the paths (errors too: {"error": ..., "exit_code": N}).'
    ),
]
InfoJson = Annotated[bool, typer.Option("--json", help="Print the description as one JSON document.")]


def output_option(what: str, name: str):
    return Annotated[
        str,
        typer.Option(
            "--output",
            "-o",
            metavar="PATH",
            help=(
                f"Where to write the {what}. A folder (or a path ending in /, created if missing) gets {name} inside it; "
                "- writes the bytes to stdout."
            ),
        ),
    ]


EmbeddingsOutput = output_option("embeddings", "embeddings.pt")
LatentsOutput = output_option("latents", "latents.pt")
ImageOutput = output_option(
    "image; several images become out-0.png, out-1.png, ... (.jpg and .webp work too)", "image.png (image-0.png, ...)"
)
Vram = Annotated[
    Optional[str],
    typer.Option(
        metavar="SIZE",
        help=f"Device memory budget, e.g. 8GB or 3GB (GiB) [default: auto = free memory less "
        f"{AUTO_MARGIN / GIB:g} GB]. Each stage picks the fastest plan under it and names it on "
        "stderr. Ignored on CPU.",
        show_default=False,
    ),
]
TextEncoderPrecision = Annotated[
    str,
    typer.Option(
        "--text-encoder-precision",
        metavar="|".join(PRECISIONS),
        help="bitsandbytes 8bit/4bit (CUDA only) change the embeddings, so images differ from full precision, and "
        "still need ~8.3 / ~6.7 GB for T5-XXL (its wo layers stay fp32); full precision streams T5 in ~1.5 GB "
        "under small budgets instead.",
    ),
]
ReportMemory = Annotated[
    bool,
    typer.Option(
        "--report-memory",
        help="After each stage: peak device memory (allocated, reserved, CUDA context), peak RSS, "
        "load and compute seconds. With --json, in the JSON document.",
    ),
]
Scheduler = Annotated[
    Optional[str],
    typer.Option(
        metavar="NAME",
        help=f"{', '.join(SCHEDULERS)}: that diffusers scheduler built from the model's scheduler "
        "config [default: the model's own].",
        show_default=False,
    ),
]
DenoiseBatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        metavar="N",
        help="Images per transformer call [default: as many as the memory plan allows].",
        show_default=False,
    ),
]
DecodeBatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        metavar="N",
        help="Images per VAE call [default: 1; decode activations dominate memory].",
        show_default=False,
    ),
]
GenerateBatchSize = Annotated[
    Optional[int],
    typer.Option(
        "--batch-size",
        metavar="N",
        help="Images per transformer and per VAE call [default: as many as the memory "
        "plan allows for denoise, 1 for decode].",
        show_default=False,
    ),
]
Compile = Annotated[
    bool,
    typer.Option(
        "--compile",
        help="torch.compile the transformer: slower first run (compiling), faster steps after; kernels "
        "are cached for later runs. Not bit-identical to the default.",
    ),
]
StepCache = Annotated[
    Optional[str],
    typer.Option(
        "--step-cache",
        metavar="METHOD:VALUE",
        help="Skip part of the transformer's work on some steps (approximate, opt-in): fbc:THRESHOLD (First "
        "Block Cache, e.g. fbc:0.1; how much it skips depends on the model) or taylorseer:INTERVAL (TaylorSeer, "
        "e.g. taylorseer:2: a full step every INTERVAL steps after the first 3, forecast in between). "
        "Changes the image; recorded in its metadata.",
        show_default=False,
    ),
]
Lora = Annotated[
    Optional[list[str]],
    typer.Option(
        "--lora",
        metavar="FILE[:SCALE]",
        help="Apply a LoRA to the transformer: FILE.safetensors or FILE:SCALE (default scale 1.0); repeat for "
        "several. diffusers/PEFT (lora_A/lora_B) and kohya/OneTrainer (lora_down/lora_up) files; fused into the "
        "weights at load, recorded in the outputs.",
        show_default=False,
    ),
]
CompareA = Annotated[
    str,
    typer.Argument(
        metavar="A",
        help="The first file: an embeddings or latents .pt file, or an image (.png, .jpg, .webp); - reads stdin.",
        show_default=False,
    ),
]
CompareB = Annotated[
    str,
    typer.Argument(
        metavar="B",
        help="The second file, of the same kind as A (the run to check against A); - reads stdin.",
        show_default=False,
    ),
]
CompareJson = Annotated[
    bool,
    typer.Option(
        "--json", help='Print the comparison as one JSON document (errors too: {"error": ..., "exit_code": N}).'
    ),
]
Cache = Annotated[
    Optional[str],
    typer.Option(
        "--cache",
        envvar="PIXART_CACHE",
        metavar="DIR",
        help="Embedding cache folder: encode skips T5 for a model + "
        "prompt + settings it has already encoded [default: off].",
        show_default=False,
    ),
]
