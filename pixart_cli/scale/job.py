"""A job: every image of a run as one process would make it (prompt, seed, path), the options that identify it
for --resume, and how one pass of images runs through the one-process chain and is written and recorded."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from pixart_cli.errors import PixartError
from pixart_cli.scale import manifest
from pixart_cli.settings import DenoiseSettings, EncodeSettings

IMAGES_PER_PASS = 64  # images per encode -> denoise -> decode pass of one process: a SIGTERM loses at most one pass


@dataclass(frozen=True)
class RunOptions:
    """How every process runs its stages: the --device and --dtype words (each process resolves them itself, a
    rank to cuda:LOCAL_RANK) and the parsed --vram budget in bytes (None: auto)."""

    device: str = "auto"
    dtype: str = "auto"
    vram: int | None = None
    loras: tuple = ()  # lora_file.LoraWeights, read once by the CLI

    def context(self, model, callbacks: Callbacks, device: str | None = None):
        """This process's run context (``device`` overrides the run's: a rank's GPU)."""
        from pixart_cli.runtime import RunContext

        context = RunContext.resolve(
            model,
            self.device if device is None else device,
            self.dtype,
            self.vram,
            progress=callbacks.progress,
            log=callbacks.log,
            reports=callbacks.reports,
            loras=self.loras,
            settle=callbacks.settle,
        )
        if callbacks.settle is not None:
            callbacks.settle()  # torch is imported now: its objects stay for the process's life
        return context


def image_options(model, dtype: str, encoding: EncodeSettings, denoising: DenoiseSettings, loras=()) -> dict:
    """The options that change an image, each default filled from the model's configs (``-g 4.5`` is the same run
    as the default 4.5): a manifest line is reused by --resume only when they are the same now. Derived from the
    run's record (``record.IDENTITY``); --dtype stays as given (``auto`` depends on each process's device)."""
    from pixart_cli import plan, record
    from pixart_cli.models import step_caching
    from pixart_cli.models.lora import records

    filled = plan.resolved(denoising, model)
    acting, _ = step_caching.acting(denoising.step_cache, len(filled["timesteps"] or []) or filled["steps"])
    encoded = record.for_encode(model, dtype, [], encoding, plan.max_sequence_length(encoding, model))
    made = record.for_denoise(
        encoded, model, dtype, 1, filled, [], compiled=denoising.compile, step_cache=acting, loras=records(list(loras))
    )
    return record.identity(made, dtype)


@dataclass
class Job:
    """Every image of a run, as a single process would make it: index i -> prompt, seed + i, path."""

    prompts: list[str]  # one per image: prompt k repeated num_images times
    paths: list[Path]
    negative_prompt: str
    options: dict  # the image-changing options, defaults filled from the model (job.image_options)
    folder: Path | None  # where manifest.jsonl lives: -o DIR/; None when -o names image files
    overwrite: bool = True  # False: --no-overwrite, an existing image is never replaced (nor the manifest)

    def wanted(self, index: int, seed: int) -> manifest.Wanted:
        path = os.path.relpath(self.paths[index], self.folder) if self.folder is not None else str(self.paths[index])
        return manifest.Wanted(index, path, self.prompts[index], self.negative_prompt, seed + index, self.options)

    def check_not_replacing(self, todo: Sequence[int]) -> None:
        """--no-overwrite with --resume: an image file to be made again (damaged, unrecorded, or made with other
        options) is refused before any work, not after the pass that would replace it."""
        existing = [self.paths[index] for index in todo if os.path.lexists(self.paths[index])]
        if existing and not self.overwrite:
            raise PixartError(
                f"--no-overwrite: {existing[0]} exists but its manifest line does not record it complete (damaged, "
                f"unrecorded, or made with other options; {len(existing)} such file(s)); remove them, or drop "
                "--no-overwrite"
            )

    def check_same_run(self, lines: dict[int, dict], seed: int) -> None:
        """--resume finishes the run its manifest records: refused before any work, naming each option that differs
        (both values), when this run would make any of its images otherwise (remaking and replacing them)."""
        differing: dict[str, tuple] = {}
        for index in sorted(lines):
            line, wanted = lines[index], self.wanted(index, seed).identity()
            options = {**{key: None for key in wanted["options"]}, **line["options"]}
            for key in options:
                if options[key] != wanted["options"].get(key):
                    differing.setdefault(key, (options[key], wanted["options"].get(key)))
            for key in ("negative_prompt", "seed", "prompt", "path"):
                if line[key] != wanted[key]:
                    there, now = line[key], wanted[key]
                    if key == "seed":  # the run's seed (image 0's), as --seed gives it
                        there, now = there - index, now - index
                    differing.setdefault(key, (there, now, index))
        if not differing:
            return
        told = "; ".join(_difference(key, values) for key, values in differing.items())
        where = manifest.manifest_path(self.folder)
        raise PixartError(
            f"--resume: {where} records this folder's run with other options ({told}); --resume finishes that run "
            f"as it was started: give its options again, or drop --resume to start a new run in {self.folder} "
            "(replacing its images), or give -o another folder"
        )

    def complete_now(self, seed: int, started_ns: int) -> list[int]:
        """The run's images complete on disk now, over every process: as the manifest records them (its newest
        line matches, the file has its size), or without a manifest, a file at its path written since
        ``started_ns``. For the account of a stopped run."""
        if self.folder is not None:
            try:
                lines = manifest.read(self.folder, len(self.prompts))
            except PixartError:
                lines = {}
            return [i for i in sorted(lines) if manifest.complete(self.folder, self.wanted(i, seed), lines, False)]
        found = []
        for index, path in enumerate(self.paths):
            try:
                if os.stat(path).st_mtime_ns >= started_ns:
                    found.append(index)
            except OSError:
                pass
        return found

    def done(self, index: int, seed: int, lines: dict[int, dict]) -> bool:
        """Image ``index`` is complete on disk as the manifest lines record it (never, without a manifest)."""
        return self.folder is not None and manifest.complete(self.folder, self.wanted(index, seed), lines)


