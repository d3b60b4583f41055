"""The plan of a local fp16 (or bf16) copy of a model folder (``pixart convert``): its components, every tensor and
the dtype it is written as, decided from model_index.json, the file lists and the safetensors headers before
anything is written (``files/model_copy.py`` writes it).

The published PixArt checkpoints store every component in fp32 (T5-v1.1-XXL alone is 19 GB in two shards) and
the Hub has no fp16 variant files. The copy is a plain diffusers folder that ``--model DIR`` and diffusers' own
``from_pretrained`` load, holding exactly the tensors those loaders make from the fp32 files when asked for the
copy's dtype:

- floating-point tensors are cast with torch's ``Tensor.to`` (round to nearest even), as the loaders cast them;
- what a loader keeps in fp32 stays fp32, matched as that library matches it: transformers keeps the modules of
  ``_keep_in_fp32_modules`` (T5's ``wo``) under fp16 and ``_keep_in_fp32_modules_strict`` under fp16 and bf16,
  matching each name as a regular expression anywhere in the tensor's name (``_get_dtype_plan``); diffusers keeps
  ``_keep_in_fp32_modules`` under any dtype, matching whole parts of the dotted name (``load_model_dict_into_meta``);
- integer and bool tensors are copied unchanged, as the loaders leave them.

The source is not trusted, and its weights are read by the rule every stage reads them by (files/model_weights.py):
a component's safetensors files or, where it has none, its ``.bin`` checkpoint, read with ``torch.load(
weights_only=True)`` after the archive's checks and written as safetensors; other pickles are never read or copied.
The shard names of an index must be plain names of files in the component's own folder, JSON files are read only
below a size cap, and only regular files are read (``files/untrusted.py``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError
from pixart_cli.files import model_copy
from pixart_cli.files.atomic import existing_kind
from pixart_cli.files.model_copy import CODES, FLOATS, ITEMSIZE, Tensor, gb
from pixart_cli.files.model_weights import BIN_WEIGHTS, weights_header
from pixart_cli.files.untrusted import read_json
from pixart_cli.models.source import WEIGHTS_FILES, Model

# The components with weights, in the order they are converted; the others (tokenizer, scheduler) are copied.
CONVERTIBLE = ("text_encoder", "transformer", "vae")
# The dtypes a copy can have, by their --dtype words (runtime.DTYPES spells the torch names the same way).
DTYPE_WORDS = ("fp16", "bf16")
# The largest shard written, in bytes: the "5GB" of transformers' and diffusers' save_pretrained (GB = 10^9).
# A tensor larger than this gets a shard of its own, as there.
SHARD_BYTES = 5 * 10**9
# Weights in formats other than safetensors: pickles (which could run code) and other frameworks' files. They are
# never read, nor copied, except a component's .bin checkpoint where it has no safetensors (BIN_WEIGHTS: read as the
# stages read it, with weights_only).
FOREIGN_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".h5", ".msgpack", ".gguf", ".onnx")

_COMPONENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_CLASS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_WORDS = {"F64": "fp64", "F32": "fp32", "F16": "fp16", "BF16": "bf16"}


@dataclass
class Component:
    """One component folder of the source and what the copy gets from it."""

    name: str
    folder: Path  # in the source
    convert: bool
    copies: list[str] = field(default_factory=list)  # file names copied as they are
    left_out: list[str] = field(default_factory=list)  # file names not copied, each with the reason
    library: str | None = None
    weights: list[str] = field(default_factory=list)  # the weights files the loaders read (an index first)
    weight_map: dict | None = None  # the index's, when sharded
    tensors: list[Tensor] = field(default_factory=list)  # converted components: every tensor, in reading order
    shards: list[list[Tensor]] = field(default_factory=list)  # converted components: the files written, in order
    config_dtype: bool = False  # the config records a dtype (transformers'): the copy's config records the new one

    @property
    def kept_fp32(self) -> list[str]:
        return [t.name for t in self.tensors if t.target == "F32" and t.dtype in FLOATS]

    def reads(self) -> list[str]:
        """The names of the files read from the folder."""
        return sorted(set(self.copies) | set(self.weights))

    def shard_names(self) -> list[str]:
        base = WEIGHTS_FILES[self.name]
        if len(self.shards) == 1:
            return [base]
        stem = base.removesuffix(".safetensors")
        return [f"{stem}-{i:05d}-of-{len(self.shards):05d}.safetensors" for i in range(1, len(self.shards) + 1)]

    def index_name(self) -> str:
        return f"{WEIGHTS_FILES[self.name]}.index.json"

    def written(self) -> list[str]:
        """The names of the files the copy's folder gets."""
        names = self.shard_names()
        return sorted(names + ([self.index_name()] if len(names) > 1 else []) + self.copies)

    def bytes_written(self) -> int:
        return sum(_size(self.folder / name) for name in self.copies) + sum(t.nbytes for t in self.tensors)


