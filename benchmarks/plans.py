"""bench.py's cases for issue 19: every memory plan's load time under a capped allocator, --lora, --compile's cache,
the small plans' parity on the GPU, and where the small plans' import time goes.

Cases (run through bench.py, which passes its ``run``):
- ``plans``: generate at --vram 8/6/4/3/2GB (1024²) and 8GB at 2048² (--no-binning), each process capped at its
  budget (``--capped``); the table gives each stage's plan and load seconds.
- ``lora-8GB``: generate --vram 8GB with a rank-32 LoRA on 280 layers (every block's attention and MLP), beside
  ``generate-8GB``.
- ``compile-32``: 32 prompts with --compile, twice, with a fresh compile cache folder: the first process compiles,
  the second loads what the first compiled.
- ``gpu-parity``: latents of the streamed plan (2GB) against the resident plan (8GB), and the tiled decode (3GB)
  against diffusers' AutoencoderKL tiled decode of the same latents (512 px tiles).
- ``importtime-small``: ``python -X importtime`` of the tiled decode (3GB) and the streamed denoise (2GB): seconds
  of the heavy modules that issue 19 suspected.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

PLAN_BUDGETS = [("8GB", 1024), ("6GB", 1024), ("4GB", 1024), ("3GB", 1024), ("2GB", 1024), ("8GB", 2048)]
SUSPECTS = (
    "torch._dynamo",
    "sympy",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.hooks.group_offloading",
    "diffusers.loaders",
    "transformers.modeling_utils",
)
LORA_TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


def plans(bench, model: Path, out: Path, log: list, prompt: str) -> None:
    """PIXART_BENCH_PLANS="4GB:1024,2GB:1024" runs a subset."""
    import os

    work = out / "plans"
    work.mkdir(parents=True, exist_ok=True)
    chosen = os.environ.get("PIXART_BENCH_PLANS")
    budgets = [(b, int(s)) for b, s in (item.split(":") for item in chosen.split(","))] if chosen else PLAN_BUDGETS
    for budget, side in budgets:
        size = [] if side == 1024 else ["--width", str(side), "--height", str(side), "--no-binning"]
        bench.run(
            f"plans: generate {budget} {side}²",
            bench.pixart(
                "generate",
                prompt,
                "-o",
                f"gen-{budget}-{side}.png",
                "--seed",
                "0",
                *size,
                *bench.measured(model, budget),
            ),
            work,
            log,
        )


def write_lora(model: Path, path: Path, rank: int = 32) -> int:
    """A rank-``rank`` LoRA (fp16, diffusers naming) on every block's attention and MLP layers; returns the layer
    count."""
    import torch
    from safetensors.torch import save_file

    from pixart_cli.models.source import Model
    from pixart_cli.models.transformer import skeleton

    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, layer in skeleton(Model(str(model)).config("transformer"), torch.float16).named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith("transformer_blocks") and name.endswith(LORA_TARGETS):
            tensors[f"transformer.{name}.lora_A.weight"] = (
                torch.randn(rank, layer.in_features, generator=generator) * 0.01
            ).half()
            tensors[f"transformer.{name}.lora_B.weight"] = (
                torch.randn(layer.out_features, rank, generator=generator) * 0.01
            ).half()
    save_file(tensors, str(path))
    return len(tensors) // 2


def lora(bench, model: Path, out: Path, log: list, prompt: str) -> None:
    path = out / "lora-r32.safetensors"
    layers = write_lora(model, path)
    bench.run(
        f"pixart generate 8GB --lora (rank 32, {layers} layers)",
        bench.pixart(
            "generate", prompt, "-o", "gen-lora.png", "--seed", "0", "--lora", str(path), *bench.measured(model, "8GB")
        ),
        out,
        log,
    )


def compile_32(bench, model: Path, out: Path, log: list, prompts_file: Path) -> None:
    cache = out / "compile-cache"
    for round_name in ("cold cache", "warm cache"):
        bench.run(
            f"pixart generate 32 prompts 8GB --compile ({round_name})",
            bench.pixart(
                "generate",
                "--prompts-file",
                str(prompts_file),
                "-o",
                str(out / "pixart-32-compiled") + "/",
                "--seed",
                "0",
                "--compile",
                *bench.measured(model, "8GB"),
            ),
            out,
            log,
            env={"TORCHINDUCTOR_CACHE_DIR": str(cache)},
        )


TILED_REFERENCE = r"""
import sys, torch
from diffusers import AutoencoderKL
from diffusers.image_processor import PixArtImageProcessor
model, latents_path, png = sys.argv[1:4]
latents = torch.load(latents_path, map_location="cpu", weights_only=True)["latents"]
vae = AutoencoderKL.from_pretrained(model, subfolder="vae", torch_dtype=torch.float16).to("cuda").eval()
vae.enable_tiling()
vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
with torch.no_grad():
    image = vae.decode(latents.to("cuda", torch.float16) / vae.config.scaling_factor, return_dict=False)[0]
