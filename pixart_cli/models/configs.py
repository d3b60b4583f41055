"""A model folder's configs, read within bounds and checked against bounds and against the weights files' headers,
before any skeleton is built or any tensor is read.

A config decides how many blocks a model's skeleton has, how wide its layers are and how large the tables it
computes on the CPU are (the transformer's sin-cos position table): a config of 10⁹ layers, or of layers 10⁷ wide,
would make pixart build or allocate without end. Each bound below sits far above every PixArt checkpoint (the real
value is noted beside it), so it never refuses a real model. Then, for a local folder, the config must agree with
what its safetensors files hold (block counts and the shapes of a few tensors), so a skeleton is never larger than
the weights on disk. A problem is one line naming the model, the file and the value (exit 1: a damaged model).
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

from pixart_cli.errors import EXIT_RUNTIME, PixartError
from pixart_cli.files.formats import entry_layout_valid

MAX_CONFIG_BYTES = 16 * 2**20  # a config or index .json, read whole (PixArt's are under 30 KB)
MAX_SAFETENSORS_HEADER = 100_000_000  # a weights file's JSON header (safetensors' own limit)
# Any other file of a component, read whole by its library (T5's spiece.model: 0.8 MB; a tokenizer.json: 2.4 MB)
MAX_SIDE_FILE_BYTES = 64 * 2**20
MAX_LAYERS = 256  # blocks of the transformer or T5 (PixArt-XL: 28; T5-v1.1-XXL: 24)
MAX_HEADS = 256  # attention heads (16; T5-XXL: 64)
MAX_HEAD_DIM = 1024  # width of one head (72; T5: 64)
MAX_WIDTH = 16_384  # T5's d_model and heads x head width, the caption channels (4096)
# The transformer's heads x head width (1152): its skeleton's layers are made on the CPU for a moment before they
# move to the meta device, the widest (the feed-forward, 4x) 256 MiB at this bound
MAX_TRANSFORMER_WIDTH = 4096
MAX_FF = 65_536  # T5's feed-forward width (10240)
MAX_CHANNELS = 1024  # image and latent channels (3, 4, 8)
MAX_SAMPLE_SIZE = 1024  # the transformer's latent side (128 at 1024 px, 256 at 2048 px)
MAX_PATCH = 16  # the transformer's patch side (2)
MAX_VOCAB = 2**20  # T5's vocabulary (32128)
MAX_VAE_BLOCKS = 8  # VAE resolution levels (4): the VAE's scale factor is 2 ** (levels - 1)
MAX_TIMESTEPS = 100_000  # the scheduler's training timesteps, an array it builds (1000)
# Bytes of the sin-cos position table a transformer skeleton computes on the CPU (in float64 first): 19 MB at
# 1024 px, 75 MB for PixArt-Σ at 2048 px
MAX_POSITION_TABLE = 128 * 2**20

# The weights file each component with weights is saved as (diffusers' and transformers' save_pretrained names);
# a sharded (.index.json), variant (.fp16.safetensors) or .bin file counts too.
WEIGHTS_FILES = {
    "transformer": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}
# Bytes per element of each safetensors dtype
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip

_WHOLE = {  # component -> {field: (low, high, may be null)}; a missing field takes the library's default
    "transformer": {
        "num_layers": (1, MAX_LAYERS, False),
        "num_attention_heads": (1, MAX_HEADS, False),
        "attention_head_dim": (1, MAX_HEAD_DIM, False),
        "in_channels": (1, MAX_CHANNELS, False),
        "out_channels": (1, MAX_CHANNELS, True),
        "sample_size": (1, MAX_SAMPLE_SIZE, False),
        "patch_size": (1, MAX_PATCH, False),
        "caption_channels": (1, MAX_WIDTH, True),
        "cross_attention_dim": (1, MAX_WIDTH, True),
        "num_embeds_ada_norm": (1, MAX_TIMESTEPS, True),
        "norm_num_groups": (1, MAX_CHANNELS, True),
    },
    "text_encoder": {
        "vocab_size": (1, MAX_VOCAB, False),
        "d_model": (1, MAX_WIDTH, False),
        "d_kv": (1, MAX_HEAD_DIM, False),
        "d_ff": (1, MAX_FF, False),
        "num_layers": (1, MAX_LAYERS, False),
        "num_hidden_layers": (1, MAX_LAYERS, False),
        "num_heads": (1, MAX_HEADS, False),
        "relative_attention_num_buckets": (1, 4096, False),
        "relative_attention_max_distance": (1, 2**20, False),
    },
    "vae": {
        "in_channels": (1, MAX_CHANNELS, False),
        "out_channels": (1, MAX_CHANNELS, False),
        "latent_channels": (1, MAX_CHANNELS, False),
        "layers_per_block": (1, 16, False),
        "norm_num_groups": (1, MAX_CHANNELS, False),
        "sample_size": (1, 2**16, False),
    },
    "scheduler": {
        "num_train_timesteps": (1, MAX_TIMESTEPS, False),
        "solver_order": (1, 16, False),
        "predictor_order": (1, 16, False),
        "corrector_order": (1, 16, False),
        "original_inference_steps": (1, MAX_TIMESTEPS, False),
    },
}


# The libraries' own defaults for a field a config leaves out (PixArtTransformer2DModel's, T5Config's,
# AutoencoderKL's): what a skeleton is built with then
LIBRARY_DEFAULTS = {
    "transformer": {"num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "num_layers": 28,
                    "sample_size": 128, "patch_size": 2},
    "text_encoder": {"num_heads": 8, "d_kv": 64, "d_model": 512, "d_ff": 2048, "vocab_size": 32128, "num_layers": 6},
    "vae": {"block_out_channels": [64], "latent_channels": 4, "in_channels": 3, "out_channels": 3,
            "scaling_factor": 0.18215},
}  # fmt: skip


def _field(component: str, config: dict, field: str):
    """A config's field, the library's default where it is missing or null (None: not given)."""
    value = config.get(field)
    return LIBRARY_DEFAULTS[component].get(field) if value is None else value


def read_json(path: Path, name: str, where: str) -> dict:
    """A config or index file: a regular file of at most MAX_CONFIG_BYTES holding one JSON object."""
    from pixart_cli.files.untrusted import open_input, read_at_most

    try:
        handle, size = open_input(path)
    except PixartError as error:
        raise PixartError(f"{where}: {name} {error.reason or 'cannot be read'}", EXIT_RUNTIME) from None
    with handle:
        if size > MAX_CONFIG_BYTES:
            raise PixartError(
                f"{where}: {name} is {size:,} bytes, beyond the {MAX_CONFIG_BYTES // 2**20} MiB pixart reads as a "
                "config; the model folder is damaged",
                EXIT_RUNTIME,
            )
        data = read_at_most(handle, MAX_CONFIG_BYTES, size)
    try:
        if len(data) > MAX_CONFIG_BYTES:
            raise ValueError("it grew while being read")
        value = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as error:  # RecursionError: nested deeper than the parser goes
        reason = "nested too deeply" if isinstance(error, RecursionError) else str(error).splitlines()[0][:120]
        raise PixartError(f"{where}: {name} is broken ({reason})", EXIT_RUNTIME) from None
    if not isinstance(value, dict):
        raise PixartError(f"{where}: {name} is broken (not a JSON object)", EXIT_RUNTIME)
    return value


def check_config(component: str | None, config: dict, name: str, where: str) -> dict:
    """Each field that sizes something within its bound (and of the type the library needs); returns ``config``."""

    def refuse(field: str, value, reason: str):
        shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:40] + "..."
        raise PixartError(
            f"{where}: {name}: {field} {shown} {reason}; the model folder is damaged or not a PixArt model",
            EXIT_RUNTIME,
        )

    if "_class_name" in config and not isinstance(config["_class_name"], str):
        refuse("_class_name", config["_class_name"], "is not a class name")
    if component is None:  # model_index.json: each component is [library, class], or [null, null] where it lacks one
        for part in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
            entry = config.get(part)
            if entry is not None and not (
                isinstance(entry, list) and len(entry) == 2 and all(v is None or isinstance(v, str) for v in entry)
            ):
                refuse(part, entry, "is not a [library, class] pair")
    for field, (low, high, nullable) in _WHOLE.get(component, {}).items():
        if field not in config or (nullable and config[field] is None):
            continue
        value = config[field]
        if type(value) is not int:
            refuse(field, value, "is not a whole number")
        if not low <= value <= high:
            refuse(field, value, f"is outside pixart's bounds ({low} to {high:,})")
    if component == "transformer":
        heads, head_dim = (
            _field("transformer", config, "num_attention_heads"),
            _field("transformer", config, "attention_head_dim"),
        )
        if heads * head_dim > MAX_TRANSFORMER_WIDTH:
            refuse("num_attention_heads x attention_head_dim", heads * head_dim, f"is beyond {MAX_TRANSFORMER_WIDTH:,}")
        side = _field("transformer", config, "sample_size") // _field("transformer", config, "patch_size")
        table = side * side * heads * head_dim * 4
        if side < 1 or table > MAX_POSITION_TABLE:
            refuse(
                "sample_size",
                _field("transformer", config, "sample_size"),
                f"makes a {table / 2**20:,.0f} MiB position table with patch_size {_field('transformer', config, 'patch_size')}, "
                f"beyond pixart's {MAX_POSITION_TABLE // 2**20} MiB",
            )
        scale = config.get("interpolation_scale")
        if scale is not None and not (_number(scale) and 0 < scale <= MAX_SAMPLE_SIZE):
            refuse("interpolation_scale", scale, "is not a positive number")
    elif component == "text_encoder":
        if _field("text_encoder", config, "num_heads") * _field("text_encoder", config, "d_kv") > MAX_WIDTH:
            refuse(
                "num_heads x d_kv",
                _field("text_encoder", config, "num_heads") * _field("text_encoder", config, "d_kv"),
                f"is beyond {MAX_WIDTH:,}",
            )
    elif component == "vae":
        channels = _field("vae", config, "block_out_channels")
        if not (isinstance(channels, list) and 1 <= len(channels) <= MAX_VAE_BLOCKS):
            refuse("block_out_channels", channels, f"is not a list of 1 to {MAX_VAE_BLOCKS} widths")
        if not all(type(c) is int and 1 <= c <= MAX_WIDTH for c in channels):
            refuse("block_out_channels", channels, f"holds a width that is not from 1 to {MAX_WIDTH:,}")
        for field in ("down_block_types", "up_block_types"):
            kinds = config.get(field)
            if kinds is not None and not (isinstance(kinds, list) and len(kinds) == len(channels)):
                refuse(field, kinds, f"does not name one block for each of the {len(channels)} block_out_channels")
        factor = _field("vae", config, "scaling_factor")
        if not (_number(factor) and factor > 0):
            refuse("scaling_factor", factor, "is not a positive number")
    return config


def _given(config: dict, field: str, default):
    """A field's value, the default where it is missing or null (None: not given)."""
    return default if config.get(field) is None else config[field]


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_files(folder: Path, component: str, where: str) -> None:
    """Every file of a local component is a regular file (a FIFO would block its library's read, a device never
    end), and every file but the weights within MAX_CONFIG_BYTES (.json) or MAX_SIDE_FILE_BYTES: they are read
    whole, by pixart or by the component's library (a tokenizer's)."""
    from pixart_cli.files.atomic import FILE_KINDS

    try:
        entries = list(os.scandir(folder))
    except OSError:
        return  # a component that is missing is named where it is needed
    for entry in entries:
        name = f"{component}/{entry.name}"
        try:
            info = os.stat(entry.path)  # through a link, as the libraries open it (the hub cache links to blobs)
        except OSError:
            raise PixartError(f"{where}: {name} is a broken link; the model folder is damaged", EXIT_RUNTIME) from None
        if stat.S_ISDIR(info.st_mode):
            continue
        if not stat.S_ISREG(info.st_mode):
            kind = next((kind for test, kind in FILE_KINDS if test(info.st_mode)), "not a regular file")
            raise PixartError(f"{where}: {name} is {kind}, not a file; the model folder is damaged", EXIT_RUNTIME)
        if entry.name.endswith((".safetensors", ".bin")):
            continue  # read by offsets, within their headers
        config = entry.name.endswith(".json")
        limit = MAX_CONFIG_BYTES if config else MAX_SIDE_FILE_BYTES
        if info.st_size > limit:
            raise PixartError(
                f"{where}: {name} is {info.st_size:,} bytes, beyond the {limit // 2**20} MiB pixart reads as "
                f"{'a config' if config else 'a model file'}; the model folder is damaged",
                EXIT_RUNTIME,
            )


