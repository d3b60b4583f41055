"""`pixart generate --ray`: the three stages as Ray Data stages, each an actor pool with its own GPU share.

    units (contiguous runs of image indices) -> encode (T5) -> denoise (transformer) -> decode + write (VAE)

A unit is up to ``IMAGES_PER_UNIT`` consecutive images, so one stage call needs only the unit's first seed and
makes exactly the images a single process would (same prompts, seeds, file names). Each actor calls the same
stage function as ``pixart encode`` / ``denoise`` / ``decode``; the stages stream, so T5 encodes unit k+1 while
the transformer denoises unit k and the VAE decodes unit k-1. Tensors travel between actors as .npz bytes
(numpy, no pickle). The decode actor writes the images; the driver alone appends the manifest lines and prints
the paths, as results arrive.

Ray is imported only here, and only for --ray. Actors that die (a lost node) are restarted and their batch
retried: Ray Data's default for actor pools. An error in pixart's own code is not retried; it ends the run with
its one-line message.
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

from pixart_cli import manifest
from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail
from pixart_cli.scaleout import Callbacks, Job, RunOptions, passes, write_images
from pixart_cli.settings import DenoiseSettings, EncodeSettings

INSTALL = 'pip install "pixart-cli[ray]"'
IMAGES_PER_UNIT = 16  # small enough for the stages to overlap, large enough to amortize each stage's model load
# Share of one GPU per stage actor; one actor of each stage per GPU. A stage's --vram budget is its share of the
# per-GPU budget, so the three actors on a card stay within --vram together.
GPU_SHARES = {"encode": 0.2, "denoise": 0.4, "decode": 0.4}
FORWARDED_ENV = ("PIXART_MODEL", "PIXART_BASE_MODEL", "PIXART_CACHE", "PIXART_DEBUG", "HF_HUB_OFFLINE")


def import_ray():
    """Ray, or exit 2 with the install command."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise PixartError(f"--ray: Ray Data is not installed; install it with: {INSTALL}") from None
    return ray


def run_ray(
    job: Job,
    todo: list[int],
    seed: int,
    model,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    run: RunOptions,
    address: str | None,
    callbacks: Callbacks,
) -> int:
    """Make images ``todo`` of ``job`` on Ray; append their manifest lines and report each path. Returns the count."""
    ray = import_ray()
    device = run.device
    units = [
        {"start": start, "stop": stop, "prompts": json.dumps(job.prompts[start:stop])}
        for start, stop in passes(todo, IMAGES_PER_UNIT)
    ]
    if not units:
        return 0
    address = os.environ.get("RAY_ADDRESS") if address is None else address
    _init(ray, address)
    log = callbacks.log or (lambda message: None)
    gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
    log(
        f"ray: {'cluster ' + address if address else 'local Ray'}, {len(units)} unit(s) of up to {IMAGES_PER_UNIT} "
        f"images, " + (f"{gpus} GPU(s), one actor per stage per GPU" if gpus else "CPU only, one actor per stage")
    )

    def pool(stage: str) -> dict:
        """map_batches arguments for one stage's actor pool."""
        from ray.data import ActorPoolStrategy

        if gpus:
            return {"compute": ActorPoolStrategy(size=gpus), "num_gpus": GPU_SHARES[stage]}
        return {"compute": ActorPoolStrategy(size=1), "num_cpus": 1}

    # Each actor resolves its own run context on its worker: the model by id (a hub id or an absolute folder).
    stage_args = {
        "job": job,
        "seed": seed,
        "model": (model.id, model.revision),
        "encoding": encoding,
        "denoising": denoising,
        "run": RunOptions("cuda" if gpus else device, run.dtype, run.vram, run.loras),
        "gpu": bool(gpus),
    }
    dataset = ray.data.from_items(units)
    for stage, actor in (("encode", EncodeActor), ("denoise", DenoiseActor), ("decode", DecodeActor)):
        dataset = dataset.map_batches(
            actor, batch_size=1, fn_constructor_kwargs={**stage_args, "stage": stage}, **pool(stage)
        )
    written = 0
    if callbacks.progress:
        callbacks.progress("ray", 0, len(todo))
    try:
        for row in dataset.iter_rows():
            for line in json.loads(row["lines"]):
                manifest.append(job.folder, line)
            for path in json.loads(row["paths"]):
                callbacks.wrote(Path(path))
                written += 1
            if callbacks.progress:
                callbacks.progress("ray", written, len(todo))
    except Exception as error:
        raise _unwrap(error) from error  # the chain shows with PIXART_DEBUG=1
    return written


