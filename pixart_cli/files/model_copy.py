"""Writing a copy of a model folder (``pixart convert``): the output folder's checks, the shards and their index
streamed tensor by tensor, and the finished folder placed atomically.

What is written is decided by ``models.convert.plan`` (a ``Plan``: the files copied as they are, and each converted
component's tensors cut into shards); this module only writes it. Each tensor is read on its own (``pread``, so
the checkpoint is not mapped into this process) and written straight into its shard, whose header is computed
before any data: the memory in use is one tensor and one reused cast buffer, whatever the size of the model.

The copy is written into a temp folder beside the target and renamed into place when it is complete; a failure
or a signal removes the temp folder. An existing target is replaced only when asked, after the new copy is
complete (moved aside, the new folder renamed in, the old one removed: two renames). Nothing here prints: notes
and progress go to the callbacks.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError, detail
from pixart_cli.files.atomic import creation_problem
from pixart_cli.files.formats import SAFETENSORS_DTYPES
from pixart_cli.files.model_weights import open_weights
from pixart_cli.files.untrusted import open_input, read_json
from pixart_cli.signals import GUARD

COPY_CHUNK = 64 * 2**20  # bytes per read when a file is copied
CAST_CHUNK = 2**22  # elements cast at a time (16 MB of fp32), through one buffer reused for every tensor

# Safetensors dtype codes: bytes per element, the floating ones (cast to the copy's dtype), and torch's names.
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
FLOATS = ("F64", "F32", "F16", "BF16")
TORCH_NAMES = SAFETENSORS_DTYPES  # safetensors code -> torch dtype name
CODES = {name: code for code, name in TORCH_NAMES.items()}

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class Tensor:
    """One tensor of a component: where it is read from and how it is written."""

    name: str
    source: Path  # the weights file holding it (safetensors, or a .bin checkpoint: files/model_weights.py)
    dtype: str  # its safetensors dtype code there
    shape: tuple[int, ...]
    target: str  # the code it is written as

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.target]

    @property
    def source_nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


# --- checks before any work ----------------------------------------------------------------------------------
def check_target(output: str, overwrite: bool) -> tuple[Path, str]:
    """The folder to write (absolute) and its name as given, checked before anything is read: a new path in an
    existing, writable folder; or, with ``overwrite``, an existing model folder (replaced once the copy is
    complete)."""
    if output.strip() == "":
        raise PixartError("--output: the path is empty; give the folder to write the copy to")
    if "\n" in output or "\r" in output:
        raise PixartError(f"--output {output!r}: has a line break; give a path without one (stdout lists paths)")
    if output == "-":
        raise PixartError("--output -: a model copy is a folder, not a stream; give the folder to write it to")
    shown = str(Path(output))
    target = Path(os.path.abspath(output))
    if target.parent == target:
        raise PixartError(f"--output {shown}: is the root folder; give a new folder to write the copy to")
    parent = target.parent
    if not parent.is_dir():
        raise PixartError(f"--output {shown}: the folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PixartError(f"--output {shown}: cannot write in {parent} (permission denied); write elsewhere")
    problem = creation_problem(parent, make_folder=True)  # the copy is made in a temp folder there (root in /proc)
    if problem is not None:
        raise PixartError(f"--output {shown}: cannot create a folder in {parent} ({problem}); write elsewhere")
    if os.path.islink(target):
        raise PixartError(f"--output {shown}: is a symbolic link; give the folder itself, or a new path")
    if not os.path.lexists(target):
        return target, shown
    if not target.is_dir():
        raise PixartError(f"--output {shown}: exists and is not a folder; give a new path")
    if not overwrite:
        raise PixartError(
            f"--output {shown}: already exists; pass --overwrite to replace it (once the new copy is complete), "
            "or give a new path"
        )
    if any(target.iterdir()) and not (target / "model_index.json").is_file():
        raise PixartError(
            f"--output {shown}: is a folder that holds no model (no model_index.json); --overwrite replaces only a "
            "model folder: give a new path"
        )
    if Path.cwd().resolve().is_relative_to(target.resolve()):
        raise PixartError(f"--output {shown}: holds the current folder; run pixart from elsewhere to replace it")
    return target, shown


def check_apart(plan) -> None:
    """The copy of ``plan`` (a ``models.convert.Plan``) is neither the source nor inside a component of it, nor
    around any file it reads: replacing it must never touch what is read."""
    target = Path(os.path.realpath(plan.target))
    where = f"--output {plan.shown}"
    root = Path(os.path.realpath(plan.root))
    if target == root:
        raise PixartError(f"{where}: is the model folder itself; write the copy to a new folder")
    sources = [root] + [Path(os.path.realpath(plan.root / name)) for name in plan.root_files]
    for part in plan.components:
        folder = Path(os.path.realpath(part.folder))
        if target.is_relative_to(folder):
            raise PixartError(f"{where}: is inside the model's {part.name}/ folder; write the copy elsewhere")
        sources += [folder] + [Path(os.path.realpath(part.folder / name)) for name in part.reads()]
    for source in sources:
        if source.is_relative_to(target):
            raise PixartError(f"{where}: holds the model's files ({source}); write the copy to a new folder")


def check_space(plan) -> None:
    """Room for the whole copy (an existing target is removed only after it is complete), before any work."""
    needed = plan.bytes_written()
    free = shutil.disk_usage(plan.target.parent).free
    if needed > free:
        raise PixartError(
            f"--output {plan.shown}: the copy needs {gb(needed)} and its disk has {gb(free)} free; free some "
            "space or write elsewhere",
            EXIT_RUNTIME,
        )


def gb(size: int) -> str:
    """A size in words: 10.75 GB, 0.24 MB, 497 bytes."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if size >= scale // 10:
            return f"{size / scale:.2f} {unit}"
    return f"{size} bytes"


