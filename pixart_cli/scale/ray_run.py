"""`pixart generate --ray`: Ray Data spreads the images over one actor per GPU (any GPU of the cluster).

    units (contiguous runs of image indices) -> actor: encode (T5) -> denoise (transformer) -> decode + write (VAE)

A unit is a contiguous run of images, so a call needs only the unit's first seed and makes exactly the images a
single process would (same prompts, seeds, file names). Each actor holds one whole GPU and runs the three
stages of `pixart generate` in sequence on each unit, under the run's --vram, freeing each model before the
next loads: the same memory plans, hence the same pixels, as one process.

Why not one actor pool per stage sharing each GPU (measured on 2 H200s, 2026-11-28, 64 prompts, --vram 8GB):
three stages at once on a card split its 8 GB, so the VAE got 3.2 GB and decoded in tiles (max pixel difference
66 from the one-process images), the transformer ran small batches, and each stage reloaded its model per
unit: 0.56x the throughput of one GPU.

This module runs in the run's Ray driver, a process of its own (scale/ray_driver.py), so that nothing Ray prints
reaches pixart's stdout and a driver that Ray ends (its raylet died) still gets its one-line account. The decode
step writes the images and appends their manifest lines as each lands (as ranks do), so the manifest is true
whatever ends the driver; the driver reports the paths as results arrive. Ray is imported only here, and only for
--ray. Actors that die are restarted and their unit retried (Ray Data's default for actor pools), those of a lost
node too, once the pool has a place for them; when the cluster holds nothing an actor can run on (every GPU node
lost) for the run's node wait, the driver says so and the run ends with its account. An error in pixart's own
code is not retried; it ends the run with its one-line message and exit code (the actor returns it with the
unit's results).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail
from pixart_cli.scale import manifest
from pixart_cli.scale.job import IMAGES_PER_PASS, Callbacks, Job, RunOptions, make_pass, passes
from pixart_cli.settings import DenoiseSettings, EncodeSettings

INSTALL = 'pip install "pixart-cli[ray]"'
FORWARDED_ENV = ("PIXART_MODEL", "PIXART_BASE_MODEL", "PIXART_CACHE", "PIXART_DEBUG", "HF_HUB_OFFLINE")


def import_ray():
    """Ray, or exit 2 with the install command."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise PixartError(f"--ray: Ray Data is not installed; install it with: {INSTALL}") from None
    return ray


class RayLost(Exception):
    """Ray ended the run (a node or the cluster lost, a Ray error): the reason, told with the run's account."""


