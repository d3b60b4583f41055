"""Hostile .pt files, built the way an attacker would (torch.save and hand-made pickles), and a loader worker that
reads them under an address-space limit so a file that bloats or hangs fails the test instead of the machine.

Run as a script it is the worker: one path per line on stdin; one JSON answer per line on stdout.
"""

from __future__ import annotations

import io
import json
import os
import resource
import subprocess
import sys
import zipfile
from pathlib import Path

import torch

WORKER_HEADROOM = 1 << 30  # address space the worker may grow by while reading one file, beyond torch itself
CASE_SECONDS = 20.0  # a read that takes longer than this hangs (a legitimate one takes milliseconds)


# --- building files --------------------------------------------------------------------------------------
def to_bytes(data) -> bytes:
    buffer = io.BytesIO()
    torch.save(data, buffer)
    return buffer.getvalue()


def rezip(blob: bytes, compress: int = zipfile.ZIP_STORED, pickle_patch=None, extra_size: int = 0) -> bytes:
    """Rewrite a torch.save archive: compress its entries, patch data.pkl (bytes -> bytes), or make an entry
    claim more bytes than it has (``extra_size``)."""
    source = zipfile.ZipFile(io.BytesIO(blob))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compress) as archive:
        for info in source.infolist():
            data = source.read(info.filename)
            if pickle_patch and info.filename.endswith("data.pkl"):
                data = pickle_patch(data)
            archive.writestr(info.filename, data)
    raw = out.getvalue()
    if extra_size:  # inflate the sizes recorded in the central directory of the first entry
        info = zipfile.ZipFile(io.BytesIO(raw)).infolist()[0]
        raw = bytearray(raw)
        start = raw.find(b"PK\x01\x02")  # the first central-directory record
        raw[start + 24 : start + 28] = (info.file_size + extra_size).to_bytes(4, "little")
        raw = bytes(raw)
    return raw


MARK = "DEEP_MARK"


def deep_meta_file(good: dict, depth: int) -> bytes:
    """``meta.extra`` nested ``depth`` lists deep, made by hand-written pickle opcodes (pickle itself recurses)."""
    data = dict(good)
    data["meta"] = dict(good["meta"], extra=MARK)
    mark = b"X" + len(MARK).to_bytes(4, "little") + MARK.encode()
    return rezip(to_bytes(data), pickle_patch=lambda pkl: pkl.replace(mark, b"]" * depth + b"a" * (depth - 1)))


def shared_meta(depth: int, width: int = 2) -> list:
    """A DAG through the pickle memo: each level is a list holding the level below ``width`` times."""
    level: list = ["leaf"]
    for _ in range(depth):
        level = [level] * width
    return level


def cyclic_meta(kind: str):
    if kind == "list":
        value: list = []
        value.append(value)
        return value
    value = {}
    value["self"] = {"up": value}
    return value


def exotic_tensor(kind: str, shape: tuple):
    base = torch.zeros(shape)
    return {
        "sparse_coo": lambda: base.to_sparse(),
        "sparse_csr": lambda: base.reshape(shape[0], -1).to_sparse_csr(),
        "meta": lambda: torch.empty(shape, device="meta"),
        "quantized": lambda: torch.quantize_per_tensor(base, 0.1, 0, torch.qint8),
        "float8_e4m3fn": lambda: base.to(torch.float8_e4m3fn),
        "float8_e5m2": lambda: base.to(torch.float8_e5m2),
        "complex64": lambda: base.to(torch.complex64),
        "int64": lambda: base.long(),
        "uint16": lambda: base.to(torch.uint16),
    }[kind]()


def strided_trick(kind: str, shape: tuple, huge: int, dtype=torch.float32):
    """Views whose declared elements the storage does not hold, or holds overlapping (never materialized here)."""
    if kind == "expand":  # stride 0: one element declared `huge` times
        return torch.zeros((1,) * len(shape), dtype=dtype).expand(huge, *shape[1:])
    if kind == "overlap":  # the last dimension's elements all alias one (the storage still holds them all)
        numel = int(torch.tensor(shape).prod())
        strides = torch.zeros(shape).stride()
        return torch.zeros(numel, dtype=dtype).as_strided(shape, (*strides[:-1], 0))
    if kind == "gap":  # strides larger than the sizes: a view of every other element
        return torch.zeros(*shape[:-1], shape[-1] * 2, dtype=dtype)[..., ::2]
    raise ValueError(kind)


# --- LoRA files, model folders, manifests ----------------------------------------------------------------------
LORA_MODULE = "transformer.proj_out"  # a layer of the tiny transformer: weight [32, 16]


def lora_bytes(tensors: dict | None = None, metadata: dict | None = None, rank: int = 4, dtype=torch.float32) -> bytes:
    """A LoRA .safetensors file's bytes (by default one module of the tiny transformer, ``rank``, ``dtype``)."""
    from safetensors.torch import save

    if tensors is None:
        tensors = {
            f"{LORA_MODULE}.lora_A.weight": torch.zeros(rank, 16, dtype=dtype),
            f"{LORA_MODULE}.lora_B.weight": torch.zeros(32, rank, dtype=dtype),
        }
    return save({key: value.contiguous() for key, value in tensors.items()}, metadata=metadata)


