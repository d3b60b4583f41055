"""T5 encoder streamed block by block from its safetensors files (or its .bin checkpoint) to the device.

T5-v1.1-XXL is ~9.5 GB in fp16, more than an 8 GB card holds. Here the model skeleton lives on the ``meta``
device; the embedding and final norm (~0.27 GB) are loaded once, and each of the 24 blocks is read from the
checkpoint straight onto the device just before it runs and dropped right after. The forward pass is
transformers' own (hooks only swap weights in and out), so outputs equal the resident model's.

Compared with diffusers' group offloading, this never keeps a full copy of T5 in CPU RAM and needs no
load-then-offload pass (see README's benchmark for the measured difference).

Tensors are read with ``pread`` into pinned staging buffers rather than through safetensors' memory map:
a memory-mapped read leaves every page of the checkpoint counted in this process's RSS (11.2 GB for the
fp16 T5 on the benchmark; 19 GB for the real fp32 checkpoint), while ``pread`` keeps RSS near the size
of the buffers in flight.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pixart_cli.files.formats import SAFETENSORS_DTYPES
from pixart_cli.files.model_weights import BIN_WEIGHTS, BinTensors
from pixart_cli.models.configs import read_header, read_json, shard_names

_BLOCK = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")
_TIED_EMBEDDING = ("shared.weight", "encoder.embed_tokens.weight")
# A block's tensors are read in parallel: one reader moved ~4.8 GB/s from the page cache to an H200,
# eight ~17 GB/s (benchmarks/, probe of 2026-11-26).
READ_THREADS = 8


class TensorFile:
    """Random access to the tensors of one .safetensors file with pread (no memory map). Its header is checked when
    it opens (configs.read_header): a tensor is read only into a buffer of the bytes the file holds for it."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data_start, self.entries, self.size = read_header(self.path)
        self.fd = os.open(path, os.O_RDONLY)

    def keys(self):
        return self.entries.keys()

    def check_shapes(self, shapes: dict) -> None:
        """ValueError naming the first tensor whose shape in the file is not the one the model expects."""
        for name, shape in shapes.items():
            entry = self.entries.get(name)
            if entry is not None and list(entry["shape"]) != list(shape):
                raise ValueError(
                    f"{self.path}: tensor {name} has shape {entry['shape']}, but the config gives {list(shape)}"
                )

    def read(self, name: str, device):
        """One tensor, read into a (pinned, for CUDA) buffer and copied to ``device``."""
        import torch

        entry = self.entries[name]
        start, end = entry["data_offsets"]
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {name} has dtype {entry['dtype']}, which pixart does not read")
        buffer = torch.empty(end - start, dtype=torch.uint8, pin_memory=device.type == "cuda")
        view, offset = memoryview(buffer.numpy()), 0
        while offset < len(view):
            got = os.preadv(self.fd, [view[offset:]], self.data_start + start + offset)
            if got <= 0:
                raise ValueError(f"{self.path}: truncated while reading {name}")
            offset += got
        tensor = buffer.view(getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])).reshape(entry["shape"])
        return tensor if device.type == "cpu" else tensor.to(device)  # the buffer is this tensor's alone

    def close(self) -> None:
        os.close(self.fd)


def tensor_file(path: Path, where: str = ""):
    """A reader of one weights file: ``TensorFile`` for safetensors, ``BinTensors`` for a .bin checkpoint (the
    component's weights where it has no safetensors: files/model_weights.py), with the same interface."""
    if Path(path).suffix == ".bin":
        return BinTensors(path, f"{where}: {Path(path).parent.name}/{Path(path).name}" if where else str(path))
    return TensorFile(path)


def _weight_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> weights file holding it (sharded or single-file checkpoints, safetensors or else .bin, as
    configs.weights_files finds them); an index's shards must be files beside it (configs.shard_names)."""
    folder = Path(folder)
    for single in (folder / "model.safetensors", folder / BIN_WEIGHTS["text_encoder"]):
        index = folder / f"{single.name}.index.json"
        if index.is_file():
            where = str(folder)
            weight_map = read_json(index, index.name, where)
            shard_names(weight_map, index.name, where)
            return {name: folder / file for name, file in weight_map["weight_map"].items()}
        if single.is_file():
            reader = tensor_file(single)
            names = list(reader.keys())
            reader.close()
            return dict.fromkeys(names, single)
    raise FileNotFoundError(f"{folder}: no model.safetensors or {BIN_WEIGHTS['text_encoder']} (or an index of them)")