# --- writing ----------------------------------------------------------------------------------------------------
def write(plan, progress: Progress | None = None, placed: Callable[[str], None] | None = None) -> Path:
    """Write the copy ``plan`` (a ``models.convert.Plan``) decides into a temp folder beside the target, then
    rename it into place; ``placed(shown)`` is called once it is there (inside the same signal-deferred block, so
    a path is reported exactly when it is in place). Any failure or signal before that removes the temp folder.
    Returns the target."""
    import torch

    steps = _Steps(progress, plan.steps())
    temp, in_place = None, False
    try:
        with GUARD.deferred():  # made and recorded together: a signal in between would leave it behind
            temp = Path(tempfile.mkdtemp(prefix=".pixart-convert-", suffix=".tmp", dir=plan.target.parent))
        try:
            for name in plan.root_files:
                _copy(plan.root / name, temp / name, plan)
                steps.advance()
            for part in plan.components:
                (temp / part.name).mkdir()
                for name in part.copies:
                    _copy(part.folder / name, temp / part.name / name, plan)
                    if part.config_dtype and name == "config.json":
                        _record_dtype(temp / part.name / name, plan)
                    steps.advance()
                if part.convert:
                    _write_weights(part, temp / part.name, plan, steps, torch)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(temp, 0o777 & ~umask)  # mkdtemp makes 0700; a finished folder gets the usual permissions
        except OSError as error:  # a full disk, a folder gone: named by the copy, not by the temp folder
            raise _write_failure(plan, error) from error
        with GUARD.deferred():  # placed and reported together
            _place(temp, plan)
            in_place = True
            if placed is not None:
                placed(plan.shown)
    finally:
        if temp is not None and not in_place:
            with GUARD.deferred():  # a signal now must not leave half of the temp folder behind
                shutil.rmtree(temp, ignore_errors=True)
    return plan.target


class _Steps:
    def __init__(self, progress: Progress | None, total: int):
        self.progress, self.total, self.done = progress, total, 0
        if progress is not None:
            progress("convert", 0, total)

    def advance(self) -> None:
        self.done += 1
        if self.progress is not None:
            self.progress("convert", self.done, self.total)