# --- the weights files' headers ---------------------------------------------------------------------------------
def shard_names(index: dict, index_name: str, where: str) -> set[str]:
    """The shard files an index names: plain file names in the component's folder (a shard elsewhere, through a
    path such as ``../../x``, is refused)."""
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise PixartError(
            f"{where}: {index_name} has no weight_map of file names; the model folder is damaged", EXIT_RUNTIME
        )
    names = set(weight_map.values())
    for shard in sorted(names):
        if shard in ("", ".", "..") or os.path.basename(shard) != shard or "\\" in shard or "\0" in shard:
            raise PixartError(
                f"{where}: {index_name} names the shard {shard[:120]!r}, outside the component's folder; pixart reads "
                "only shards beside their index: the model folder is damaged",
                EXIT_RUNTIME,
            )
    return names


def weights_files(folder: Path, component: str, where: str) -> list[Path] | None:
    """The files a local component's loader reads its weights from: its safetensors (an index's shards, or the one
    file) or, where it has none, its .bin checkpoint (files/model_weights.py: one rule for every component); None
    when it has neither."""
    from pixart_cli.files.model_weights import BIN_WEIGHTS

    for single in (folder / WEIGHTS_FILES[component], folder / BIN_WEIGHTS[component]):
        index = folder / f"{single.name}.index.json"
        if index.is_file():
            names = sorted(shard_names(read_json(index, index.name, where), index.name, where))
            return [folder / name for name in names]
        if single.is_file():
            return [single]
    return None