def parameter_dtypes(model, dtype) -> dict[str, object]:
    """The dtype transformers gives each parameter when loading with ``dtype=``: modules named in
    ``_keep_in_fp32_modules`` stay fp32 under fp16 (T5's ``wo``), and ``..._strict`` ones under bf16 too."""
    import torch

    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    strict = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    fp32 = (keep | strict) if dtype == torch.float16 else strict if dtype == torch.bfloat16 else set()

    def pick(name: str):
        parts = name.split(".")
        return torch.float32 if any(part in fp32 for part in parts) else dtype

    return {name: pick(name) for name, _ in model.named_parameters(remove_duplicate=False)}


class StreamedT5:
    """Owns a meta-device T5 encoder (t5.py, T5EncoderModel's layout) whose blocks are loaded on entry and freed on exit.

    With ``resident=True`` every block is read up front instead (same reader: parallel ``pread``, no memory
    map), which gives a resident T5 without transformers' load pass.
    """

    def __init__(self, folder: Path, dtype, device, resident: bool = False):
        import torch
        from accelerate.utils import set_module_tensor_to_device

        from pixart_cli.models.t5 import t5_encoder

        self.device = device
        self.files = _weight_files(folder)
        self.handles = {file: tensor_file(file) for file in set(self.files.values())}
        self.pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="t5-read")
        config = read_json(Path(folder) / "config.json", "text_encoder/config.json", str(folder))
        with torch.device("meta"):
            # transformers' T5EncoderModel, less the import of transformers' models (t5.py)
            self.model = t5_encoder(config).eval()
        self.dtypes = parameter_dtypes(self.model, dtype)
        # every tensor's shape in the files is the skeleton's before anything is read (a file cannot ask for more)
        expected = {name: tuple(p.shape) for name, p in self.model.named_parameters(remove_duplicate=False)}
        expected["encoder.embed_tokens.weight"] = expected["shared.weight"]
        for handle in self.handles.values():
            handle.check_shapes({name: expected[name] for name in handle.keys() if name in expected})
        # accelerate empties the CUDA cache after every tensor it places (clear_cache=True): 220 times an encode,
        # each a device synchronisation and a cudaFree. The next block's tensors reuse the dropped block's memory
        # through the caching allocator instead (same sizes), and the stage frees the cache once, at its end.
        if "clear_cache" in inspect.signature(set_module_tensor_to_device).parameters:
            self._set = functools.partial(set_module_tensor_to_device, clear_cache=False)
        else:
            self._set = set_module_tensor_to_device
        self.blocks: dict[int, list[str]] = defaultdict(list)
        always_loaded = []
        for name in self.dtypes:
            match = _BLOCK.match(name)
            if match:
                self.blocks[int(match.group(1))].append(name)
            elif name not in _TIED_EMBEDDING:
                always_loaded.append(name)
        # 1. The embedding (tied between `shared` and `encoder.embed_tokens`) and the final norm stay loaded.
        embedding_key = next((key for key in _TIED_EMBEDDING if key in self.files), None)
        if embedding_key is None:
            raise KeyError(f"{folder}: no embedding weight ({' or '.join(_TIED_EMBEDDING)})")
        self._put("shared.weight", self._read([embedding_key])[embedding_key])
        self.model.encoder.embed_tokens.weight = self.model.shared.weight
        self._load(always_loaded)
        if resident:
            # Block by block, not all at once: all fp16 `wo` copies in flight before their fp32 conversion
            # left 1.8 GB of allocator holes (H100, 2026-11-26).
            for index in sorted(self.blocks):
                self._load(self.blocks[index])
            return
        # 2. Each block is read onto the device just before it runs, and dropped after.
        for index, block in enumerate(self.model.encoder.block):
            block.register_forward_pre_hook(self._make_loader(index))
            block.register_forward_hook(self._make_unloader(index))

    # Reading tensors --------------------------------------------------------------------------------------
    def _read(self, names: list[str]) -> dict:
        """Read tensors straight onto the device, several at a time."""
        missing = [name for name in names if name not in self.files]
        if missing:
            raise KeyError(f"tensor {missing[0]} is missing from the text encoder checkpoint")
        tensors = self.pool.map(lambda name: self.handles[self.files[name]].read(name, self.device), names)
        return dict(zip(names, tensors))

    def _put(self, name: str, tensor) -> None:
        # dtype given explicitly: the meta skeleton's own dtype (fp32) would otherwise be used.
        self._set(self.model, name, self.device, value=tensor, dtype=self.dtypes[name])

    def _load(self, names: list[str]) -> None:
        for name, tensor in self._read(names).items():
            self._put(name, tensor)

    def _make_loader(self, index: int):
        def load(module, args):
            self._load(self.blocks[index])

        return load

    def _make_unloader(self, index: int):
        def unload(module, args, output):
            for name in self.blocks[index]:
                self._set(self.model, name, "meta")
            return output

        return unload