@dataclass
class Plan:
    """Everything a conversion reads and writes, decided before anything is written."""

    model: Model
    target: Path  # absolute
    shown: str  # the target as the user gave it (printed, named in errors)
    dtype: object  # torch.float16 or torch.bfloat16
    overwrite: bool
    root: Path  # the source folder holding model_index.json
    root_files: list[str]
    root_left_out: list[str]  # entries beside model_index.json not copied, each with the reason
    components: list[Component]
    elsewhere: list[str]  # components the model takes from its base model: not in the copy

    @property
    def word(self) -> str:
        from pixart_cli.runtime import dtype_name

        return dtype_name(self.dtype)

    def bytes_written(self) -> int:
        copied = sum(_size(self.root / name) for name in self.root_files)
        return copied + sum(c.bytes_written() for c in self.components)

    def steps(self) -> int:
        """Progress units: tensors written and files copied."""
        return sum(len(c.tensors) + len(c.copies) for c in self.components) + len(self.root_files)

    def describe(self) -> list[str]:
        """One line per component, then what is left out."""
        lines = []
        for c in self.components:
            if not c.convert:
                lines.append(f"{c.name}: copied as it is ({gb(c.bytes_written())})")
                continue
            source = sum(t.source_nbytes for t in c.tensors)
            dtypes = "/".join(sorted({_WORDS[t.dtype] for t in c.tensors if t.dtype in FLOATS})) or "no floats"
            kept = c.kept_fp32
            line = (
                f"{c.name}: {len(c.tensors)} tensors, {gb(source)} {dtypes} -> {gb(c.bytes_written())} "
                f"{self.word}, {len(c.shards)} file{'s' if len(c.shards) > 1 else ''}"
            )
            if kept:
                modules = sorted({_module_word(name) for name in kept})
                line += f"; {len(kept)} kept in fp32 as the loader keeps them ({', '.join(modules)})"
            lines.append(line)
        for name in self.elsewhere:
            lines.append(f"{name}: not part of this model (pixart takes it from the base model); nor of the copy")
        for c in self.components:
            lines += [f"left out: {c.name}/{reason}" for reason in c.left_out]
        return lines + [f"left out: {reason}" for reason in self.root_left_out]

    def as_dict(self) -> dict:
        """What the JSON document records."""
        parts = {}
        for c in self.components:
            parts[c.name] = {"converted": c.convert, "files": c.written() if c.convert else c.copies}
            parts[c.name]["bytes"] = c.bytes_written()
            if c.convert:
                parts[c.name]["tensors"] = len(c.tensors)
                parts[c.name]["source_bytes"] = sum(t.source_nbytes for t in c.tensors)
                parts[c.name]["kept_fp32"] = c.kept_fp32
        return {
            "model": self.model.recorded,
            "revision": self.model.revision,
            "dtype": self.word,
            "components": parts,
            "from_base_model": self.elsewhere,
            "left_out": [f"{c.name}/{reason}" for c in self.components for reason in c.left_out] + self.root_left_out,
        }


