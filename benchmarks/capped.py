"""Run a Python module (pixart) with its CUDA caching allocator capped at a card's size (DESIGN.md: "fits a card of
N GB" is shown by the cap; going over is then an out-of-memory error, as on the small card).

    python benchmarks/capped.py 4GB -m pixart_cli generate "a cat" --vram 4GB ...

The cap is the budget less 0.7 GB for the CUDA context, as a fraction of the device's memory
(``torch.cuda.set_per_process_memory_fraction``), set before anything is allocated. bench.py's ``--capped`` wraps
every pixart process that takes a ``--vram`` budget in this.
"""

from __future__ import annotations

import runpy
import sys

CONTEXT_GB = 0.7


def budget_gb(text: str) -> float:
    """'4GB' / '2.5G' / '512MB' -> GiB."""
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return float(text[:-1]) / (1024 if text.endswith("M") else 1) if text[-1] in "GM" else float(text)


def cap(gb: float) -> float:
    """Cap this process's caching allocator at ``gb`` less the context; returns the fraction set."""
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    fraction = max(gb - CONTEXT_GB, 0.1) * 2**30 / total
    torch.cuda.set_per_process_memory_fraction(fraction)
    return fraction


def main() -> None:
    budget, flag, module, *rest = sys.argv[1:]
    if flag != "-m":
        raise SystemExit("usage: capped.py BUDGET -m MODULE ARGS...")
    cap(budget_gb(budget))
    sys.argv = [module, *rest]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
