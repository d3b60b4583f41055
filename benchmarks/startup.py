"""Start-up cost of each stage process, against `python -c "import torch"` (issue 10).

    python benchmarks/startup.py --model DIR [--repeat 5] [--device cpu] [--out RESULTS_DIR]

Runs `import torch`, then encode / denoise / decode / generate as whole processes of the installed pixart,
interleaved, --repeat times each (warm page cache after the first round), and reports for each the best wall
time and the best CPU time (user + sys, steadier on a shared machine), and both as multiples of `import torch`.
Then runs each stage once more under `python -X importtime` and reports its import time split by package
(self times summed: torch, diffusers, transformers, ...), so a regression names its culprit.
Used by bench.py's `startup` case on the GPU; on a CPU box: --device cpu with a tiny model
(`python -m pixart_cli.random_model DIR`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

PROMPT = "a small house by a lake with mountains behind it, watercolor"


def commands(model: Path, work: Path, device: str) -> dict[str, list[str]]:
    pixart = [sys.executable, "-m", "pixart_cli"]
    common = ["--model", str(model), "--device", device, "--quiet"]
    return {
        "import torch": [sys.executable, "-c", "import torch"],
        "encode": [*pixart, "encode", PROMPT, "-o", str(work / "emb.pt"), *common],
        "denoise": [*pixart, "denoise", str(work / "emb.pt"), "-o", str(work / "lat.pt"), "--seed", "0", *common],
        "decode": [*pixart, "decode", str(work / "lat.pt"), "-o", str(work / "img.png"), *common],
        "generate": [*pixart, "generate", PROMPT, "-o", str(work / "gen.png"), "--seed", "0", *common],
        "pixart --help": [*pixart, "--help"],
    }


def timed(command: list[str]) -> tuple[float, float]:
    """(wall s, user + sys CPU s) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-2000:]}")
    proc.stderr.close()
    return wall, usage.ru_utime + usage.ru_stime


def import_split(command: list[str]) -> dict[str, float]:
    """Seconds of import time (self times, summed) per top-level package, from -X importtime."""
    proc = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True)
    split: dict[str, float] = defaultdict(float)
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        self_us, _, name = line[len("import time:") :].split("|")
        name = name.strip()
        # torch's compiler and distributed stacks are what lean imports keep out: named apart from torch
        heavy = next((h for h in ("torch._dynamo", "torch.distributed", "torch._inductor") if name.startswith(h)), None)
        package = heavy or name.split(".")[0]
        split[package] += int(self_us) / 1e6
    top = dict(sorted(split.items(), key=lambda item: -item[1])[:8])
    return {"total": round(sum(split.values()), 2), **{k: round(v, 2) for k, v in top.items()}}


def measure(model: Path, device: str, repeat: int) -> dict:
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        runs = commands(model, work, device)
        best: dict[str, list[float]] = {label: [float("inf"), float("inf")] for label in runs}
        for _ in range(repeat):
            for label, command in runs.items():
                wall, cpu = timed(command)
                best[label] = [min(best[label][0], wall), min(best[label][1], cpu)]
        torch_wall, torch_cpu = best["import torch"]
        rows = {
            label: {
                "wall_s": round(wall, 2),
                "cpu_s": round(cpu, 2),
                "wall_x_torch": round(wall / torch_wall, 2),
                "cpu_x_torch": round(cpu / torch_cpu, 2),
            }
            for label, (wall, cpu) in best.items()
        }
        for label in ("encode", "denoise", "decode", "generate"):
            rows[label]["imports"] = import_split(runs[label])
    return {"repeat": repeat, "device": device, "date": time.strftime("%Y-%m-%d"), "runs": rows}


def table(results: dict) -> str:
    lines = [
        f"Start-up (best of {results['repeat']}, device {results['device']}, {results['date']})",
        "",
        "| process | wall s | × import torch | CPU s | × import torch | import time by package (s) |",
        "|---|---|---|---|---|---|",
    ]
    for label, row in results["runs"].items():
        imports = ", ".join(f"{k} {v}" for k, v in row.get("imports", {}).items())
        lines.append(
            f"| {label} | {row['wall_s']} | {row['wall_x_torch']} | {row['cpu_s']} | {row['cpu_x_torch']} | {imports} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    results = measure(args.model.resolve(), args.device, args.repeat)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "startup.json").write_text(json.dumps(results, indent=1))
        (args.out / "startup.md").write_text(table(results))
    print(table(results))


if __name__ == "__main__":
    main()
