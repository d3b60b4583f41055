"""The run context (device, dtype, VRAM budget, model, callbacks) resolved once at the edge; freeing a stage's
model before the next one loads. Nothing here changes process-wide state: that is the edge's (``process``)."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from pixart_cli.errors import EXIT_RUNTIME, PixartError
from pixart_cli.models.source import Model

Progress = Callable[[str, int, int], None]
Log = Callable[[str], None]

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


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


@dataclass
class RunContext:
    """Everything a stage needs besides its own inputs, resolved once: stages never parse CLI strings.

    ``vram`` is the --vram budget in bytes (None: auto, the device's free memory less a margin, measured when
    each stage plans, after the previous stage's model is gone). ``progress(stage, done, total)``, ``log(line)``
    and ``reports`` (a list each stage appends its memory report to) are optional.
    """

    device: Any  # torch.device
    dtype: Any  # torch.dtype
    model: Model
    vram: int | None = None
    progress: Progress | None = None
    log: Log | None = None
    reports: list | None = field(default=None)
    loras: tuple = ()  # lora_file.LoraWeights, read at the edge; fused into the transformer where it loads (denoise)
    settle: Callable[[], None] | None = None  # after each stage's collection (the edge passes process.settle)

    @classmethod
    def resolve(
        cls, model: Model | str, device: str = "auto", dtype: str = "auto", vram: int | None = None, **callbacks
    ) -> RunContext:
        """Build a context from the user's words: ``model`` a Model (or a folder / hub id), ``device`` auto, cpu,
        cuda, cuda:N or mps, ``dtype`` auto, fp32, fp16 or bf16, ``vram`` a budget in bytes (``memory.parse_vram``)
        or None for auto."""
        torch_device = resolve_device(device)
        if torch_device.type == "cuda":
            initialise_in_background(torch_device)
        context = cls(
            torch_device,
            resolve_dtype(dtype, torch_device),
            model if isinstance(model, Model) else Model(model),
            vram,
            **callbacks,
        )
        if vram is not None and torch_device.type != "cuda":
            # budgets are for CUDA memory; CPU and MPS share system RAM
            context.note(f"--vram {vram / 2**30:g}GB is ignored on {torch_device.type.upper()}")
        return context

    def with_model(self, model: Model) -> RunContext:
        return replace(self, model=model)

    @property
    def dtype_name(self) -> str:
        return dtype_name(self.dtype)

    def budget(self) -> tuple[int | None, int]:
        """(budget in bytes, or None off CUDA; CUDA context bytes), measured now."""
        from pixart_cli.models.memory import device_budget

        return device_budget(self.vram, self.device)

    def note(self, line: str) -> None:
        if self.log is not None:
            self.log(line)

    def advance(self, stage: str, done: int, total: int) -> None:
        if self.progress is not None:
            self.progress(stage, done, total)

    def meter(self, stage: str):
        from pixart_cli.models.memory import Meter

        return Meter(stage, self.device)

    def free(self) -> None:
        free(self.device, self.settle)


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


def initialise_in_background(device) -> None:
    """Start CUDA's initialisation (the driver, the device's context, torch's lazy init) on a thread, so that it
    runs while this process imports the libraries its stage needs and reads the model's headers; the first CUDA
    call of the stage waits for it (torch's own lock). A failure here is left for that call to report."""
    import threading

    import torch

    def initialise() -> None:
        try:
            torch.cuda.init()
            torch.cuda.synchronize(device)
        except Exception:  # the stage's first CUDA call raises it again, with the edge's line
            pass

    threading.Thread(target=initialise, name="pixart-cuda-init", daemon=True).start()


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


def free(device, settle: Callable[[], None] | None = None) -> None:
    """Return a dropped model's memory to the device, so the next stage starts from zero."""
    gc.collect()  # a model in reference cycles (diffusers' hook registries point back at their module)
    if settle is not None:
        settle()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()


def check_finite(latents, dtype_name: str) -> None:
    """NaN or inf made at run time (fp16 overflow, a bad LoRA) would decode to a black image: fail instead."""
    import torch

    if not bool(torch.isfinite(latents).all()):
        advice = "try --dtype bf16 or fp32" if dtype_name == "fp16" else "check the model and any LoRA"
        raise PixartError(f"denoising produced NaN or inf values (numeric overflow); {advice}", EXIT_RUNTIME)