# How --resume names an option of the manifest's identity (record.IDENTITY) when it differs
RESUME_NAMES = {
    "model": "--model",
    "revision": "--revision",
    "loras": "--lora",
    "steps": "--steps",
    "timesteps": "the model's fixed schedule (--steps)",
    "guidance_scale": "--guidance-scale",
    "width": "--width",
    "height": "--height",
    "binning": "binning (--no-binning)",
    "scheduler": "--scheduler",
    "step_cache": "--step-cache",
    "compile": "--compile",
    "dtype": "--dtype",
    "max_sequence_length": "--max-sequence-length",
    "clean_caption": "caption cleaning (--no-clean-caption)",
    "precision": "--text-encoder-precision",
    "negative_prompt": "--negative-prompt",
    "seed": "--seed",
    "prompt": "the prompt",
    "path": "the file name",
    "pag_scale": "--pag-scale",
    "pag_layers": "--pag-layers",
    "controlnet": "--controlnet",
    "mask_blur": "--mask-blur",
}


def _difference(key: str, values: tuple) -> str:
    def shown(value) -> str:
        if isinstance(value, list) and all(isinstance(item, dict) and "file" in item for item in value):
            return ", ".join(f"{item['file']}:{item.get('scale')}" for item in value) or "none"
        text = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    name = RESUME_NAMES.get(key, key)
    if len(values) == 3:  # a value of one image
        name = f"{name} of image {values[2]}" if key in ("prompt", "path") else name
    return f"{name} {shown(values[0])} there, {shown(values[1])} now"


def make_job(
    prompts: Sequence[str],
    output: Path,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    model,
    run: RunOptions,
    overwrite: bool = True,
    resume: bool = False,
) -> Job:
    """The run's images; checks -o (and that --resume has a folder) before the model's configs are read."""
    from pixart_cli.files import atomic, output_paths

    if atomic.is_stdout(str(output)):
        raise PixartError(
            "--output -: --ray, --resume and several processes write image files; give a folder (-o DIR/)"
        )
    folder = Path(output) if output_paths.names_folder(output) else None
    if resume and folder is None:
        raise PixartError(f"--resume: needs -o DIR/ (the manifest lives in DIR), not -o {output}")
    options = image_options(model, run.dtype, encoding, denoising, run.loras)  # reads the model's configs
    from pixart_cli.conditioning import check_pag

    check_pag(options.get("pag_scale"), options.get("pag_layers"), model)  # before any process waits on another
    image_prompts = [prompt for prompt in prompts for _ in range(denoising.num_images)]
    paths = output_paths.output_targets(output, len(image_prompts), "image", allow_stdout=False)
    return Job(image_prompts, paths, encoding.negative_prompt, options, folder, overwrite)


