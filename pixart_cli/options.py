"""Options shared by the commands, defined once. ``None`` means "not given": the stage picks the default.

No torch here: ``pixart --help`` must stay instant.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from pixart_cli.models import BASE_MODEL_ENV, DEFAULT_MODEL, MODEL_ENV

MODEL_HELP = (f"Hugging Face id or local diffusers folder [env: {MODEL_ENV}; default: {DEFAULT_MODEL}]. "
              "A hub model is downloaded once on first use (about 20 GB for PixArt-XL-2-1024-MS). A model without "
              f"its own T5, tokenizer or VAE (PixArt-DMD) takes them from ${BASE_MODEL_ENV} [default: "
              f"{DEFAULT_MODEL}].")

Prompts = Annotated[Optional[list[str]], typer.Argument(help="Text prompt(s); each gives one embedding.",
                                                       show_default=False)]
PromptsFile = Annotated[Optional[str], typer.Option(
    "--prompts-file", help="Read prompts from FILE, one per line (blank lines skipped); - reads stdin.",
    show_default=False)]
NoOverwrite = Annotated[bool, typer.Option("--no-overwrite", help="Refuse to replace an existing output file.")]
Model = Annotated[Optional[str], typer.Option("--model", "-m", help=MODEL_HELP, show_default=False)]
ModelFromFile = Annotated[Optional[str], typer.Option(
    "--model", "-m", help="Model folder or id [default: the one recorded in the input file].", show_default=False)]
Device = Annotated[str, typer.Option(help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps.")]
Dtype = Annotated[str, typer.Option(help="auto (fp16 on CUDA/MPS, fp32 on CPU), fp32, fp16 or bf16.")]
NegativePrompt = Annotated[str, typer.Option("--negative-prompt", "-n", help="What to steer away from.")]
MaxSequenceLength = Annotated[Optional[int], typer.Option(
    help="Tokens per prompt, padded [default: the model's, 120 for PixArt-α, 300 for Σ].", show_default=False)]
CleanCaption = Annotated[bool, typer.Option(
    "--clean-caption/--no-clean-caption", help="Clean prompts as the diffusers pipeline does by default.")]
Steps = Annotated[Optional[int], typer.Option(help="Denoising steps [default: the model's, 20].",
                                              show_default=False)]
GuidanceScale = Annotated[Optional[float], typer.Option(
    "--guidance-scale", "-g", help="Classifier-free guidance; ≤1 turns it off [default: the model's, 4.5].",
    show_default=False)]
Seed = Annotated[Optional[int], typer.Option(help="Seed of image 1; image i gets seed+i [default: random, shown "
                                                  "on stderr and recorded].", show_default=False)]
Width = Annotated[Optional[int], typer.Option(help="Image width in pixels [default: the model's native size].",
                                              show_default=False)]
Height = Annotated[Optional[int], typer.Option(help="Image height in pixels [default: the model's native size].",
                                               show_default=False)]
NoBinning = Annotated[bool, typer.Option("--no-binning", help="Denoise at exactly --width x --height instead of "
                                                              "the nearest trained aspect-ratio bin.")]
NumImages = Annotated[int, typer.Option("--num-images", help="Images per prompt.")]
# File arguments stay text (not Path): Path("") is ".", and an empty argument must be reported as empty.
EmbeddingsFile = Annotated[str, typer.Argument(metavar="EMBEDDINGS", help="Embeddings file written by `pixart encode`.",
                                              show_default=False)]
LatentsFile = Annotated[str, typer.Argument(metavar="LATENTS", help="Latents file written by `pixart denoise`.",
                                           show_default=False)]
InfoFile = Annotated[str, typer.Argument(metavar="FILE", help="A .pt file (embeddings or latents) or an image pixart "
                                                              "wrote.", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="Only the written paths (or errors).")]
Json = Annotated[bool, typer.Option("--json", help="One JSON document on stdout instead of paths.")]


def _output(what: str, name: str):
    return Annotated[str, typer.Option("--output", "-o", metavar="PATH", help=(
        f"Where to write the {what}. A folder (or a path ending in /, created if missing) gets {name} inside it; "
        "- writes the bytes to stdout."))]


EmbeddingsOutput = _output("embeddings", "embeddings.pt")
LatentsOutput = _output("latents", "latents.pt")
ImageOutput = _output("image; several images become out-0.png, out-1.png, ...", "image.png (image-0.png, ...)")
Vram = Annotated[Optional[str], typer.Option(
    help="Device memory budget, e.g. 8GB or 3GB (GiB) [default: auto = free memory less 0.5 GB]. Each stage "
         "picks the fastest plan under it and names it on stderr. Ignored on CPU.", show_default=False)]
TextEncoderPrecision = Annotated[str, typer.Option(
    "--text-encoder-precision",
    help="full, 8bit or 4bit (bitsandbytes, CUDA only). 8bit/4bit change the embeddings, so images differ from "
         "full precision, and still need ~8.3 / ~6.7 GB for T5-XXL (its wo layers stay fp32); full precision "
         "streams T5 in ~1.5 GB under small budgets instead.")]
ReportMemory = Annotated[bool, typer.Option(
    "--report-memory", help="After each stage: peak device memory (allocated, reserved, CUDA context), peak RSS, "
                            "load and compute seconds. With --json, in the JSON document.")]
Scheduler = Annotated[Optional[str], typer.Option(
    help="dpm++, sa-solver, ddim, euler, euler-a, lcm or ddpm, built from the model's scheduler config "
         "[default: the model's own].", show_default=False)]
BatchSize = Annotated[Optional[int], typer.Option(
    "--batch-size", help="Images per transformer / VAE call [default: as many as the memory plan allows for "
                         "denoise, 1 for decode].", show_default=False)]
Cache = Annotated[Optional[str], typer.Option(
    "--cache", envvar="PIXART_CACHE", help="Embedding cache folder: encode skips T5 for a model + prompt + settings "
                                          "it has already encoded [env: PIXART_CACHE; default: off].",
    show_default=False)]
