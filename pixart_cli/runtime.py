"""Device and dtype resolution, quiet libraries, and freeing a stage's model before the next one loads."""

from __future__ import annotations

import gc
import logging
import os
import warnings
from contextlib import contextmanager

from pixart_cli.errors import PixartError

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def quiet_libraries() -> None:
    """Silence diffusers', transformers' and the hub's progress bars and advisory warnings (we show our own)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    logging.getLogger("torch").setLevel(logging.ERROR)


def lean_imports(quantized: bool = False) -> None:
    """Keep bitsandbytes (unless a stage quantizes) and peft out of this process: see lean.keep_out.
    Call before importing diffusers or transformers."""
    from pixart_cli.lean import keep_out

    keep_out(quantized=quantized)


def check_device(device: str) -> str:
    """Validate a --device value without importing torch."""
    if device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()):
        return device
    raise PixartError(f"--device {device!r}: unknown device; use auto, cpu, cuda, cuda:N or mps")


def check_dtype(dtype: str) -> str:
    """Validate a --dtype value without importing torch."""
    if dtype == "auto" or dtype in DTYPES:
        return dtype
    raise PixartError(f"--dtype {dtype!r}: unknown dtype; use auto, fp32, fp16 or bf16")


def resolve_device(device: str):
    """``auto`` tries cuda, then mps, then cpu. Returns a torch.device that exists."""
    import torch

    check_device(device)
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise PixartError(f"--device {device}: CUDA is not available here; use --device cpu or auto")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise PixartError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise PixartError(f"--device {device}: MPS is not available here; use --device cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device):
    """``auto`` is fp16 on CUDA and MPS, fp32 on CPU. Returns a torch.dtype."""
    import torch

    check_dtype(dtype)
    if dtype == "auto":
        return torch.float16 if device.type in ("cuda", "mps") else torch.float32
    return getattr(torch, DTYPES[dtype])


def dtype_name(dtype) -> str:
    """torch.float16 -> 'fp16'."""
    return {v: k for k, v in DTYPES.items()}[str(dtype).removeprefix("torch.")]


def free(device) -> None:
    """Return a dropped model's memory to the device, so the next stage starts from zero."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


@contextmanager
def forward_warnings(logger_name: str, log):
    """Route one library logger's warnings to ``log`` while a block runs (they are silenced otherwise).

    Used for diffusers' "part of your input was truncated" warning, which names the dropped text.
    """

    class Handler(logging.Handler):
        def emit(self, record):
            log(f"warning: {record.getMessage()}")

    logger = logging.getLogger(logger_name)
    saved = (logger.level, logger.propagate)
    handler = Handler(logging.WARNING)
    logger.setLevel(logging.WARNING)
    logger.propagate = False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
