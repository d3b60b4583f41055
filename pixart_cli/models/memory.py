"""VRAM budgets, the plan each stage picks under one, and peak-memory measurement.

Sizes are in bytes; "GB" on the command line means GiB (2**30), the unit nvidia-smi's MiB add up to.
A budget counts everything this process holds on the device: the CUDA context plus PyTorch's reserved memory.
The estimates are weights (exact, counted from the model config on the meta device) plus activations
(a per-element factor, calibrated on the full-size model in benchmarks/ and written next to each constant).
"""

from __future__ import annotations

import re
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail

GIB = 2**30
MIN_VRAM = 256 * 2**20
MAX_VRAM = 2**50
AUTO_MARGIN = int(0.5 * GIB)  # left free under --vram auto, for the allocator's fragmentation and other apps
CONTEXT_ESTIMATE = int(0.6 * GIB)  # CUDA context before we can measure it (0.61 GB on H100/H200)

# Activation factors, measured on the full-size PixArt-XL-2-1024-MS (benchmarks/bench.py):
T5_ACTIVATIONS_PER_TOKEN = 8  # encode activations ≈ 8 x tokens x d_ff x dtype size
DIT_ACTIVATIONS_PER_TOKEN = 40  # activations of one sample ≈ 40 x tokens x hidden x dtype size
# A ControlNet adds, beside the base's hidden states, the control stream, its skip and the embedded control latents
# (three tokens x hidden tensors per sample, rounded up to 4); its copies' own activations are a base block's and
# come one at a time. From the structure (models/controlnet.py), not measured.
CONTROL_ACTIVATIONS_PER_TOKEN = 4
VAE_ACTIVATIONS_PER_PIXEL = 18  # full decode ≈ 18 x block_out_channels[0] x H x W x dtype size
VAE_TILES = (512, 256, 128)
# Texts per T5 call: a resident T5 gains nothing from more; a streamed one reads its weights once per call.
T5_BATCH = 16
STREAMED_T5_BATCH = 256
# Images per transformer call without a device budget (CPU, MPS): larger batches are no faster there.
UNBUDGETED_BATCH = 8  # tile sides tried, largest first (pixels)
QUANTIZE_OVERHEAD = int(0.3 * GIB)  # bitsandbytes' load-time staging: 8-bit T5 measured 0.3 GB over its weights


def parse_vram(text: str | None) -> int | None:
    """'8GB' / '3.5G' / '512MB' / 'auto' -> bytes (None for auto)."""
    if text is None or text.strip().lower() == "auto":
        return None
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([GM])(?:i?B)?\s*", text, re.IGNORECASE)
    if not match:
        raise PixartError(f"--vram {text!r}: not a size; use auto, or a size such as 8GB, 3GB or 512MB")
    value = float(match.group(1)) * (GIB if match.group(2).upper() == "G" else 2**20)
    if value < MIN_VRAM:
        raise PixartError(f"--vram {text}: too small to run anything; give at least 256MB")
    if value > MAX_VRAM:  # also catches digits that overflow a float
        raise PixartError(
            f"--vram {text}: larger than any device ({MAX_VRAM // 2**40} TB); give the card's size or auto"
        )
    return int(value)


@dataclass(frozen=True)
class Plan:
    """How one stage runs under a budget. ``estimate`` is the expected device peak incl. the CUDA context."""

    stage: str
    name: str
    estimate: int
    budget: int | None
    tile: int | None = None  # VAE tile side in pixels, for tiled decode
    batch: int | None = None  # images per transformer call, for denoise

    @property
    def fits(self) -> bool:
        return self.budget is None or self.estimate <= self.budget

    def describe(self) -> str:
        extra = f", tile {self.tile}px" if self.tile else ""
        if self.batch:
            extra += f", up to {self.batch} texts per call" if self.stage == "encode" else f", batch {self.batch}"
        if self.budget is None:
            return f"{self.stage}: plan {self.name}{extra} (no device budget on this device)"
        text = (
            f"{self.stage}: plan {self.name}{extra} (estimated peak {self.estimate / GIB:.2f} GB, "
            f"budget {self.budget / GIB:.2f} GB)"
        )
        if not self.fits:
            text += "; no plan fits the budget, this is the smallest and may run out of memory"
        return text


def device_budget(budget: int | None, device) -> tuple[int | None, int]:
    """(budget in bytes or None on CPU/MPS, CUDA context size) for a parsed --vram value (None: auto, the free
    memory less a margin) on a device."""
    if device.type != "cuda":
        return None, 0
    import torch

    free, total = torch.cuda.mem_get_info(device)
    # What the device holds beyond PyTorch's own pool: our CUDA context (and any other process's memory).
    context = max(total - free - torch.cuda.memory_reserved(device), 0)
    if budget is None:
        return context + free - AUTO_MARGIN, context
    return budget, context


