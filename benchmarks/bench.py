"""GPU benchmark: pixart's stages vs diffusers on the full-size PixArt-XL-2-1024-MS architecture, random weights.

    python benchmarks/bench.py --model DIR --tokenizer T5_TOKENIZER_DIR --out RESULTS_DIR CASE...

Builds the model into DIR first if it is missing (memory and time do not depend on weight values). Every case
runs as separate processes, one after another, on an otherwise idle GPU. For each process it records the
wall time and the peak of nvidia-smi's memory.used above the idle level (what a user's card must hold), and
pixart's own --report-memory JSON. Results: RESULTS_DIR/results.json and RESULTS_DIR/results.md.

Cases: pixart-8GB, pixart-3GB (staged: three processes, then generate), generate-8GB, generate-32 (32 prompts
at --vram 8GB), generate-32-taylorseer (the same with --step-cache taylorseer:2), encode-group-offload (T5 under diffusers' group offloading, to compare with pixart's streaming),
the diffusers baselines all-gpu, model-cpu-offload, group-offload, staged-8bit, loop-32 (all on the GPU, 32
prompts one by one, each image saved as a PNG), and startup (each stage process against `import torch`, with
its import time split by package: benchmarks/startup.py), and issue 19's (benchmarks/plans.py): plans (generate under
every --vram plan, each stage's load time), lora-8GB, compile-32, gpu-parity, importtime-small, help (`pixart --help`).

``--capped``: every pixart process that takes a --vram budget runs with its CUDA caching allocator capped at that
budget less 0.7 GB (benchmarks/capped.py), so it behaves like a card of that size. ``--tag main``: a prefix for the
labels, to run another checkout's pixart (PYTHONPATH) through the same cases.
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

HERE = Path(__file__).resolve().parent
PROMPT = "a small house by a lake with mountains behind it, watercolor"
# case: (label, output folder, extra options). The step-cache case is approximate: parity() reports its
# difference from the exact run's images (on random weights: a size of the change, not a judgement of quality).
GENERATE_32 = {
    "generate-32": ("pixart generate 32 prompts 8GB", "pixart-32", ()),
    "generate-32-taylorseer": (
        "pixart generate 32 prompts 8GB --step-cache taylorseer:2",
        "pixart-32-taylorseer",
        ("--step-cache", "taylorseer:2"),
    ),
}
DIFFUSERS_CASES = ("all-gpu", "model-cpu-offload", "group-offload", "staged-8bit", "loop-32")
SUBJECTS = [
    "a small house by a lake",
    "a red fox in the snow",
    "a lighthouse at dusk",
    "a bowl of ramen",
    "an old steam train",
    "a city street in the rain",
    "a field of sunflowers",
    "a sailing boat at sea",
]
STYLES = ["watercolor", "oil painting", "photograph", "pencil sketch"]


def many_prompts(count: int) -> list[str]:
    """``count`` distinct prompts (the same list for pixart and diffusers)."""
    return [f"{SUBJECTS[i % len(SUBJECTS)]}, {STYLES[i // len(SUBJECTS) % len(STYLES)]}, #{i}" for i in range(count)]


class GpuPeak:
    """Peak nvidia-smi memory.used (MiB) while a block runs, sampled every 20 ms."""

    def __init__(self):
        self.peak = 0
        self._stop = threading.Event()

    @staticmethod
    def used_mib() -> int:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return int(out.strip().splitlines()[0])

    def _poll(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.used_mib())
            self._stop.wait(0.02)

    def __enter__(self):
        self.idle = self.used_mib()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def peak_gb(self) -> float:
        return round((self.peak - self.idle) / 1024, 2)


OPTIONS = {"capped": False, "tag": ""}
TIMEOUT_S = 400  # one process; a hung case must not eat a GPU lease


def capped(command: list[str]) -> list[str]:
    """A pixart process with a --vram budget, run under benchmarks/capped.py at that budget (with --capped)."""
    if not OPTIONS["capped"] or command[1:3] != ["-m", "pixart_cli"] or "--vram" not in command:
        return command
    budget = command[command.index("--vram") + 1]
    return [command[0], str(HERE / "capped.py"), budget, *command[1:]]


def run(label: str, command: list[str], cwd: Path, log: list, env: dict | None = None) -> dict:
    """One process: wall time, nvidia-smi peak above idle, and its stdout parsed as JSON when it is JSON."""
    command = capped(command)
    label = f"{OPTIONS['tag']}: {label}" if OPTIONS["tag"] else label
    started = time.perf_counter()
    with GpuPeak() as gpu:
        try:
            proc = subprocess.run(
                command, cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=TIMEOUT_S
            )
        except subprocess.TimeoutExpired as expired:
            out = expired.stdout.decode() if isinstance(expired.stdout, bytes) else expired.stdout or ""
            err = expired.stderr.decode() if isinstance(expired.stderr, bytes) else expired.stderr or ""
            proc = subprocess.CompletedProcess(command, 124, out, err + f"\ntimed out after {TIMEOUT_S} s")
    wall = round(time.perf_counter() - started, 2)
    entry = {
        "label": label,
        "capped": command[1:2] == [str(HERE / "capped.py")],
        "wall_s": wall,
        "smi_peak_gb": gpu.peak_gb,
        "rc": proc.returncode,
        "command": " ".join(command),
    }
    try:
        entry["report"] = json.loads(proc.stdout)
    except ValueError:
        entry["stdout"] = proc.stdout[-2000:]
    entry["stderr"] = proc.stderr[-3000:]
    log.append(entry)
    print(json.dumps({k: v for k, v in entry.items() if k not in ("stderr", "report")}), flush=True)
    if proc.returncode:
        print(proc.stderr[-3000:], file=sys.stderr, flush=True)
    return entry


def pixart(*args: str) -> list[str]:
    return [sys.executable, "-m", "pixart_cli", *args]


def measured(model: Path, budget: str) -> list[str]:
    """The options every measured pixart process takes: the model, the budget, and its own memory report."""
    return ["--model", str(model), "--vram", budget, "--report-memory", "--json"]


def pixart_case(budget: str, model: Path, work: Path, log: list) -> None:
    common = measured(model, budget)
    work.mkdir(parents=True, exist_ok=True)
    run(f"pixart encode {budget}", pixart("encode", PROMPT, "-o", "emb.pt", *common), work, log)
    run(f"pixart denoise {budget}", pixart("denoise", "emb.pt", "-o", "lat.pt", "--seed", "0", *common), work, log)
    run(f"pixart decode {budget}", pixart("decode", "lat.pt", "-o", "img.png", *common), work, log)
    run(f"pixart generate {budget}", pixart("generate", PROMPT, "-o", "gen.png", "--seed", "0", *common), work, log)


ENCODE_GROUP_OFFLOAD = r"""
import json, sys, time, torch
t0 = time.perf_counter()
from transformers import T5EncoderModel, T5Tokenizer
from diffusers.hooks import apply_group_offloading
model = sys.argv[1]
tok = T5Tokenizer.from_pretrained(model, subfolder="tokenizer")
te = T5EncoderModel.from_pretrained(model, subfolder="text_encoder", dtype=torch.float16)
apply_group_offloading(te, onload_device=torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1,
                       use_stream=True)