def _write_weights(part, folder: Path, plan, steps: _Steps, torch) -> None:
    """A converted component's shards, and their index when there are several."""
    names = part.shard_names()
    handles: dict[Path, object] = {}
    buffers: dict = {}  # the cast buffer of each dtype, reused for every tensor
    try:
        for name, shard in zip(names, part.shards):
            _write_shard(folder / name, shard, handles, buffers, plan, steps, torch)
    finally:
        for handle in handles.values():
            handle.__exit__(None, None, None)
    if len(names) > 1:
        weight_map = {t.name: name for name, shard in zip(names, part.shards) for t in shard}
        document = {
            "metadata": {"total_size": sum(t.nbytes for t in part.tensors)},
            "weight_map": dict(sorted(weight_map.items())),
        }
        with open(folder / part.index_name(), "x", encoding="utf-8") as handle:
            handle.write(json.dumps(document, indent=2) + "\n")
            _sync(handle)


def _write_shard(path: Path, tensors: list[Tensor], handles: dict, buffers: dict, plan, steps: _Steps, torch) -> None:
    """One safetensors file: the header (every offset known from the source headers), then each tensor as it is
    read and cast, so that one tensor is in memory at a time."""
    header: dict = {}
    offset = 0
    for tensor in tensors:
        header[tensor.name] = {
            "dtype": tensor.target,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + tensor.nbytes],
        }
        offset += tensor.nbytes
    header["__metadata__"] = {"format": "pt"}  # what transformers checks for
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(path, "xb") as out:
        out.write(struct.pack("<Q", len(blob)))
        out.write(blob)
        for tensor in tensors:
            _write_tensor(out, tensor, handles, buffers, plan, torch)
            steps.advance()
        if out.tell() != 8 + len(blob) + offset:
            raise PixartError(
                f"--model {plan.model.id}: a tensor of {path.parent.name}/ changed while pixart read it; run the "
                "conversion again",
                EXIT_RUNTIME,
            )
        _sync(out)


def _write_tensor(out, tensor: Tensor, handles: dict, buffers: dict, plan, torch) -> None:
    """One tensor's bytes, cast to the dtype it is written as through one reused buffer of CAST_CHUNK elements
    (``copy_`` casts as ``Tensor.to`` does): memory holds the source tensor and that buffer, nothing the size of
    the cast tensor, so the heap does not fragment over thousands of tensors."""
    data = _read(tensor, handles, plan).reshape(-1)
    if tensor.target == tensor.dtype:
        out.write(memoryview(data.view(torch.uint8).numpy()))
        return
    dtype = getattr(torch, TORCH_NAMES[tensor.target])
    if dtype not in buffers:
        buffers[dtype] = torch.empty(CAST_CHUNK, dtype=dtype)
    for start in range(0, data.numel(), CAST_CHUNK):
        part = data[start : start + CAST_CHUNK]
        cast = buffers[dtype][: part.numel()]
        cast.copy_(part)
        if _has_inf(cast, torch) and not _has_inf(part, torch):
            raise PixartError(
                f"--model {plan.model.id}: {tensor.source.parent.name}/{tensor.source.name}: tensor {tensor.name} "
                f"holds values beyond {plan.word}'s range, which would become inf; use --dtype bf16 (fp32's range)",
                EXIT_RUNTIME,
            )
        out.write(memoryview(cast.view(torch.uint8).numpy()))


def _read(tensor: Tensor, handles: dict, plan):
    """One tensor as the source holds it, checked against the header the plan was made from."""
    from safetensors import SafetensorError

    where = f"--model {plan.model.id}: {tensor.source.parent.name}/{tensor.source.name}"
    try:
        if tensor.source not in handles:
            handles[tensor.source] = open_weights(tensor.source, where).__enter__()
        data = handles[tensor.source].get_tensor(tensor.name)
    except (SafetensorError, OSError, RuntimeError) as error:
        raise PixartError(f"{where}: cannot read tensor {tensor.name} ({detail(error)})", EXIT_RUNTIME) from error
    if tuple(data.shape) != tensor.shape or CODES.get(str(data.dtype).removeprefix("torch.")) != tensor.dtype:
        raise PixartError(f"{where}: changed while pixart read it; run the conversion again", EXIT_RUNTIME)
    return data