def plan(
    model: Model,
    target: Path,
    shown: str,
    dtype,
    components: tuple[str, ...] | None = None,
    overwrite: bool = False,
    shard_bytes: int = SHARD_BYTES,
) -> Plan:
    """Decide every file of the copy from the source's model_index.json, file lists and safetensors headers (a
    hub model's components are downloaded first, as every stage does). ``target``, ``shown``: from
    ``model_copy.check_target``; ``dtype``: torch.float16 or torch.bfloat16; ``components``: those to convert
    (None: all of ``CONVERTIBLE`` the model has), the others are copied as they are. Raises PixartError before
    anything is written (the copy apart from the source, and room for it, checked too)."""
    if str(dtype) not in ("torch.float16", "torch.bfloat16"):
        raise ValueError(f"dtype must be torch.float16 or torch.bfloat16, not {dtype}")
    index_path = model.file("model_index.json")
    root = index_path.parent
    index = read_json(index_path, f"--model {model.id}: model_index.json")
    if not isinstance(index, dict):
        raise PixartError(f"--model {model.id}: model_index.json is not a JSON object; the model folder is damaged")
    listed, elsewhere = {}, []
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list):
            continue
        if not _COMPONENT_NAME.match(name):
            raise PixartError(
                f"--model {model.id}: model_index.json names a component {name!r}, which is not a plain folder name; "
                "pixart convert refuses it"
            )
        if model.owner(name) is not model:  # PixArt-DMD's T5, tokenizer and VAE: taken from the base model
            elsewhere.append(name)
        elif len(entry) == 2 and all(isinstance(part, str) for part in entry):
            listed[name] = entry
    for name in components or ():
        if name in elsewhere:
            raise PixartError(
                f"--components {name}: {model.id} has no {name}/ of its own (pixart takes it from the base model); "
                "leave it out"
            )
        if name not in listed:
            raise PixartError(
                f"--components {name}: {model.id} has no {name} (model_index.json does not list one); leave it out"
            )
    chosen = set(CONVERTIBLE if components is None else components)
    order = {name: position for position, name in enumerate(CONVERTIBLE)}
    parts = []
    for name in sorted(listed, key=lambda n: (order.get(n, len(order)), n)):
        convert = name in chosen and name in CONVERTIBLE
        part = _component(model, name, model.folder(name), convert, listed[name][0])
        if convert:
            _plan_tensors(model, part, dtype, listed[name], shard_bytes)
        parts.append(part)
    root_files, root_left_out = _root_files(root, set(index))
    result = Plan(model, target, shown, dtype, overwrite, root, root_files, root_left_out, parts, elsewhere)
    model_copy.check_apart(result)
    model_copy.check_space(result)
    return result


def _component(model: Model, name: str, folder: Path, convert: bool, library: str) -> Component:
    """A component folder's files: the weights located and checked, the rest sorted into copied and left out."""
    where = f"--model {model.id}: {name}/"
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except FileNotFoundError:
        raise PixartError(f"{where} is missing; the model folder is incomplete", EXIT_RUNTIME) from None
    except OSError as error:
        raise PixartError(f"{where} cannot be read ({error.strerror})", EXIT_RUNTIME) from None
    part = Component(name, Path(folder), convert, library=library)
    files, foreign = set(), []
    for entry in entries:
        kind = _kind(Path(entry.path))
        if kind == "a folder":
            part.left_out.append(f"{entry.name}/: a subfolder (a component's own files are copied, not subfolders)")
        elif kind != "file":
            raise PixartError(f"{where}{entry.name} is {kind}; pixart convert reads only regular files")
        elif entry.name.endswith(FOREIGN_WEIGHTS):
            foreign.append(entry.name)
        else:
            files.add(entry.name)
    if name in WEIGHTS_FILES:
        part.weights, part.weight_map = _weight_files(model, name, part.folder, files, foreign)
    pickled = [n for n in part.weights if not n.endswith(".safetensors")]  # a .bin checkpoint and its index
    files -= set(pickled)
    for other in (n for n in foreign if n not in pickled):
        part.left_out.append(f"{other}: not weights the loaders read (such files are never read or copied)")
    if pickled and convert:
        part.left_out += [f"{n}: read with weights_only and written as safetensors" for n in pickled]
    elif pickled:
        part.copies = sorted(pickled)  # the weights the loaders read, copied as they are (below)
    if convert:
        # the weights are written anew; other safetensors files (variants, leftovers) are not what loads
        unused = sorted(n for n in files if _is_weights(n) and n not in part.weights)
        part.left_out += [f"{n}: not among the weights the loaders read" for n in unused]
        part.copies = sorted(n for n in files if not _is_weights(n))
        part.config_dtype = library == "transformers" and "config.json" in files
    else:
        part.copies = sorted(files | set(part.copies))
    return part