def adapter_metadata(**fields) -> dict:
    """diffusers' lora_adapter_metadata with the transformer's LoraConfig ``fields`` (values as JSON text)."""
    return {"lora_adapter_metadata": "{" + ", ".join(f'"transformer.{k}": {v}' for k, v in fields.items()) + "}"}


def raw_safetensors(header: dict | bytes, data: bytes = b"") -> bytes:
    """A safetensors file from a hand-written header (a dict, or its raw bytes) and data."""
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    return len(blob).to_bytes(8, "little") + blob + data


def model_copy(source: Path, target: Path) -> Path:
    """A copy of a model folder whose configs a case may change (weights hard-linked: never written)."""
    import shutil

    shutil.copytree(source, target, copy_function=os.link)
    for config in [*target.glob("*.json"), *target.glob("*/*.json")]:  # own copies, never written through a link
        data = config.read_bytes()
        config.unlink()
        config.write_bytes(data)
    return target


def set_config(folder: Path, component: str, **fields) -> None:
    """Change fields of a component's config in a model_copy."""
    path = folder / component / ("scheduler_config.json" if component == "scheduler" else "config.json")
    config = json.loads(path.read_text())
    config.update(fields)
    path.write_text(json.dumps(config))


# --- reading under limits --------------------------------------------------------------------------------
class Worker:
    """A long-lived python process that reads files with pixart's loaders under RLIMIT_AS; restarted after a
    case kills it. ``read(path, loader)`` -> the worker's answer dict, or {"outcome": "hang" | "died"}."""

    def __init__(self):
        self.process = None

    def start(self):
        self.process = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=Path(__file__).parent,
        )
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def read(self, path, loader: str = "any", **extra) -> dict:
        import selectors

        if self.process is None or self.process.poll() is not None:
            self.start()
        self.process.stdin.write(json.dumps({"path": str(path), "loader": loader, **extra}) + "\n")
        self.process.stdin.flush()
        selector = selectors.DefaultSelector()
        selector.register(self.process.stdout, selectors.EVENT_READ)
        if not selector.select(CASE_SECONDS):
            self.stop()
            return {"outcome": "hang"}
        line = self.process.stdout.readline()
        if not line:
            self.stop()
            return {"outcome": "died"}
        return json.loads(line)

    def stop(self):
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


def plan_model(folder) -> None:
    """Everything a generate run does with a model folder before T5 loads (the configs read and checked against
    their weights, the schedule, the sizes), then the three skeletons its stages build to plan memory."""
    from pixart_cli.models import memory
    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.models.source import Model, config_where
    from pixart_cli.models.vae import decoder_skeleton as vae_skeleton
    from pixart_cli.plan import plan_run
    from pixart_cli.settings import DenoiseSettings, EncodeSettings
    from pixart_cli.stages import encode

    model = Model(str(folder))
    plan_run(["a cat"], EncodeSettings(clean_caption=False), DenoiseSettings(steps=2, seed=0), model)
    encode.plan(model, None, 0, torch.float32, 1, 120)
    transformer = import_diffusers("diffusers.models.transformers.pixart_transformer_2d").PixArtTransformer2DModel
    config = model.config("transformer")
    memory.meta_model(transformer.from_config, config, torch.float32, True, config_where(model, "transformer"))
    memory.meta_model(vae_skeleton, model.config("vae"), torch.float32, where=config_where(model, "vae"))


def _serve() -> None:
    from pixart_cli.errors import PixartError
    from pixart_cli.files import lora_file, staged
    from pixart_cli.models.cache import EmbeddingCache

    # what the loaders import, imported before the limit is measured (the limit is for reading, not importing)
    from pixart_cli.models.facade import import_diffusers
    from pixart_cli.record import RunRecord
    from pixart_cli.scale import manifest

    import_diffusers("diffusers.models.transformers.pixart_transformer_2d")
    import_diffusers("diffusers.models.autoencoders.vae")
    import safetensors.torch  # noqa: F401

    with open("/proc/self/status") as status:
        size = int(status.read().split("VmSize:")[1].split()[0]) * 1024
    limit = size + WORKER_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    loaders = {
        "any": staged.load_any,
        "embeddings": staged.load_embeddings,
        "latents": staged.load_latents,
        "describe": lambda path: json.dumps(staged.describe(path), allow_nan=False),
        "lora": lambda path: lora_file.read_lora(lora_file.LoraSpec(Path(path))),
        "model": plan_model,
        "manifest": lambda path: manifest.base_seed(Path(path), manifest.read(Path(path), 10), 10),
    }
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        path = request["path"]
        try:
            if request["loader"] == "cache":
                settings = dict(request["settings"])
                text_encoder = {**settings.pop("text_encoder"), "d_model": request["width"]}
                made = RunRecord(text_encoder_precision=settings.pop("precision"), **settings)
                cache = EmbeddingCache(request["folder"], made, text_encoder, torch.float32)
                os.replace(path, cache.path(request["prompt"]))
                answer = {"outcome": "miss" if cache.get(request["prompt"]) is None else "hit"}
            else:
                loaders[request["loader"]](path)
                answer = {"outcome": "accepted"}
        except PixartError as error:
            answer = {"outcome": "refused", "message": str(error)}
        except BaseException as error:
            answer = {"outcome": "crashed", "message": f"{type(error).__name__}: {error}"[:300]}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent.parent))
    _serve()
