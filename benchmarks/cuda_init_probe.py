"""How much of a stage process's start-up is CUDA's own initialisation, and whether it can overlap the imports.

    python benchmarks/cuda_init_probe.py [--rounds 3]

Each case is a fresh interpreter, run ``--rounds`` times interleaved; the best wall time of each is printed as JSON.
- torch: ``import torch``
- torch+cuda: then the first CUDA tensor (the driver, the primary context, torch's lazy init)
- torch+cuda+libs: then the diffusers and transformers modules a stage imports
- overlapped-driver: the driver and the primary context made on a thread through ctypes (the GIL released) while
  ``import torch`` runs, then the same as torch+cuda+libs
- overlapped-torch: torch's lazy init on a thread while the main thread imports the libraries
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

LIBS = "import diffusers.models.autoencoders.vae, transformers.models.t5.tokenization_t5"
DRIVER = """
import ctypes, threading
def driver():
    cuda = ctypes.CDLL("libcuda.so.1")
    assert cuda.cuInit(0) == 0
    device, context = ctypes.c_int(), ctypes.c_void_p()
    assert cuda.cuDeviceGet(ctypes.byref(device), 0) == 0
    assert cuda.cuDevicePrimaryCtxRetain(ctypes.byref(context), device) == 0
thread = threading.Thread(target=driver); thread.start()
"""
CASES = {
    "torch": "import torch",
    "torch+cuda": "import torch; torch.zeros(1, device='cuda')",
    "torch+cuda+libs": f"import torch; torch.zeros(1, device='cuda'); {LIBS}",
    "overlapped-driver": DRIVER + f"import torch\n{LIBS}\nthread.join(); torch.zeros(1, device='cuda')",
    "overlapped-torch": "import torch, threading\n"
    "thread = threading.Thread(target=lambda: torch.zeros(1, device='cuda')); thread.start()\n"
    f"{LIBS}\nthread.join()",
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    walls: dict[str, list[float]] = {name: [] for name in CASES}
    for _ in range(args.rounds):
        for name, code in CASES.items():
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True)
            walls[name].append(round(time.perf_counter() - started, 2))
    print(json.dumps({"best": {name: min(values) for name, values in walls.items()}, "walls": walls}, indent=1))


if __name__ == "__main__":
    main()
