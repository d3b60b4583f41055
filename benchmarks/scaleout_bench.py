"""GPU benchmark of scale-out: many prompts on 1 GPU, then on N GPUs through torchrun and through Ray.

    python benchmarks/scaleout_bench.py --model DIR --tokenizer T5_TOKENIZER_DIR --out RESULTS_DIR

Defaults: 64 prompts at 1024² (the model's native size), 20 steps, --vram 8GB per GPU, cases `1gpu torchrun ray`,
N = every visible GPU. Builds the full-size random-weight model into DIR first if it is missing (as bench.py
does). Each case is one whole command, timed from start to exit, while nvidia-smi's memory.used of every GPU is
sampled every 50 ms (peak above idle, per GPU). Throughput is images per second of that wall time, imports and
model loads included. Then every case's images are compared with the 1-GPU images (max pixel difference) and
every manifest is checked for one line per image. Results: RESULTS_DIR/job.json and RESULTS_DIR/job.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

PROMPT = "a small house by a lake with mountains behind it, watercolor"


class GpuPeaks:
    """Peak nvidia-smi memory.used (MiB) of each GPU above its idle level while a block runs."""

    def __init__(self, period: float = 0.05):
        self.period = period
        self._stop = threading.Event()

    @staticmethod
    def used() -> dict[int, int]:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return {int(index): int(used) for index, used in (line.split(",") for line in out.strip().splitlines())}

    def _poll(self):
        while not self._stop.is_set():
            for index, used in self.used().items():
                self.peak[index] = max(self.peak.get(index, 0), used)
            self._stop.wait(self.period)

    def __enter__(self):
        self.idle = self.used()
        self.peak = dict(self.idle)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def peaks_gb(self) -> dict[int, float]:
        return {index: round((self.peak[index] - self.idle[index]) / 1024, 2) for index in sorted(self.peak)}


def command(case: str, gpus: int, args, out_dir: Path) -> tuple[list[str], dict]:
    """The command line and extra environment of one case."""
    generate = [
        "generate",
        "--prompts-file",
        str(args.out / "prompts.txt"),
        "-o",
        f"{out_dir}/",
        "--model",
        str(args.model),
        "--vram",
        args.vram,
        "--seed",
        "0",
        "--steps",
        str(args.steps),
    ]
    visible = ",".join(str(i) for i in range(gpus))
    if case == "1gpu":
        return [sys.executable, "-m", "pixart_cli", *generate], {"CUDA_VISIBLE_DEVICES": "0"}
    if case == "torchrun":
        return (
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--standalone",
                "--nproc_per_node",
                str(gpus),
                "-m",
                "pixart_cli",
                *generate,
            ],
            {"CUDA_VISIBLE_DEVICES": visible},
        )
    if case == "ray":
        return [sys.executable, "-m", "pixart_cli", *generate, "--ray"], {"CUDA_VISIBLE_DEVICES": visible}
    raise SystemExit(f"unknown case {case}; use 1gpu, torchrun or ray")


def read_rgb(path: Path):
    import numpy as np
    from PIL import Image

    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype("int16")


def compare(reference: Path, other: Path, count: int) -> dict:
    """Max and mean pixel difference over all images, and whether the manifest has one line per image."""
    worst, total = 0, 0.0
    for index in range(count):
        a, b = read_rgb(reference / f"image-{index}.png"), read_rgb(other / f"image-{index}.png")
        worst = max(worst, int(abs(a - b).max()))
        total += float(abs(a - b).mean())
    return {"max_pixel_diff": worst, "mean_pixel_diff": round(total / count, 3)}


def manifest_ok(folder: Path, count: int) -> bool:
    lines = [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines() if line.strip()]
    return sorted(line["index"] for line in lines) == list(range(count))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--vram", default="8GB", help="budget per GPU")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for the multi-GPU cases [default: all]")
    parser.add_argument("cases", nargs="*", default=["1gpu", "torchrun", "ray"])
    args = parser.parse_args()
    args.model, args.tokenizer, args.out = args.model.resolve(), args.tokenizer.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(Path(__file__).parent))
    from bench import build_model
    from timeline import stamped

    build_model(args.model, args.tokenizer)
    gpus = args.gpus if args.gpus is not None else len(GpuPeaks.used())
    (args.out / "prompts.txt").write_text("".join(f"{PROMPT}, variation {i}\n" for i in range(args.prompts)))
    device = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
        capture_output=True,
        text=True,
    ).stdout.strip()

    runs = []
    for case in args.cases:
        out_dir = args.out / f"images-{case}"
        subprocess.run(["rm", "-rf", str(out_dir)], check=True)
        out_dir.mkdir()
        line, extra_env = command(case, gpus, args, out_dir)
        with GpuPeaks() as peaks:
            stamped_lines, returncode, wall = stamped(line, extra_env)
        paths = [at for at, text in stamped_lines if text.startswith(str(out_dir))]
        others = [(round(at, 2), text) for at, text in stamped_lines if not text.startswith(str(out_dir))]
        # Start-up: imports, the launcher, Ray's start, until the first stage (or Ray's driver) says it began.
        work_started = next((at for at, text in others if "encode: plan" in text or text.startswith("ray: ")), None)
        entry = {
            "case": case,
            "gpus": 1 if case == "1gpu" else gpus,
            "rc": returncode,
            "wall_s": round(wall, 2),
            "images": len(paths),
            "images_per_s": round(len(paths) / wall, 3),
            "start_up_s": work_started,
            "images_per_s_after_start_up": None
            if work_started is None
            else round(len(paths) / (wall - work_started), 3),
            "peak_gb_per_gpu": peaks.peaks_gb(),
            "command": " ".join(line),
            "timeline": others[-60:],  # [seconds since start, line]: stage starts and ends, the summary
        }
        if returncode == 0:
            entry["manifest_complete"] = manifest_ok(out_dir, args.prompts)
        runs.append(entry)
        print(json.dumps({k: v for k, v in entry.items() if k != "timeline"}), flush=True)
        if returncode:
            print("\n".join(text for _, text in others[-30:]), file=sys.stderr, flush=True)

    base = next((run for run in runs if run["case"] == "1gpu" and run["rc"] == 0), None)
    for run in runs:
        if base is not None and run is not base and run["rc"] == 0:
            run["speedup_vs_1gpu"] = round(run["images_per_s"] / base["images_per_s"], 2)
            if run["images_per_s_after_start_up"] and base["images_per_s_after_start_up"]:
                run["speedup_after_start_up"] = round(
                    run["images_per_s_after_start_up"] / base["images_per_s_after_start_up"], 2
                )
            run.update(compare(args.out / "images-1gpu", args.out / f"images-{run['case']}", args.prompts))
    results = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "prompts": args.prompts,
        "steps": args.steps,
        "vram_per_gpu": args.vram,
        "runs": runs,
    }
    (args.out / "job.json").write_text(json.dumps(results, indent=1))
    (args.out / "job.md").write_text(table(results))
    print(table(results))


def table(results: dict) -> str:
    lines = [
        f"Device: {results['device']}; date {results['date']}; {results['prompts']} prompts, 1024², "
        f"{results['steps']} steps, --vram {results['vram_per_gpu']} per GPU; wall = whole command (imports, "
        "loads, Ray start-up included). Start-up = from launch until the first stage (or Ray's driver) says it "
        "began: imports, the torchrun launcher, Ray's start; after it, the rest of the command.",
        "",
        "| case | GPUs | wall s | images/s | speed-up vs 1 GPU | start-up s | speed-up after start-up | nvidia-smi "
        "peak GB per GPU | max / mean pixel diff vs 1 GPU | manifest |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        peaks = ", ".join(f"GPU{index} {gb}" for index, gb in run["peak_gb_per_gpu"].items())
        status = "" if run["rc"] == 0 else f" (exit {run['rc']})"
        diff = f"{run['max_pixel_diff']} / {run['mean_pixel_diff']}" if "max_pixel_diff" in run else "—"
        lines.append(
            f"| {run['case']}{status} | {run['gpus']} | {run['wall_s']} | {run['images_per_s']} | "
            f"{run.get('speedup_vs_1gpu', '—')} | {run.get('start_up_s', '—')} | "
            f"{run.get('speedup_after_start_up', '—')} | {peaks} | {diff} | "
            f"{'complete' if run.get('manifest_complete') else '—'} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