def header_shapes(folder: Path, component: str, where: str) -> dict[str, list] | None:
    """Tensor name -> shape, from the headers of a local component's weights files (``weights_files``; a .bin
    checkpoint memory-mapped, its data unread); None when it has none."""
    from pixart_cli.files.model_weights import weights_header

    files = weights_files(folder, component, where)
    if files is None:
        return None
    shapes = {}
    for path in files:
        if path.suffix == ".bin":
            entries = weights_header(path, f"{where}: {component}/{path.name}")
            shapes.update({name: list(shape) for name, (_, shape) in entries.items()})
            continue
        try:
            _, entries, _ = read_header(path)
        except (OSError, ValueError) as error:
            raise PixartError(
                f"{where}: {component}/{path.name} is damaged ({str(error).removeprefix(f'{path}: ')[:120]}); "
                "download the model again",
                EXIT_RUNTIME,
            ) from None
        shapes.update({name: entry["shape"] for name, entry in entries.items()})
    return shapes


def read_header(path: Path) -> tuple[int, dict, int]:
    """(where the data starts, tensor name -> header entry, file size) of a safetensors file, every entry checked:
    a known dtype, a shape of whole numbers, and offsets inside the file spanning exactly the shape's bytes, so that
    reading a tensor never allocates more than the file holds for it. ValueError (naming the file) otherwise."""
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise ValueError(f"{path}: not a safetensors file (too short)")
        length = int.from_bytes(prefix, "little")
        if not 0 < length <= min(MAX_SAFETENSORS_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file (header length {length})")
        try:
            header = json.loads(handle.read(length))
        except (ValueError, RecursionError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is not a JSON object)")
    data_size = size - 8 - length
    entries = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        fields = entry if isinstance(entry, dict) else {}
        shape, offsets = fields.get("shape"), fields.get("data_offsets")
        valid = (
            fields.get("dtype") in DTYPE_SIZES
            and entry_layout_valid(shape, offsets, data_size)
            and math.prod(shape) * DTYPE_SIZES[fields["dtype"]] == offsets[1] - offsets[0]
        )
        if not valid:
            raise ValueError(f"{path}: tensor {str(name)[:80]} has a broken header entry")
        entries[name] = entry
    return 8 + length, entries, size


def expected_shapes(component: str, config: dict) -> tuple[dict[str, list], dict[str, int]]:
    """(a few tensors' shapes, block counts) that a component's config implies, in diffusers' or transformers'
    naming."""
    if component == "transformer":
        inner = _field("transformer", config, "num_attention_heads") * _field(
            "transformer", config, "attention_head_dim"
        )
        patch, channels = _field("transformer", config, "patch_size"), _field("transformer", config, "in_channels")
        out = _given(config, "out_channels", channels)
        shapes = {
            "pos_embed.proj.weight": [inner, channels, patch, patch],
            "proj_out.weight": [patch * patch * out, inner],
            "transformer_blocks.0.attn2.to_k.weight": [inner, _given(config, "cross_attention_dim", inner)],
        }
        if config.get("caption_channels") is not None:
            shapes["caption_projection.linear_1.weight"] = [inner, config["caption_channels"]]
        return shapes, {"transformer_blocks.": _field("transformer", config, "num_layers")}
    if component == "text_encoder":
        d_model, width = (
            _field("text_encoder", config, "d_model"),
            _field("text_encoder", config, "num_heads") * _field("text_encoder", config, "d_kv"),
        )
        layers = _given(
            config, "num_layers", _given(config, "num_hidden_layers", LIBRARY_DEFAULTS["text_encoder"]["num_layers"])
        )
        shapes = {
            "shared.weight": [_field("text_encoder", config, "vocab_size"), d_model],
            "encoder.block.0.layer.0.SelfAttention.q.weight": [width, d_model],
            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": [_field("text_encoder", config, "d_ff"), d_model],
            "encoder.block.0.layer.1.DenseReluDense.wi.weight": [_field("text_encoder", config, "d_ff"), d_model],
        }
        return shapes, {"encoder.block.": layers}
    channels = _field("vae", config, "block_out_channels")
    latent = _field("vae", config, "latent_channels")
    shapes = {
        "encoder.conv_in.weight": [channels[0], _field("vae", config, "in_channels"), 3, 3],
        "decoder.conv_in.weight": [channels[-1], latent, 3, 3],
        "decoder.conv_out.weight": [_field("vae", config, "out_channels"), channels[0], 3, 3],
    }
    return shapes, {"encoder.down_blocks.": len(channels), "decoder.up_blocks.": len(channels)}


def check_against_weights(folder: Path, component: str, config: dict, name: str, where: str) -> None:
    """The config agrees with the component's safetensors headers: each block count, and each tensor shape it
    implies that the file holds (a layout that names them otherwise is left to its loader)."""
    shapes = header_shapes(folder, component, where)
    if shapes is None:
        return
    wanted, counts = expected_shapes(component, config)
    if component == "text_encoder" and "shared.weight" not in shapes:
        wanted["encoder.embed_tokens.weight"] = wanted.pop("shared.weight")
    for tensor, shape in wanted.items():
        found = shapes.get(tensor)
        if found is not None and list(found) != shape:
            raise PixartError(
                f"{where}: {name} implies {tensor} of shape {shape}, but the weights hold {list(found)}; the model "
                "folder is damaged or mixed: download it again",
                EXIT_RUNTIME,
            )
    for prefix, count in counts.items():
        blocks = {tensor[len(prefix) :].split(".", 1)[0] for tensor in shapes if tensor.startswith(prefix)}
        if blocks and blocks != {str(index) for index in range(count)}:
            raise PixartError(
                f"{where}: {name} gives {count} {prefix.rstrip('.')}, but the weights hold {len(blocks)}; the model "
                "folder is damaged or mixed: download it again",
                EXIT_RUNTIME,
            )
