"""Where a stage process's wall time goes, beside diffusers all-on-GPU, in one run on one GPU.

    python benchmarks/profile_stages.py --model DIR --out RESULTS_DIR [--budget 8GB] [--rounds 2] \
        [--checkout NAME=PATH ...] [--no-profile] [--capped]

For `import torch`, `import torch` + CUDA init, and each of encode / denoise / decode as whole processes of pixart
(at ``--vram BUDGET``; under benchmarks/capped.py with ``--capped``): the best wall time over ``--rounds`` interleaved rounds (warm page
cache after the first), then one more run of each stage under cProfile, whose top entries by cumulative time are
written to RESULTS_DIR/profile-STAGE.txt, and one under ``-X importtime`` (import seconds by package). diffusers'
all-on-GPU baseline (benchmarks/baselines.py all-gpu) runs in the same rounds, so the staged sum is measured beside
it. ``--checkout NAME=PATH`` adds the stages of another checkout of pixart (PATH first on PYTHONPATH), measured
in the same rounds ("before" beside "after"). Writes RESULTS_DIR/profile.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))

from bench import PROMPT  # noqa: E402
from startup import import_split  # noqa: E402

CAPPED = "--capped" in sys.argv


def stage_commands(model: Path, work: Path, budget: str) -> dict[str, list[str]]:
    # capped.py initialises CUDA before pixart starts (it reads the device's size), which would hide pixart's own
    # start-up: the caps are for the runs that show a plan fits (bench.py --capped), not for these timings
    capped = [sys.executable, str(HERE / "capped.py"), budget] if CAPPED else [sys.executable]
    capped = [*capped, "-m", "pixart_cli"]
    common = ["--model", str(model), "--vram", budget, "--quiet"]
    return {
        "encode": [*capped, "encode", PROMPT, "-o", str(work / "emb.pt"), *common],
        "denoise": [*capped, "denoise", str(work / "emb.pt"), "-o", str(work / "lat.pt"), "--seed", "0", *common],
        "decode": [*capped, "decode", str(work / "lat.pt"), "-o", str(work / "img.png"), *common],
    }


def timed(command: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stderr[-3000:]}")
    return round(time.perf_counter() - started, 2)


def profiled(name: str, command: list[str], out: Path) -> None:
    """One run of a stage under cProfile: its top 45 entries by cumulative time."""
    stats_file = out / f"profile-{name}.prof"
    proc = subprocess.run([command[0], "-m", "cProfile", "-o", str(stats_file), *command[1:]], capture_output=True)
    if proc.returncode:
        raise SystemExit(proc.stderr.decode()[-3000:])
    with open(out / f"profile-{name}.txt", "w") as text:
        pstats.Stats(str(stats_file), stream=text).sort_stats("cumulative").print_stats(45)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget", default="8GB")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--checkout", action="append", default=[], help="NAME=PATH of another pixart checkout")
    parser.add_argument("--no-profile", action="store_true")
    parser.add_argument("--capped", action="store_true", help="each stage under benchmarks/capped.py")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    stages = stage_commands(args.model.resolve(), args.out.resolve(), args.budget)
    cases = {
        "import torch": [sys.executable, "-c", "import torch"],
        "import torch + CUDA init": [sys.executable, "-c", "import torch; torch.zeros(1, device='cuda')"],
        **stages,
        "diffusers all-gpu": [
            sys.executable,
            str(HERE / "baselines.py"),
            str(args.model),
            "all-gpu",
            str(args.out / "all-gpu.json"),
        ],  # fmt: skip
    }
    envs: dict[str, dict | None] = dict.fromkeys(cases)
    for spec in args.checkout:
        label, path = spec.split("=", 1)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([path, os.environ.get("PYTHONPATH", "")])}
        for name, command in stage_commands(args.model.resolve(), args.out.resolve() / label, args.budget).items():
            (args.out / label).mkdir(exist_ok=True)
            cases[f"{label}: {name}"], envs[f"{label}: {name}"] = command, env
    walls: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, command in cases.items():
            walls[name].append(timed(command, envs[name]))
            print(name, walls[name][-1], flush=True)
    if not args.no_profile:
        for name, command in stages.items():
            profiled(name, command, args.out)
    imports = {name: import_split(command) for name, command in stages.items()}
    device = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    best = {name: min(values) for name, values in walls.items()}
    sums = {label: round(sum(best[f"{label}: {name}" if label else name] for name in stages), 2)
            for label in ["", *(spec.split("=", 1)[0] for spec in args.checkout)]}  # fmt: skip
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "budget": args.budget, "walls": walls,
              "best": best, "staged_sum": sums,
              "staged_vs_diffusers": {label: round(total / best["diffusers all-gpu"], 3) for label, total in sums.items()},
              "import_s_by_package": imports}  # fmt: skip
    (args.out / "profile.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