def parameter_bytes(model) -> int:
    """Bytes of a (meta or real) model's parameters and buffers, each tied tensor counted once."""
    tensors = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def meta_model(builder, config, dtype, cpu_buffers: bool = False, where: str = "the model"):
    """Instantiate ``builder(config)`` on the meta device in ``dtype``: exact sizes, no weights, no memory.

    ``cpu_buffers``: compute buffers on the CPU (parameters still go to meta, as diffusers' own loading does).
    For models that compute buffers at construction (PixArt's sin-cos position table): factory functions such
    as ``arange`` on the meta device run through torch's reference decompositions, which import
    torch._dynamo, seconds of a stage process (issue 10).
    ``where`` names the config in the one line a config that cannot be built gives (its fields are within bounds
    already, models/configs.py, but a value of the wrong kind still fails inside the library).
    """
    import torch

    from pixart_cli.models.facade import LOCK

    with LOCK:
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            if cpu_buffers:
                from accelerate import init_empty_weights

                with init_empty_weights(include_buffers=False):
                    return builder(config)
            with torch.device("meta"):
                return builder(config)
        except PixartError:
            raise
        except Exception as error:
            raise PixartError(
                f"{where}: cannot build the model from it ({type(error).__name__}: {detail(error)}); the model "
                "folder is damaged or not a PixArt model",
                EXIT_RUNTIME,
            ) from error
        finally:
            torch.set_default_dtype(previous)