PixArtImageProcessor(vae_scale_factor=8).postprocess(image.float(), output_type="pil")[0].save(png)
"""


def gpu_parity(bench, model: Path, out: Path, log: list, prompt: str) -> dict:
    import numpy as np
    import torch
    from PIL import Image

    work = out / "parity"
    work.mkdir(parents=True, exist_ok=True)
    bench.run(
        "parity: encode 8GB", bench.pixart("encode", prompt, "-o", "emb.pt", *bench.measured(model, "8GB")), work, log
    )
    for budget in ("8GB", "2GB"):
        bench.run(
            f"parity: denoise {budget}",
            bench.pixart("denoise", "emb.pt", "-o", f"lat-{budget}.pt", "--seed", "0", *bench.measured(model, budget)),
            work,
            log,
        )
    bench.run(
        "parity: decode 3GB",
        bench.pixart("decode", "lat-8GB.pt", "-o", "tiled.png", *bench.measured(model, "3GB")),
        work,
        log,
    )
    subprocess.run(
        [sys.executable, "-c", TILED_REFERENCE, str(model), "lat-8GB.pt", "reference.png"], cwd=work, check=True
    )
    resident, streamed = (torch.load(work / f"lat-{b}.pt", weights_only=True)["latents"] for b in ("8GB", "2GB"))
    ours = np.asarray(Image.open(work / "tiled.png").convert("RGB")).astype(np.int16)
    theirs = np.asarray(Image.open(work / "reference.png").convert("RGB")).astype(np.int16)
    found = {
        "streamed_2GB_vs_resident_8GB_latents_equal": bool(torch.equal(resident, streamed)),
        "streamed_vs_resident_max_abs": float((resident.float() - streamed.float()).abs().max()),
        "tiled_512_vs_diffusers_tiled_max_pixel_diff": int(np.abs(ours - theirs).max()),
        "tiled_512_vs_diffusers_tiled_mean_pixel_diff": round(float(np.abs(ours - theirs).mean()), 4),
    }
    (work / "parity.json").write_text(json.dumps(found, indent=1))
    print(json.dumps(found), flush=True)
    return found


def importtime_small(bench, model: Path, out: Path, prompt: str) -> dict:
    """Cumulative import seconds of the suspects in the tiled decode and the streamed denoise processes."""
    work = out / "importtime"
    work.mkdir(parents=True, exist_ok=True)
    found = {}
    common = ["--model", str(model), "--quiet"]
    subprocess.run(bench.pixart("encode", prompt, "-o", "emb.pt", *common), cwd=work, check=True)
    subprocess.run(bench.pixart("denoise", "emb.pt", "-o", "lat.pt", "--steps", "2", *common), cwd=work, check=True)
    for label, args in (
        ("decode 3GB (tiled)", ["decode", "lat.pt", "-o", "x.png", "--vram", "3GB"]),
        ("denoise 2GB (streamed)", ["denoise", "emb.pt", "-o", "lat2.pt", "--steps", "2", "--vram", "2GB"]),
    ):
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "pixart_cli", *args, *common],
            cwd=work,
            capture_output=True,
            text=True,
        )
        cumulative = {}
        for line in proc.stderr.splitlines():
            if line.startswith("import time:") and "[us]" not in line:
                _, total, name = line[len("import time:") :].split("|")
                if name.strip() in SUSPECTS:
                    cumulative[name.strip()] = round(int(total) / 1e6, 2)
        found[label] = {"rc": proc.returncode, "cumulative_import_s": cumulative}
    (work / "importtime.json").write_text(json.dumps(found, indent=1))
    print(json.dumps(found), flush=True)
    return found


def load_table(runs: list) -> str:
    """Markdown: each pixart process's stages, plan and load seconds."""
    lines = [
        "| run | wall s | encode: plan, load s | denoise: plan, load s | decode: plan, load s |",
        "|---|---|---|---|---|",
    ]
    for entry in runs:
        stages = {s["stage"]: s for s in (entry.get("report") or {}).get("memory", [])}
        if not stages:
            continue
        cells = [
            f"{stages[name]['plan']}, {stages[name]['load_s']:.2f}" if name in stages else ""
            for name in ("encode", "denoise", "decode")
        ]
        lines.append(f"| {entry['label']} | {entry['wall_s']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
