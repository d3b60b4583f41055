"""GPU runs of the features beside the plain run, on the full-size architecture with random weights, each process's
CUDA allocator capped at its --vram budget less the context (so a plan that does not fit fails, as on that card).

    python benchmarks/features_gpu.py --work DIR --tokenizer T5_TOKENIZER_DIR --out RESULTS_DIR STEP...

Steps (in the order given):
  convert    build an fp32 α model (as the published checkpoint is stored), `pixart convert` it to fp16, and time
             `pixart encode` from each, with the page cache dropped for the model's files (cold) and warm
  alpha      plain / inpainting / ControlNet `generate` runs on the fp16 α model (the convert step's copy, or a
             new fp16 build), at --vram 8GB and 2GB
  sigma      plain / PAG `generate` runs on an fp16 Σ model at --vram 8GB
Memory and time do not depend on weight values; image quality does, and is not judged (the images are noise).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "a small house by a lake with mountains behind it, watercolor"
CONTEXT_GB = 0.7  # the CUDA context a card's budget also holds
LOG: Path | None = None  # every record is appended here as it is made (a run cut short keeps what it measured)
CAPPED = """
import runpy, sys, torch
budget = float(sys.argv[1])
total = torch.cuda.get_device_properties(0).total_memory / 2**30
torch.cuda.set_per_process_memory_fraction(max(budget - {context}, 0.1) / total)
sys.argv = ["pixart", *sys.argv[2:]]
runpy.run_module("pixart_cli", run_name="__main__")
""".format(context=CONTEXT_GB)


class GpuPeak:
    """Peak nvidia-smi memory.used (MiB) above the level when it started, sampled every 20 ms."""

    def __init__(self):
        self.peak = 0
        self.idle = self._used()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def _used() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
        ).stdout
        return int(out.split()[0]) if out.strip() else 0

    def _sample(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self._used())
            time.sleep(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()


def run(label: str, args: list[str], cwd: Path, budget_gb: float | None, records: list) -> dict:
    """One whole pixart process (capped at ``budget_gb`` when given); its wall time, GPU peak and --json report."""
    command = (
        [sys.executable, "-c", CAPPED, str(budget_gb), *args]
        if budget_gb
        else [sys.executable, "-m", "pixart_cli", *args]
    )
    started = time.perf_counter()
    with GpuPeak() as peak:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    record = {
        "label": label,
        "args": args,
        "budget_gb": budget_gb,
        "exit": result.returncode,
        "wall_s": round(wall, 2),
        "gpu_peak_gb": round((peak.peak - peak.idle) / 1024, 2),
    }
    try:
        document = json.loads(result.stdout)
        record["memory"] = document.get("memory")
    except json.JSONDecodeError:
        pass
    if result.returncode != 0:
        record["stderr"] = result.stderr[-2000:]
    records.append(record)
    print(json.dumps(record), flush=True)
    if LOG is not None:
        with open(LOG, "a") as handle:
            handle.write(json.dumps(record) + "\n")
    return record


def drop_cache(folder: Path) -> None:
    """Evict a folder's files from the page cache (posix_fadvise DONTNEED on each), so the next read is cold."""
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as handle:
                os.posix_fadvise(handle.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def du_gb(folder: Path) -> float:
    return round(sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 1e9, 2)


def build(out: Path, tokenizer: Path, family: str, dtype: str) -> Path:
    if not out.exists():
        subprocess.run(
            [sys.executable, "-m", "pixart_cli.random_model", str(out), "--size", "full", "--device", "cuda"]
            + ["--tokenizer", str(tokenizer), "--family", family, "--dtype", dtype],
            check=True,
        )
    return out


def random_adapter(model: Path, out: Path, blocks: int = 13) -> Path:
    """A diffusers-layout ControlNet file: copies of the first ``blocks`` base blocks, random small projections."""
    import torch
    from safetensors.torch import load_file, save_file

    folder = model / "transformer"
    state = {}
    for file in sorted(folder.glob("*.safetensors")):
        state.update(load_file(file))
    hidden = state["transformer_blocks.0.attn1.to_q.weight"].shape[0]
    adapter = {}
    for i in range(blocks):
        prefix = f"transformer_blocks.{i}."
        for key, value in state.items():
            if key.startswith(prefix):
                adapter[f"controlnet_blocks.{i}.transformer_block.{key[len(prefix) :]}"] = value.clone()
        for name in ("after_proj",) + (("before_proj",) if i == 0 else ()):
            adapter[f"controlnet_blocks.{i}.{name}.weight"] = torch.randn(hidden, hidden).half() * 0.01
            adapter[f"controlnet_blocks.{i}.{name}.bias"] = torch.zeros(hidden).half()
    save_file(adapter, str(out))
    return out


def images(work: Path) -> dict:
    """A 1024² photo-like image, a mask (a white disc on black) and an edge map."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    photo = work / "photo.png"
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(photo)
    mask = Image.new("L", (1024, 1024), 0)
    ImageDraw.Draw(mask).ellipse((256, 256, 768, 768), fill=255)
    mask.save(work / "mask.png")
    edges = Image.new("L", (1024, 1024), 0)
    draw = ImageDraw.Draw(edges)
    for x in range(0, 1024, 64):
        draw.line((x, 0, 1024 - x, 1024), fill=255, width=3)
    edges.save(work / "edges.png")
    return {"photo": photo, "mask": work / "mask.png", "edges": work / "edges.png"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("steps", nargs="+", choices=("convert", "alpha", "sigma"))
    args = parser.parse_args()
    global LOG
    args.out.mkdir(parents=True, exist_ok=True)
    LOG = args.out / "records.jsonl"
    work, records = args.work, []
    work.mkdir(parents=True, exist_ok=True)
    common = ["--seed", "0", "--json", "--report-memory"]
    alpha16 = work / "alpha16"
    for step in args.steps:
        if step == "convert":
            alpha32 = build(work / "alpha32", args.tokenizer, "alpha", "fp32")
            shutil.rmtree(alpha16, ignore_errors=True)
            run("convert fp32 -> fp16", ["convert", str(alpha32), "-o", str(alpha16), "--json"], work, None, records)
            sizes = {"label": "size on disk GB", "fp32": du_gb(alpha32), "fp16": du_gb(alpha16)}
            records.append(sizes)
            print(json.dumps(sizes), flush=True)
            with open(LOG, "a") as handle:
                handle.write(json.dumps(sizes) + "\n")
            for name, folder in (("fp32", alpha32), ("fp16 copy", alpha16)):
                drop_cache(folder)
                run(
                    f"encode from {name}, cold",
                    ["encode", PROMPT, "--model", str(folder), "-o", "e.pt", *common[2:]] + ["--vram", "8GB"],
                    work,
                    8.0,
                    records,
                )
                run(
                    f"encode from {name}, warm",
                    ["encode", PROMPT, "--model", str(folder), "-o", "e.pt", *common[2:]] + ["--vram", "8GB"],
                    work,
                    8.0,
                    records,
                )
        elif step == "alpha":
            model = alpha16 if alpha16.exists() else build(alpha16, args.tokenizer, "alpha", "fp16")
            files = images(work)
            adapter = random_adapter(model, work / "controlnet.safetensors")
            base = ["generate", PROMPT, "--model", str(model), *common]
            for vram in (8, 2):
                budget = ["--vram", f"{vram}GB"]
                run(f"alpha plain {vram}GB", [*base, *budget, "-o", f"plain-{vram}.png"], work, vram, records)
                run(
                    f"alpha inpaint {vram}GB",
                    [*base, *budget, "--image", str(files["photo"]), "--mask"]
                    + [str(files["mask"]), "--strength", "0.8", "-o", f"inpaint-{vram}.png"],
                    work,
                    vram,
                    records,
                )
                run(
                    f"alpha controlnet {vram}GB",
                    [*base, *budget, "--control-image", str(files["edges"])]
                    + ["--controlnet", str(adapter), "-o", f"control-{vram}.png"],
                    work,
                    vram,
                    records,
                )
        elif step == "sigma":
            model = build(work / "sigma16", args.tokenizer, "sigma", "fp16")
            base = ["generate", PROMPT, "--model", str(model), *common, "--vram", "8GB"]
            run("sigma plain 8GB", [*base, "-o", "sigma.png"], work, 8, records)
            run("sigma PAG 8GB", [*base, "--pag-scale", "3", "-o", "sigma-pag.png"], work, 8, records)
    gpu = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    report = {"device": gpu, "date": time.strftime("%Y-%m-%d"), "records": records}
    (args.out / f"features-{'-'.join(args.steps)}.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
