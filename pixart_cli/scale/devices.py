"""Every local GPU from one process: ``pixart generate --devices all`` (or ``0,1``, or ``cpu,cpu`` for tests).

One process pays its start once (imports, CUDA, the model's configs) and runs T5 once for every prompt of the job;
then one worker thread per device takes units of images from a shared queue. A unit runs the same denoise and
decode stage functions as a single process, on that device's own run context, and is written (and recorded in the
manifest) as it finishes. Image i keeps its prompt, seed + i and file name, so the images are those of one GPU.

A failure on one device stops the others at their next step and ends the run with one line naming the device; a
signal stops every worker at its next step. Units finished before either are on disk and in the manifest.
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import replace

from pixart_cli.errors import EXIT_RUNTIME, PixartError, Terminated
from pixart_cli.scale.job import IMAGES_PER_PASS, Callbacks, Job, RunOptions, passes, write_images
from pixart_cli.settings import DenoiseSettings, EncodeSettings

DEVICES_ENV = "PIXART_DEVICES"
UNITS_PER_DEVICE = 2  # units smaller than a device's share, so that devices of unequal speed finish close together


class _Stopped(BaseException):
    """Raised inside a worker at its next step once the run is stopping (another device failed, or a signal)."""


def parse_devices(text: str | None) -> list[str] | None:
    """``--devices`` (or $PIXART_DEVICES): ``all`` (every visible CUDA device), ``0,1`` (CUDA indices) or device
    names (``cuda:0,cuda:1``, ``cpu,cpu``). None: not given. Checked without importing torch, except for ``all``."""
    from pixart_cli.runtime import check_device

    if text is None:
        text = os.environ.get(DEVICES_ENV)
        flag = DEVICES_ENV
    else:
        flag = "--devices"
    if text is None:
        return None
    words = [word.strip() for word in text.split(",")]
    if words == ["all"]:
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PixartError(f"{flag} all: no CUDA device is visible here; use --device cpu, or name devices")
        return [f"cuda:{index}" for index in range(count)]
    devices = []
    for word in words:
        if word.isascii() and word.isdigit():
            word = f"cuda:{int(word)}"
        if word in ("", "auto") or not (word == "cpu" or word.startswith("cuda:")):
            raise PixartError(f"{flag} {text!r}: name devices as all, 0,1 or cuda:0,cuda:1 (cpu,cpu for a test)")
        devices.append(check_device(word))
    if len(devices) < 2:
        raise PixartError(f"{flag} {text!r}: give two or more devices (one device is --device {devices[0]})")
    return devices


def labels(devices: list[str]) -> list[str]:
    """How each worker is named in the run's lines, once at their start: its device, numbered where a device is
    named more than once (``cpu #1``, ``cpu #2``)."""
    numbers: dict[str, int] = {}
    named = []
    for device in devices:
        numbers[device] = numbers.get(device, 0) + 1
        named.append(device if devices.count(device) == 1 else f"{device} #{numbers[device]}")
    return named


def _prefixed(log, prefix: str):
    return None if log is None else (lambda message: log(prefix + message))


def unit_size(images: int, devices: int) -> int:
    """Images per unit: at most a pass, and small enough that every device gets several units."""
    return max(1, min(IMAGES_PER_PASS, -(-images // (devices * UNITS_PER_DEVICE))))


def run_devices(
    job: Job,
    todo: list[int],
    seed: int,
    model,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    run: RunOptions,
    devices: list[str],
    callbacks: Callbacks,
) -> int:
    """Make images ``todo`` of ``job`` on ``devices``, one worker thread each; returns how many were written."""
    from pixart_cli.files import staged
    from pixart_cli.plan import plan_denoise, plan_run
    from pixart_cli.stages.decode import decode
    from pixart_cli.stages.denoise import denoise
    from pixart_cli.stages.encode import encode

    if not todo:
        return 0
    log = callbacks.log or (lambda message: None)
    names = labels(devices)
    lock = threading.Lock()  # what workers report: paths, progress, failures
    writing = threading.Lock()  # one unit written at a time (image_io's writer threads report under `lock`)
    stopping = threading.Event()
    written: list[int] = []
    failures: list[tuple[str, BaseException]] = []

    def wrote(path) -> None:
        with lock:
            written.append(1)
            if callbacks.wrote is not None:
                callbacks.wrote(path)

    signals: list[BaseException] = []

    def progress_of(name: str):
        def progress(stage: str, done: int, total: int) -> None:
            if stopping.is_set():
                raise _Stopped()
            if callbacks.progress is not None:
                with lock:
                    callbacks.progress(f"{name}: {stage}", done, total)

        return progress

    # 1. Every check the configs can tell (the LoRAs' fit included); the units of images, each line naming its device
    plan_run(job.prompts[:1], encoding, replace(denoising, seed=seed, num_images=1), model, loras=run.loras)
    units: queue.Queue = queue.Queue()
    for unit in passes(todo, unit_size(len(todo), len(devices))):
        units.put(unit)
    log(f"devices: {', '.join(names)}; {units.qsize()} unit(s) of up to {unit_size(len(todo), len(devices))} images")

    # 2. T5 once for every prompt of the job, on the first device
    first = run.context(
        model, replace(callbacks, log=_prefixed(callbacks.log, f"{names[0]}: "), progress=None), device=devices[0]
    )
    prompts = list(dict.fromkeys(job.prompts[index] for index in todo))
    embeddings = encode(prompts, encoding, first)
    row_of = {prompt: row for row, prompt in enumerate(prompts)}
    del first

    # 3. One worker per device over the shared queue of units
    def work(device: str, name: str) -> None:
        try:
            worker = Callbacks(None, _prefixed(callbacks.log, f"{name}: "), progress_of(name), None, callbacks.settle)
            ctx = run.context(model, worker, device=device)
            while not stopping.is_set():
                try:
                    start, stop = units.get_nowait()
                except queue.Empty:
                    return
                rows = [row_of[job.prompts[index]] for index in range(start, stop)]
                part = staged.Embeddings(
                    *(tensor[rows] for tensor in embeddings.tensors().values()),
                    meta={**embeddings.meta, "prompts": [job.prompts[index] for index in range(start, stop)]},
                )
                planned = plan_denoise(replace(denoising, seed=seed + start, num_images=1), ctx.model, len(rows))
                latents = denoise(part, planned, ctx)
                images = decode(latents, ctx, batch_size=denoising.batch_size)
                with writing:  # one unit at a time: its manifest lines and stdout paths stay together
                    write_images(job, start, images, latents.meta, wrote)
        except _Stopped:
            return
        except (KeyboardInterrupt, Terminated) as error:  # a signal that waited for a write in this thread
            signals.append(error)
            stopping.set()
        except BaseException as error:  # reported once, by the main thread
            with lock:
                failures.append((name, error))
            stopping.set()

    threads = [
        threading.Thread(target=work, args=(device, name), name=f"pixart-{name}")
        for device, name in zip(devices, names)
    ]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.2)
    except BaseException:  # a signal: every worker stops at its next step; what they finished stays
        stopping.set()
        for thread in threads:
            thread.join()
        raise
    if signals:
        raise signals[0]
    if failures:
        device, error = failures[0]
        if isinstance(error, PixartError):
            raise PixartError(f"{device}: {error}", error.exit_code) from error
        from pixart_cli.errors import detail

        raise PixartError(f"{device}: {type(error).__name__}: {detail(error)}", EXIT_RUNTIME) from error
    return len(written)