def _weight_files(
    model: Model, name: str, folder: Path, files: set[str], foreign: list[str]
) -> tuple[list[str], dict | None]:
    """The weights files the loaders read for this component, with the index's weight map when sharded:
    [index, shards...] or [single file]: its safetensors or, where it has none, its .bin checkpoint (the stages'
    rule, files/model_weights.py). Shard names must be plain names of regular files of the folder."""
    where = f"--model {model.id}: {name}/"
    single = WEIGHTS_FILES[name]
    if single not in files and f"{single}.index.json" not in files:  # no safetensors: the loaders read the .bin
        single, files = BIN_WEIGHTS[name], files | set(foreign)
    index_name = f"{single}.index.json"
    if single in files and index_name in files:
        raise PixartError(
            f"{where} holds both {single} and {index_name}; loaders disagree about which one is read: remove the "
            "stale one"
        )
    if single in files:
        return [single], None
    if index_name not in files:
        if foreign:
            raise PixartError(
                f"{where} has only weights the loaders do not read ({', '.join(foreign)}); pixart reads a "
                f"component's .safetensors files or its {BIN_WEIGHTS[name]} (other pickles could run code): get the "
                "model's safetensors files"
            )
        raise PixartError(
            f"{where} has no weights file ({WEIGHTS_FILES[name]} is missing); the model folder is incomplete",
            EXIT_RUNTIME,
        )
    index = read_json(folder / index_name, f"{where}{index_name}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise PixartError(f"{where}{index_name} has no weight_map; the model folder is damaged", EXIT_RUNTIME)
    shards = set()
    for tensor, shard in weight_map.items():
        kind = Path(single).suffix
        if not isinstance(shard, str) or not _plain_name(shard) or not shard.endswith(kind):
            raise PixartError(
                f"{where}{index_name} names {shard!r} for tensor {tensor}, which is not a {kind} file of that "
                "folder; pixart convert reads only files inside the component's folder"
            )
        if shard not in files:
            raise PixartError(
                f"{where}{shard} (named by {index_name}) is missing; the model folder is incomplete", EXIT_RUNTIME
            )
        shards.add(shard)
    return [index_name, *sorted(shards)], weight_map


def _plan_tensors(model: Model, part: Component, dtype, entry: list[str], shard_bytes: int) -> None:
    """Every tensor of a converted component from its headers, the dtype each is written as, and the shards."""
    keeps_fp32 = _fp32_rule(model, part.name, *entry, dtype)
    target = CODES[str(dtype).removeprefix("torch.")]
    seen: dict[str, str] = {}
    for file_name in (n for n in part.weights if not n.endswith(".json")):
        path = part.folder / file_name
        for name, (code, shape) in weights_header(path, f"--model {model.id}: {part.name}/{file_name}").items():
            if name in seen:
                raise PixartError(
                    f"--model {model.id}: {part.name}/ holds tensor {name} in both {seen[name]} and {file_name}; "
                    "the model folder is damaged",
                    EXIT_RUNTIME,
                )
            seen[name] = file_name
            if code not in ITEMSIZE:
                raise PixartError(
                    f"--model {model.id}: {part.name}/{file_name}: tensor {name} is {code}; pixart convert handles "
                    "F64, F32, F16, BF16 and integer or bool tensors"
                )
            written = ("F32" if keeps_fp32(name) else target) if code in FLOATS else code
            part.tensors.append(Tensor(name, path, code, shape, written))
    if part.weight_map is not None:
        wrong = next((n for n, f in part.weight_map.items() if seen.get(n) != f), None)
        if wrong is not None:
            raise PixartError(
                f"--model {model.id}: {part.name}/{part.weights[0]} places tensor {wrong} in "
                f"{part.weight_map[wrong]}, which does not hold it; the model folder is damaged",
                EXIT_RUNTIME,
            )
    part.shards = _shards(part.tensors, shard_bytes)


def _fp32_rule(model: Model, component: str, library: str, class_name: str, dtype) -> Callable[[str], bool]:
    """Which tensors the component's loader keeps in fp32 when it loads with ``dtype``: asked of the class that
    model_index.json names (imported whole through the facade), and matched as that library matches."""
    import torch

    from pixart_cli.models import facade

    where = f"--model {model.id}: model_index.json"
    if library not in ("transformers", "diffusers") or not _CLASS_NAME.match(class_name):
        raise PixartError(
            f"{where} gives {component} as {library}.{class_name}; pixart convert converts transformers and "
            "diffusers models only"
        )
    try:
        cls = getattr(facade.plain(library), class_name)
    except Exception:  # the lazy modules raise ModuleNotFoundError, AttributeError, RuntimeError
        cls = None
    if not isinstance(cls, type):
        raise PixartError(
            f"{where} gives {component} as {library}.{class_name}, which the installed {library} does not have; "
            f"the copy must follow that class's loading rules: update {library}"
        )
    if library == "transformers":
        keep = set(getattr(cls, "_keep_in_fp32_modules", None) or ())
        strict = set(getattr(cls, "_keep_in_fp32_modules_strict", None) or ())
        patterns = sorted((keep | strict) if dtype == torch.float16 else strict)
        if not patterns:
            return lambda name: False
        # as transformers' build_glob_alternation: "*" is ".*", the rest a regular expression, found anywhere
        pattern = re.compile("|".join(f"(?:{p.replace('*', '.*')})" for p in patterns))
        return lambda name: pattern.search(name) is not None
    modules = getattr(cls, "_keep_in_fp32_modules", None)
    modules = [modules] if isinstance(modules, str) else list(modules or ())
    return lambda name: any(module in name.split(".") for module in modules)


def _shards(tensors: list[Tensor], limit: int) -> list[list[Tensor]]:
    """Tensors in reading order, cut into files of at most ``limit`` bytes; inside each file the widest dtypes
    first, by name, as safetensors' own writer orders them (every tensor then starts aligned to its dtype)."""
    shards: list[list[Tensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return [sorted(shard, key=lambda t: (-ITEMSIZE[t.target], t.name)) for shard in shards]


def _root_files(root: Path, components: set[str]) -> tuple[list[str], list[str]]:
    """The files beside model_index.json that the copy gets (regular, visible, not weights), and the entries it
    does not get, each with the reason (hidden entries and the component folders are not mentioned)."""
    names, left_out = [], []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith(".") or entry.name in components:
            continue
        kind = _kind(Path(entry.path))
        if kind == "a folder":
            left_out.append(f"{entry.name}/: not a component of model_index.json")
        elif kind != "file":
            left_out.append(f"{entry.name}: {kind}, not a regular file")
        elif _is_weights(entry.name) or entry.name.endswith(FOREIGN_WEIGHTS):
            left_out.append(f"{entry.name}: weights outside the component folders")
        else:
            names.append(entry.name)
    return names, left_out


def _kind(path: Path) -> str:
    """ "file", "a folder", or what else is there, in words (links followed, as the hub cache's are)."""
    return existing_kind(path) or "gone since it was listed"


def _is_weights(name: str) -> bool:
    """A safetensors file or a weights index: written anew for a converted component, never copied there."""
    return name.endswith(".safetensors") or bool(re.search(r"\.(safetensors|bin)\.index(\.[\w-]+)?\.json$", name))


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\x00")


def _size(path: Path) -> int:
    return os.stat(path).st_size


def _module_word(name: str) -> str:
    """'encoder.block.3.layer.1.DenseReluDense.wo.weight' -> 'wo': the module a kept tensor belongs to."""
    parts = name.split(".")
    return parts[-2] if len(parts) >= 2 else name