def _init(ray, address: str | None) -> None:
    """Join ``address``, or start an embedded Ray on this machine; quiet, so stdout keeps only paths."""
    if ray.is_initialized():
        return
    # Ray's C++ core logs advisories at error level on stderr (e.g. that actor constructor arguments live in the
    # object store); pixart's stderr is for people and scripts, and real failures come back as exceptions.
    if os.environ.get("PIXART_DEBUG") != "1":
        os.environ.setdefault("RAY_BACKEND_LOG_LEVEL", "fatal")
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    common = {
        "include_dashboard": False,
        "log_to_driver": False,
        "logging_level": logging.ERROR,
        "runtime_env": {"env_vars": env},
    }
    try:
        if address:
            ray.init(address=address, **common)
        else:
            # Stage actors take one logical CPU each; a 2-core machine still runs all three stages at once.
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), **common)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise PixartError(
            f"--ray-address {address}: cannot join the Ray cluster ({detail(error)}); start one with "
            "`ray start --head`, or leave out --ray-address and RAY_ADDRESS for a local Ray",
            EXIT_RUNTIME,
        ) from None
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # pixart shows its own progress
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution notes and the progress-bar advisory


def _unwrap(error: BaseException) -> BaseException:
    """The PixartError an actor raised, if one did; else one line naming the actor's own exception."""
    seen, innermost = error, error
    for _ in range(10):
        if isinstance(seen, PixartError):
            return seen
        innermost = seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return PixartError(
        f"Ray run failed: {type(innermost).__name__}: {detail(innermost)} (run with PIXART_DEBUG=1 for the traceback)",
        EXIT_RUNTIME,
    )


# --- the stage actors (built by Ray Data on the workers) ----------------------------------------------------
class _StageActor:
    """One stage's actor: the stage function of ``pixart <stage>``, with the run's settings and its own context."""

    def __init__(
        self,
        job: Job,
        seed: int,
        model: tuple,
        encoding: EncodeSettings,
        denoising: DenoiseSettings,
        run: RunOptions,
        gpu: bool,
        stage: str,
    ):
        from pixart_cli import runtime
        from pixart_cli.models import Model

        runtime.quiet_libraries()
        runtime.lean_imports(encoding.precision != "full")
        self.job, self.seed, self.encoding, self.denoising = job, seed, encoding, denoising
        vram = _stage_vram(run.vram, GPU_SHARES[stage]) if gpu else run.vram
        self.ctx = run.context(Model(*model), Callbacks(None, None, None, None), vram=vram)


class EncodeActor(_StageActor):
    def __call__(self, batch: dict) -> dict:
        from pixart_cli.encode import encode

        packed = []
        for prompts in batch["prompts"]:
            embeddings = encode(json.loads(prompts), self.encoding, self.ctx)
            packed.append(_pack(embeddings.tensors(), embeddings.meta))
        return {"start": batch["start"], "stop": batch["stop"], "payload": packed}


class DenoiseActor(_StageActor):
    def __call__(self, batch: dict) -> dict:
        from dataclasses import replace

        from pixart_cli import artifacts
        from pixart_cli.denoise import denoise

        packed = []
        for start, payload in zip(batch["start"], batch["payload"]):
            tensors, meta = _unpack(payload)
            embeddings = artifacts.Embeddings(**tensors, meta=meta)
            settings = replace(self.denoising, seed=self.seed + int(start), num_images=1)
            latents = denoise(embeddings, settings, self.ctx)
            packed.append(_pack(latents.tensors(), latents.meta))
        return {"start": batch["start"], "stop": batch["stop"], "payload": packed}


class DecodeActor(_StageActor):
    def __call__(self, batch: dict) -> dict:
        from pixart_cli import artifacts
        from pixart_cli.decode import decode

        lines, paths = [], []
        for start, payload in zip(batch["start"], batch["payload"]):
            tensors, meta = _unpack(payload)
            images = decode(artifacts.Latents(tensors["latents"], meta), self.ctx, batch_size=self.denoising.batch_size)
            written = []
            unit_lines = write_images(self.job, int(start), images, meta, written.append, append=False)
            lines.append(json.dumps(unit_lines))
            paths.append(json.dumps([str(path) for path in written]))
        return {"lines": lines, "paths": paths}


def _stage_vram(budget: int | None, share: float) -> int:
    """A stage actor's budget in bytes: its share of the per-GPU budget (--vram, or the whole card for auto)."""
    import torch

    from pixart_cli.memory import MIN_VRAM

    if budget is None:
        budget = torch.cuda.mem_get_info()[1]
    return max(int(budget * share), MIN_VRAM)


def _pack(tensors: dict, meta: dict) -> bytes:
    """Tensors and plain meta as .npz bytes (bf16 travels as fp32, exactly, and comes back as bf16)."""
    import numpy as np
    import torch

    arrays = {
        key: (value.float() if value.dtype == torch.bfloat16 else value).cpu().numpy() for key, value in tensors.items()
    }
    arrays["meta"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    arrays["bf16"] = np.array([key for key, value in tensors.items() if value.dtype == torch.bfloat16] or [""])
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _unpack(payload: bytes) -> tuple[dict, dict]:
    import numpy as np
    import torch

    with np.load(io.BytesIO(payload), allow_pickle=False) as data:
        bf16 = set(data["bf16"].tolist())
        meta = json.loads(data["meta"].tobytes().decode())
        tensors = {key: torch.from_numpy(data[key].copy()) for key in data.files if key not in ("meta", "bf16")}
    return {key: value.to(torch.bfloat16) if key in bf16 else value for key, value in tensors.items()}, meta