def plan_encode(
    budget: int | None,
    context: int,
    t5_bytes: int,
    block_bytes: int,
    embedding_bytes: int,
    texts: int,
    max_length: int,
    d_ff: int,
    dtype_size: int,
    precision: str = "full",
    quantizable_bytes: int = 0,
) -> Plan:
    """Resident T5 when it fits; else stream it block by block. 8bit/4bit only when asked for.
    ``batch`` is the number of texts per T5 call.

    A streamed T5 reads all of its weights once per call, so it takes as many texts per call as the budget leaves
    room for (up to ``STREAMED_T5_BATCH``); a resident one takes ``T5_BATCH``.
    ``quantizable_bytes``: the Linear weights bitsandbytes quantizes; the rest (embedding, norms, and T5's `wo`,
    which transformers keeps in fp32) stays as it is, so 8-bit T5-XXL still holds ~7.4 GB (8.29 GB peak
    measured on an H100, 2026-11-26).
    """

    def activations(batch: int) -> int:
        return T5_ACTIVATIONS_PER_TOKEN * batch * max_length * d_ff * dtype_size

    batch = min(texts, T5_BATCH)
    if precision != "full":
        shrink = {"8bit": 2, "4bit": 4}[precision] * 2 // dtype_size  # bytes of fp16/bf16 -> 1 or 1/2 byte
        weights = t5_bytes - quantizable_bytes + quantizable_bytes // shrink
        return Plan(
            "encode",
            f"resident-{precision}",
            context + weights + QUANTIZE_OVERHEAD + activations(batch),
            budget,
            batch=batch,
        )
    resident = context + t5_bytes + activations(batch)
    if budget is None or resident <= budget:
        return Plan("encode", "resident", resident, budget, batch=batch)
    weights = context + embedding_bytes + 2 * block_bytes
    room = budget - weights
    per_text = activations(1)
    batch = max(1, min(texts, STREAMED_T5_BATCH, room // per_text if room > 0 else 1))
    return Plan("encode", "streamed", weights + activations(batch), budget, batch=batch)


def plan_denoise(
    budget: int | None,
    context: int,
    transformer_bytes: int,
    tokens_per_sample: int,
    hidden: int,
    dtype_size: int,
    images: int,
    cfg: bool,
    adapter_bytes: int = 0,
    adapter_blocks: int = 0,
    pag: bool = False,
    streamed_bytes: int | None = None,
) -> Plan:
    """Resident transformer with the largest batch that fits; streamed below its size, with the largest batch that
    fits beside the streamed plan's weights (``streamed_bytes``: all but the blocks, and two blocks; an eighth of
    the transformer when not given): the blocks are read once per pass, whatever the batch. Each image is one
    transformer row, two with classifier-free guidance, one more with perturbed-attention guidance.

    A ControlNet adapter of ``adapter_bytes`` in ``adapter_blocks`` copies is resident beside a resident
    transformer, and streamed with a streamed one, one copy on the device at a time (``controlnet.stream_adapter``);
    its activations are ``CONTROL_ACTIVATIONS_PER_TOKEN`` more per token."""
    rows = (2 if cfg else 1) + (1 if pag else 0)
    per_token = DIT_ACTIVATIONS_PER_TOKEN + (CONTROL_ACTIVATIONS_PER_TOKEN if adapter_blocks else 0)
    per_image = per_token * tokens_per_sample * hidden * dtype_size * rows
    resident_weights = transformer_bytes + adapter_bytes
    if budget is None:  # CPU / MPS: batches bounded only so that a long list never allocates all at once
        batch = min(images, UNBUDGETED_BATCH)
        return Plan("denoise", "resident", context + resident_weights + per_image * batch, budget, batch=batch)
    room = budget - context - resident_weights
    if room >= per_image:
        batch = max(1, min(images, room // per_image))
        return Plan("denoise", "resident", context + resident_weights + per_image * batch, budget, batch=batch)
    weights = (transformer_bytes // 8 if streamed_bytes is None else streamed_bytes) + (
        adapter_bytes // adapter_blocks if adapter_blocks else 0
    )
    room = budget - context - weights
    batch = max(1, min(images, room // per_image if room > 0 else 1))
    return Plan("denoise", "streamed", context + weights + per_image * batch, budget, batch=batch)


def plan_decode(
    budget: int | None, context: int, vae_bytes: int, first_channels: int, height: int, width: int, dtype_size: int
) -> Plan:
    """Full decode when it fits; else tiled decode with the largest tile that fits."""

    def estimate(h: int, w: int) -> int:
        return context + vae_bytes + VAE_ACTIVATIONS_PER_PIXEL * first_channels * h * w * dtype_size

    full = estimate(height, width)
    if budget is None or full <= budget:
        return Plan("decode", "full", full, budget)
    tiled = [
        Plan("decode", "tiled", estimate(min(tile, height), min(tile, width)), budget, tile=tile)
        for tile in VAE_TILES
        if tile < max(height, width)
    ] or [Plan("decode", "tiled", full, budget, tile=VAE_TILES[-1])]
    # the largest tile that fits, else the smallest tile there is
    return next((plan for plan in tiled if plan.fits), tiled[-1])


# --- measurement ---------------------------------------------------------------------------------------
def _rss() -> int:
    try:
        with open("/proc/self/statm") as handle:
            import os

            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class StageReport:
    """What one stage used: device peaks, the CUDA context, peak RSS, and seconds loading and computing."""

    stage: str
    plan: str = ""
    device: str = "cpu"
    load_s: float = 0.0
    compute_s: float = 0.0
    peak_allocated: int = 0
    peak_reserved: int = 0
    context: int = 0
    peak_rss: int = 0

    def as_dict(self) -> dict:
        gb = lambda n: round(n / GIB, 3)  # noqa: E731
        return {
            "stage": self.stage,
            "plan": self.plan,
            "device": self.device,
            "load_s": round(self.load_s, 3),
            "compute_s": round(self.compute_s, 3),
            "peak_allocated_gb": gb(self.peak_allocated),
            "peak_reserved_gb": gb(self.peak_reserved),
            "cuda_context_gb": gb(self.context),
            "peak_device_gb": gb(self.peak_reserved + self.context),
            "peak_rss_gb": gb(self.peak_rss),
        }

    def describe(self) -> str:
        d = self.as_dict()
        device = (
            f"device peak {d['peak_device_gb']:.2f} GB (reserved {d['peak_reserved_gb']:.2f} + context "
            f"{d['cuda_context_gb']:.2f}; allocated {d['peak_allocated_gb']:.2f}), "
            if self.context
            else ""
        )
        return (
            f"{self.stage}: {device}RSS peak {d['peak_rss_gb']:.2f} GB, load {self.load_s:.2f} s, "
            f"compute {self.compute_s:.2f} s"
        )


class Meter:
    """Measures one stage: wrap loading in ``meter.phase("load")`` and the work in ``meter.phase("compute")``,
    then ``finish(plan)``. Peak RSS is sampled every 20 ms by a background thread."""

    def __init__(self, stage: str, device):
        self.report = StageReport(stage, device=str(device))
        self.device = device
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_rss, daemon=True)
        if device.type == "cuda":
            import torch

            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            free, total = torch.cuda.mem_get_info(device)
            self.report.context = max(total - free - torch.cuda.memory_reserved(device), 0)
        self.report.peak_rss = _rss()
        self._thread.start()

    def _sample_rss(self) -> None:
        while not self._stop.wait(0.02):
            self.report.peak_rss = max(self.report.peak_rss, _rss())

    @contextmanager
    def phase(self, name: str):
        """Add the block's wall time (device work included) to ``load_s`` or ``compute_s``."""
        started = time.perf_counter()
        yield
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)
        field_name = f"{name}_s"
        setattr(self.report, field_name, getattr(self.report, field_name) + time.perf_counter() - started)

    def finish(self, plan: str, reports: list | None = None) -> StageReport:
        """Stop measuring; the report is appended to ``reports`` when one is given."""
        self.report.plan = plan
        self._stop.set()
        self._thread.join()
        self.report.peak_rss = max(self.report.peak_rss, _rss())
        if self.device.type == "cuda":
            import torch

            self.report.peak_allocated = torch.cuda.max_memory_allocated(self.device)
            self.report.peak_reserved = torch.cuda.max_memory_reserved(self.device)
        if reports is not None:
            reports.append(self.report)
        return self.report