def _has_inf(tensor, torch) -> bool:
    """Whether a float tensor holds an infinity; a reduction, so no temporary the size of the tensor."""
    low, high = torch.aminmax(tensor)
    return bool(torch.isinf(low) or torch.isinf(high))


def _record_dtype(path: Path, plan) -> None:
    """A transformers config records the dtype of its weights (``dtype="auto"`` loads with it): the new one."""
    config = read_json(path, f"--model {plan.model.id}: {path.parent.name}/config.json")
    if not isinstance(config, dict):
        raise PixartError(f"--model {plan.model.id}: {path.parent.name}/config.json is not a JSON object")
    name = str(plan.dtype).removeprefix("torch.")
    changed = {key: name for key in ("dtype", "torch_dtype") if key in config}
    if not changed:
        return
    config.update(changed)
    os.unlink(path)
    with open(path, "x", encoding="utf-8") as handle:
        handle.write(json.dumps(config, indent=2) + "\n")
        _sync(handle)


def _place(temp: Path, plan) -> None:
    """Rename the finished temp folder to the target. Decided now, at the moment it lands: with ``overwrite``
    the old folder is moved aside, the new one put in its place and the old one removed (moved back if the
    rename fails); without it, a folder that appeared meanwhile is kept and the copy is not placed."""
    target, where = plan.target, f"--output {plan.shown}"
    if os.path.islink(target) or (os.path.lexists(target) and not target.is_dir()):
        raise PixartError(f"{where}: is now a link or a file; pixart never replaces one; the copy was not written")
    if not os.path.lexists(target):
        try:
            os.rename(temp, target)  # onto nothing, or onto an empty folder that appeared meanwhile
            return
        except OSError as error:
            if not os.path.lexists(target):
                raise _write_failure(plan, error) from error
        if not plan.overwrite:
            raise PixartError(f"{where}: appeared while pixart worked; it was kept and the copy was not written")
    elif not plan.overwrite:
        raise PixartError(f"{where}: appeared while pixart worked; it was kept and the copy was not written")
    aside = Path(tempfile.mkdtemp(prefix=".pixart-replaced-", suffix=".tmp", dir=target.parent))
    try:
        os.rename(target, aside)  # onto the empty folder just made for it
    except OSError as error:
        aside.rmdir()
        raise _write_failure(plan, error) from error
    try:
        os.rename(temp, target)
    except OSError as error:
        os.rename(aside, target)
        raise _write_failure(plan, error) from error
    shutil.rmtree(aside, ignore_errors=True)


def _write_failure(plan, error: OSError) -> PixartError:
    return PixartError(
        f"--output {plan.shown}: cannot write the copy ({error.strerror or type(error).__name__}); nothing was written",
        EXIT_RUNTIME,
    )


def _copy(source: Path, destination: Path, plan) -> None:
    """A regular file copied byte for byte (through a link, as ``cp`` does), no more than its size when opened
    (``open_input``: a FIFO planted since the plan is refused, never waited on)."""
    where = f"--model {plan.model.id}: {source}"
    handle, size = open_input(source, name=where)
    with handle, open(destination, "xb") as out:
        left = size
        while left > 0:
            try:
                chunk = handle.read(min(left, COPY_CHUNK))
            except OSError as error:
                raise PixartError(f"{where} cannot be read ({error.strerror})", EXIT_RUNTIME) from None
            if not chunk:
                raise PixartError(f"{where} shrank while pixart copied it; run the conversion again", EXIT_RUNTIME)
            out.write(chunk)
            left -= len(chunk)
        _sync(out)


def _sync(handle) -> None:
    """Data on disk before the folder is renamed into place: a crash then leaves whole files, or no folder."""
    handle.flush()
    os.fsync(handle.fileno())