@dataclass
class Summary:
    """What a run did, over all processes."""

    written: int = 0
    skipped: int = 0  # already complete (--resume)
    processes: int = 1
    seconds: float = 0.0
    seed: int = 0
    total: int = 0
    manifest: Path | None = None
    engine: str = "processes"

    def as_dict(self) -> dict:
        return {
            "written": self.written,
            "skipped": self.skipped,
            "processes": self.processes,
            "engine": self.engine,
            "seconds": round(self.seconds, 2),
            "seed": self.seed,
            "images": self.total,
            "manifest": None if self.manifest is None else str(self.manifest),
        }

    def describe(self) -> str:
        seeds = f"seed {self.seed}" if self.total == 1 else f"seeds {self.seed}..{self.seed + self.total - 1}"
        text = f"generate: wrote {self.written} image(s)"
        if self.skipped:
            text += f", skipped {self.skipped} already complete"
        text += f" ({seeds})"
        if self.engine != "processes":
            text += f" on {self.engine}"
        elif self.processes > 1:
            text += f" with {self.processes} processes"
        text += f" in {self.seconds:.1f} s"
        if self.manifest is not None:
            text += f"; manifest {self.manifest}"
        return text


@dataclass
class Callbacks:
    """What the CLI gives the driver: where written paths go, and the stage functions' callbacks."""

    wrote: Callable[[Path], None]
    log: Callable[[str], None] | None = None
    progress: Callable[[str, int, int], None] | None = None
    reports: list | None = field(default_factory=list)
    settle: Callable[[], None] | None = None  # process.settle, from the process's edge


def passes(indices: Sequence[int], size: int) -> list[tuple[int, int]]:
    """Contiguous runs of ``indices`` (sorted), cut to at most ``size``: [(start, stop), ...]. A contiguous run
    needs only its first seed (the chain gives image j of a call seed + j)."""
    runs: list[tuple[int, int]] = []
    for index in indices:
        if runs and runs[-1][1] == index and runs[-1][1] - runs[-1][0] < size:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def make_pass(
    job: Job,
    start: int,
    stop: int,
    seed: int,
    encoding: EncodeSettings,
    denoising: DenoiseSettings,
    ctx,
    callbacks: Callbacks,
    append: bool = True,
) -> list[dict]:
    """Images start..stop-1 through the one-process chain, then written, then recorded in the manifest
    (``append=False``: the manifest lines are returned for the caller to append, as Ray's driver does)."""
    from pixart_cli.generate import generate
    from pixart_cli.plan import plan_run

    # one image per prompt row, seeds seed + start onwards; the LoRAs' fit was checked before the first pass
    planned = plan_run(
        job.prompts[start:stop],
        encoding,
        replace(denoising, seed=seed + start, num_images=1),
        ctx.model,
        decode_batch_size=denoising.batch_size,
    )
    images, meta = generate(planned, ctx)
    return write_images(job, start, images, meta, callbacks.wrote, append=append)


def write_images(
    job: Job, start: int, images: list, meta: dict, wrote: Callable[[Path], None] | None, append: bool = True
) -> list[dict]:
    """Write image start+j for each decoded image j, then (-o DIR/ only) its manifest line, and report the path.
    Returns the manifest lines; ``append=False`` leaves appending them to the caller (Ray's driver)."""
    from pixart_cli import record
    from pixart_cli.files import image_io

    requests = [
        (job.paths[start + offset], image, *record.image_metadata(record.RunRecord.from_meta(meta), offset))
        for offset, image in enumerate(images)
    ]
    lines = []

    def written(offset: int, path: Path) -> None:
        index = start + offset
        if job.folder is not None:
            line = manifest.record(
                job.folder,
                index,
                path,
                job.prompts[index],
                job.negative_prompt,
                meta["seeds"][offset],
                job.options,
                requests[offset][3],
            )
            if append:
                manifest.append(job.folder, line)
            lines.append(line)
        if wrote is not None:
            wrote(path)

    image_io.save_images(requests, overwrite=job.overwrite, on_written=written)
    return lines