t1 = time.perf_counter()
ids = tok(["a cat", ""], padding="max_length", max_length=120, return_tensors="pt")
with torch.no_grad():
    te(ids.input_ids.cuda(), attention_mask=ids.attention_mask.cuda())
torch.cuda.synchronize()
t2 = time.perf_counter()
free, total = torch.cuda.mem_get_info()
print(json.dumps({"load_s": round(t1 - t0, 2), "encode_s": round(t2 - t1, 2),
                  "peak_gb": round((torch.cuda.max_memory_reserved() + total - free - torch.cuda.memory_reserved())
                                   / 2**30, 3)}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--repeat", type=int, default=1, help="run the whole list N times, interleaved")
    parser.add_argument("--startup-repeat", type=int, default=3, help="rounds of the startup case")
    parser.add_argument("--capped", action="store_true", help="cap each pixart process's allocator at its --vram")
    parser.add_argument("--tag", default="", help="a prefix for the labels (another checkout's pixart)")
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    OPTIONS.update(capped=args.capped, tag=args.tag)
    extra: dict = {}
    args.model, args.tokenizer, args.out = args.model.resolve(), args.tokenizer.resolve(), args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    log: list = []
    build_model(args.model, args.tokenizer)
    device = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"], capture_output=True, text=True
    ).stdout.strip()
    for case in [case for _ in range(args.repeat) for case in args.cases]:
        if case == "generate-8GB":  # the one-process comparison with diffusers all-gpu, alone
            run(
                "pixart generate 8GB",
                pixart("generate", PROMPT, "-o", "gen.png", "--seed", "0", *measured(args.model, "8GB")),
                args.out,
                log,
            )
        elif case in GENERATE_32:  # many prompts within 8 GB, beside diffusers' loop (case loop-32)
            prompts = args.out / "prompts-32.txt"
            prompts.write_text("\n".join(many_prompts(32)) + "\n")
            label, folder, options = GENERATE_32[case]
            run(
                label,
                pixart(
                    "generate",
                    "--prompts-file",
                    str(prompts),
                    "-o",
                    str(args.out / folder) + "/",
                    "--seed",
                    "0",
                    *measured(args.model, "8GB"),
                    *options,
                ),
                args.out,
                log,
            )
        elif case.startswith("pixart-"):
            pixart_case(case.removeprefix("pixart-"), args.model, args.out / case, log)
        elif case in DIFFUSERS_CASES:
            out_json = args.out / f"{case}.json"
            label = "diffusers loop 32 prompts" if case == "loop-32" else f"diffusers {case}"
            entry = run(
                label, [sys.executable, str(HERE / "baselines.py"), str(args.model), case, str(out_json)], args.out, log
            )
            if out_json.is_file():
                entry["report"] = json.loads(out_json.read_text())
        elif case == "startup":  # each stage process against `import torch`, and its import time by package
            import startup

            results = startup.measure(args.model, "cuda", repeat=args.startup_repeat)
            (args.out / "startup.json").write_text(json.dumps(results, indent=1))
            (args.out / "startup.md").write_text(startup.table(results))
            print(startup.table(results), flush=True)
        elif case in ("plans", "lora-8GB", "gpu-parity", "importtime-small", "compile-32", "help"):
            import plans

            bench = sys.modules[__name__]
            if case == "plans":
                plans.plans(bench, args.model, args.out, log, PROMPT)
            elif case == "lora-8GB":
                plans.lora(bench, args.model, args.out, log, PROMPT)
            elif case == "gpu-parity":
                extra["gpu_parity"] = plans.gpu_parity(bench, args.model, args.out, log, PROMPT)
            elif case == "importtime-small":
                extra[f"{args.tag or 'this'}_importtime"] = plans.importtime_small(bench, args.model, args.out, PROMPT)
            elif case == "compile-32":
                prompts = args.out / "prompts-32.txt"
                prompts.write_text("\n".join(many_prompts(32)) + "\n")
                plans.compile_32(bench, args.model, args.out, log, prompts)
            else:
                for _ in range(3):
                    run("pixart --help", pixart("--help"), args.out, log)
        elif case == "encode-group-offload":
            run(
                "T5 group offload (diffusers)",
                [sys.executable, "-c", ENCODE_GROUP_OFFLOAD, str(args.model)],
                args.out,
                log,
            )
        else:
            raise SystemExit(f"unknown case {case}")
    results = {
        "device": device,
        "date": time.strftime("%Y-%m-%d"),
        "runs": log,
        "medians": medians(log),
        "parity": parity(args.out),
        "capped": args.capped,
        **extra,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    import plans

    text = table(results) + "\nEach stage's plan and load seconds:\n\n" + plans.load_table(log)
    for key in [k for k in extra if k.endswith("importtime") or k == "gpu_parity"]:
        text += f"\n{key}: {json.dumps(extra[key])}\n"
    (args.out / "results.md").write_text(text)
    print(text)


def build_model(model: Path, tokenizer: Path) -> None:
    """The full-size random-weight model in ``model``, built on the GPU unless it is there already."""
    if (model / "model_index.json").is_file():
        return
    started = time.perf_counter()
    command = [
        sys.executable,
        "-m",
        "pixart_cli.random_model",
        str(model),
        "--size",
        "full",
        "--tokenizer",
        str(tokenizer),
        "--device",
        "cuda",
    ]
    subprocess.run(command, check=True)
    print(f"built {model} in {time.perf_counter() - started:.1f} s", flush=True)


def parity(out: Path) -> dict | None:
    """pixart generate --vram 8GB (case pixart-8GB) against diffusers' fp16 pipeline all on the GPU (case all-gpu),
    same prompt and seed: max and mean pixel difference, when both ran. With the step-cache case: its 32 images
    against the exact generate-32 ones."""
    import numpy as np
    from PIL import Image

    def differences(pairs):
        values = [
            np.abs(np.asarray(Image.open(a).convert("RGB")).astype(np.int16) - np.asarray(Image.open(b).convert("RGB")))
            for a, b in pairs
        ]
        return {
            "max_pixel_diff": int(max(v.max() for v in values)),
            "mean_pixel_diff": round(float(np.mean([v.mean() for v in values])), 3),
        }

    found = {}
    ours, theirs = out / "pixart-8GB" / "gen.png", out / "diffusers-all-gpu.png"
    if ours.is_file() and theirs.is_file():
        found = differences([(ours, theirs)])
    exact, cached = sorted((out / "pixart-32").glob("*.png")), sorted((out / "pixart-32-taylorseer").glob("*.png"))
    if exact and len(exact) == len(cached):
        found["step_cache_taylorseer_2_vs_exact"] = differences(zip(exact, cached))
    return found or None


def medians(log: list) -> dict:
    """Median wall seconds per label, over repeated runs."""
    import statistics

    walls: dict[str, list[float]] = {}
    for entry in log:
        walls.setdefault(entry["label"], []).append(entry["wall_s"])
    return {label: {"median_wall_s": statistics.median(values), "runs": values} for label, values in walls.items()}


def table(results: dict) -> str:
    """Markdown: one row per process, then the medians of repeated runs."""
    lines = [
        f"Device: {results['device']}; date {results['date']}; 1024², 20 steps, cfg 4.5, fp16.",
        "",
        f"Parity, pixart generate --vram 8GB vs diffusers all-gpu, seed 0: {results.get('parity')}",
        "",
        "| run | wall s | nvidia-smi peak GB | pixart: plan, device peak GB (reserved+context), RSS GB, "
        "load s, compute s |",
        "|---|---|---|---|",
    ]
    for entry in results["runs"]:
        detail = ""
        report = entry.get("report") or {}
        for stage in report.get("memory", []):
            detail += (
                f"{stage['stage']} {stage['plan']}: {stage['peak_device_gb']:.2f}, RSS {stage['peak_rss_gb']:.2f}, "
                f"{stage['load_s']:.1f}+{stage['compute_s']:.1f} s; "
            )
        if not detail and report:
            detail = ", ".join(f"{k} {v}" for k, v in report.items() if k not in ("case", "device"))
        status = "" if entry["rc"] == 0 else f" (exit {entry['rc']})"
        lines.append(f"| {entry['label']}{status} | {entry['wall_s']} | {entry['smi_peak_gb']} | {detail} |")
    repeated = {label: row for label, row in results["medians"].items() if len(row["runs"]) > 1}
    if repeated:
        lines += ["", "| run | median wall s | all runs |", "|---|---|---|"]
        lines += [f"| {label} | {row['median_wall_s']} | {row['runs']} |" for label, row in repeated.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