def run_ray(
    job: Job,
    todo: list[int],
    seed: int,
    model: tuple,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    run: RunOptions,
    address: str | None,
    callbacks: Callbacks,
    new_manifest: bool = False,
    temp_tag: str = "",
    node_wait: float = 60.0,
    on_lost: Callable[[str], None] | None = None,
) -> int:
    """Make images ``todo`` of ``job`` on Ray; report each path. Returns the count. ``model``: (id, revision), the
    model each actor loads. ``new_manifest``: start the folder's manifest again once Ray is up (a run without
    --resume). ``temp_tag``: the actors' temp files carry it. ``on_lost(reason)``: told once when the cluster has
    held nothing an actor can run on for ``node_wait`` seconds (the caller then stops this run). A Ray failure
    raises RayLost."""
    ray = import_ray()
    device = run.device
    if not todo:
        return 0
    address = os.environ.get("RAY_ADDRESS") if address is None else address
    started_here = not ray.is_initialized()
    _init(ray, address)
    try:
        if new_manifest:
            manifest.start_new(job.folder)
        log = callbacks.log or (lambda message: None)
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        # one actor per GPU; without GPUs, one per node (each process's torch uses its node's cores)
        actors = gpus or max(1, len([node for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU")]))
        size = unit_size(len(todo), actors)
        units = [
            {"start": start, "stop": stop, "prompts": json.dumps(job.prompts[start:stop])}
            for start, stop in passes(todo, size)
        ]
        log(
            f"ray: {'cluster ' + address if address else 'local Ray'}, {len(units)} unit(s) of up to {size} images, "
            + (f"{gpus} GPU(s), one actor per GPU" if gpus else f"CPU only, one actor per node ({actors})")
        )
        from ray.data import ActorPoolStrategy

        # The actors' job names each file by its absolute path: a joined cluster's workers run in their node's
        # folder, not in this one (-o out/ is this folder's out/); the paths are reported as the job names them.
        placed = replace(
            job,
            paths=[Path(os.path.abspath(path)) for path in job.paths],
            folder=None if job.folder is None else Path(os.path.abspath(job.folder)),
        )
        named = {str(path): given for path, given in zip(placed.paths, job.paths)}
        # Each actor resolves its own run context on its worker: the model by id (a hub id or an absolute folder).
        dataset = ray.data.from_items(units).map_batches(
            GenerateActor,
            batch_size=1,
            fn_constructor_kwargs={
                "job": placed,
                "seed": seed,
                "model": tuple(model),
                "encoding": encoding,
                "denoising": denoising,
                "run": RunOptions("cuda" if gpus else device, run.dtype, run.vram, run.loras),
                "temp_tag": temp_tag,
            },
            # One unit at a time per actor: otherwise the first actor up queues every unit and the other GPUs idle
            # (measured: 2 units on 2 H200s both ran on GPU 0). Ray Data spreads the actors over the nodes.
            compute=ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
            **({"num_gpus": 1} if gpus else {"num_cpus": 1}),
        )
        written, nodes = 0, set()
        if callbacks.progress:
            callbacks.progress("ray", 0, len(todo))
        watch = CapacityWatch(ray, "GPU" if gpus else "CPU", node_wait, on_lost)
        try:
            with watch:
                for row in dataset.iter_rows():
                    nodes.add(row["node"])
                    for path in json.loads(row["paths"]):
                        callbacks.wrote(named.get(path, Path(path)))
                        written += 1
                    if callbacks.progress:
                        callbacks.progress("ray", written, len(todo))
                    if row["error"]:
                        raise PixartError(row["error"], int(row["exit_code"]))
        except Exception as error:
            raise _unwrap(error) from error  # the chain shows with PIXART_DEBUG=1
        finally:
            if nodes:
                log(f"ray: the images were made on {len(nodes)} node(s)")
        return written
    finally:
        if started_here:
            # Here rather than in Ray's exit hook, which first sleeps 0.5 s for worker log lines (not forwarded
            # unless PIXART_DEBUG=1). A joined cluster is only disconnected from.
            ray.shutdown()


class CapacityWatch:
    """While the run's units come back: every second, the cluster's ``kind`` (GPU or CPU). Ray restarts an actor
    that died and retries its unit there; an actor whose node is gone is placed again once another actor of the
    pool is released (Ray Data releases idle actors when every unit is handed out), so a run that loses a node
    completes on what is left. When the cluster holds less than one actor needs (every GPU node lost), nothing can
    ever take the lost actor's unit: after ``wait`` seconds of that, ``on_lost`` is told once, and its caller stops
    the run (the account says what is complete)."""

    def __init__(self, ray, kind: str, wait: float, on_lost: Callable[[str], None] | None):
        self.ray, self.kind, self.wait, self.on_lost = ray, kind, wait, on_lost
        self.stop = threading.Event()

    def __enter__(self):
        if self.on_lost is not None:
            threading.Thread(target=self._watch, name="pixart-capacity", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()

    def _watch(self) -> None:
        short_since = None
        while not self.stop.wait(1.0):
            try:
                held = self.ray.cluster_resources().get(self.kind, 0)
            except Exception:  # the cluster itself gone: the driver hears it from Ray
                return
            now = time.monotonic()
            if held >= 1:
                short_since = None
            elif short_since is None:
                short_since = now
            elif now - short_since >= self.wait:
                self.on_lost(
                    f"Ray lost the run's nodes: the cluster has held no {self.kind} for {now - short_since:.0f} s, "
                    "and its actors need one each"
                )
                return


def unit_size(images: int, actors: int) -> int:
    """Images per unit: as few units as passes of ``IMAGES_PER_PASS`` allow (each unit streams T5 and loads each
    model once), in a multiple of ``actors`` so that every GPU gets the same share: 192 images on 2 GPUs are 4
    units of 48, not 64 + 64 on one GPU and 64 on the other."""
    rounds = -(-images // (actors * IMAGES_PER_PASS))
    return max(1, -(-images // (actors * rounds)))


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
        "log_to_driver": os.environ.get("PIXART_DEBUG") == "1",  # the workers' own output, for debugging
        "logging_level": logging.ERROR,
        "runtime_env": {"env_vars": env},
    }
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        if address:
            check_address(address)
            ray.init(address=address, **common)
        else:
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, 4), **common)
        # Ray's core installs its own SIGTERM handler below Python's (it prints a stack and exits 15): pixart's
        # go back in, so a SIGTERM ends the run as everywhere else (143, one line, the JSON document).
        for signum, handler in handlers.items():
            if callable(handler):
                signal.signal(signum, handler)
    except (ConnectionError, RuntimeError, ValueError) as error:
        raise _cannot_join(address, error) from None
    from ray.data import DataContext

    context = DataContext.get_current()
    context.enable_progress_bars = False  # pixart shows its own progress
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)  # its execution notes and the progress-bar advisory


def check_address(address: str | None) -> None:
    """One line (exit 1) when ``address`` is HOST:PORT and nothing answers there: ray.init waits minutes, silently,
    on a port where nothing listens. Called before the driver process starts, and again by it."""
    if not address:
        return
    try:
        _check_answers(address)
    except ConnectionError as error:
        raise _cannot_join(address, error) from None


def _cannot_join(address: str | None, error: BaseException) -> PixartError:
    return PixartError(
        f"--ray-address {address}: cannot join the Ray cluster ({detail(error)}); start one with "
        "`ray start --head`, or leave out --ray-address and RAY_ADDRESS for a local Ray",
        EXIT_RUNTIME,
    )


def _check_answers(address: str) -> None:
    """ConnectionError when a HOST:PORT address (or ray://HOST:PORT) takes no TCP connection within 10 s; other
    forms (``auto``) are left to Ray."""
    import socket

    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not (port.isascii() and port.isdigit()):
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except (OSError, ValueError) as error:
        raise ConnectionError(
            f"nothing answers at {host}:{port}: {getattr(error, 'strerror', None) or error}"
        ) from None


def _unwrap(error: BaseException) -> BaseException:
    """The PixartError an actor raised, if one did; else RayLost, naming the innermost exception (a Ray failure:
    an actor or node lost for good, the cluster gone; or an unexpected error in the actor)."""
    seen, innermost = error, error
    for _ in range(10):
        if isinstance(seen, PixartError):
            return seen
        innermost = seen
        seen = getattr(seen, "cause", None) or seen.__cause__
        if seen is None:
            break
    return RayLost(f"Ray lost the run ({type(innermost).__name__}: {detail(innermost)})")


# --- the actor (built by Ray Data on the workers) -------------------------------------------------------------
class GenerateActor:
    """One GPU's worker: `pixart generate`'s three stages on each unit, with the run's settings and its own context."""

    def __init__(
        self,
        job: Job,
        seed: int,
        model: tuple,
        encoding: EncodeSettings,
        denoising: DenoiseSettings,
        run: RunOptions,
        temp_tag: str = "",
    ):
        import ray

        from pixart_cli import process
        from pixart_cli.models.source import Model

        process.tag_temp_files(temp_tag)  # a unit cut short by this process's death leaves only the run's temps
        self.node = ray.get_runtime_context().get_node_id()
        process.quiet_libraries()
        process.lean_imports(encoding.precision != "full")
        process.compile_cache()
        self.job, self.seed, self.encoding, self.denoising = job, seed, encoding, denoising
        # pixart's own errors go back as data with the unit's results: raised, Ray Data would hand the driver only
        # its "UDF failed to process a data block", without the one-line message or the exit code.
        self.failure: PixartError | None = None
        try:
            self.ctx = run.context(Model(*model), Callbacks(None, None, None, None, process.settle))
        except PixartError as error:
            self.failure = error

    def __call__(self, batch: dict) -> dict:
        lines, paths, errors, codes = [], [], [], []
        for start, stop in zip(batch["start"], batch["stop"]):
            written, unit_lines, failure = [], [], self.failure
            if failure is None:
                try:
                    unit_lines = make_pass(
                        self.job,
                        int(start),
                        int(stop),
                        self.seed,
                        self.encoding,
                        self.denoising,
                        self.ctx,
                        Callbacks(written.append, None, None, None),
                    )  # each line appended as its image lands, as ranks do: true even when the driver is stopped
                except PixartError as error:
                    failure = error
            lines.append(json.dumps(unit_lines))
            paths.append(json.dumps([str(path) for path in written]))
            errors.append("" if failure is None else str(failure))
            codes.append(0 if failure is None else failure.exit_code)
        return {"lines": lines, "paths": paths, "error": errors, "exit_code": codes, "node": [self.node] * len(paths)}
