"""Stage 1: prompts -> T5 embeddings. Loads only the tokenizer and the text encoder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

from pixart_cli import artifacts, memory, runtime
from pixart_cli.errors import PixartError
from pixart_cli.models import Model, load_component

Progress = Callable[[str, int, int], None]
PRECISIONS = ("full", "8bit", "4bit")
BATCH = 16  # texts per T5 call: a streamed T5 reads its weights once per call


def check_inputs(prompts: Sequence[str], negative_prompt: str, max_sequence_length: int | None,
                 clean_caption: bool, precision: str = "full") -> None:
    """Reject bad prompts and settings before anything loads."""
    if not prompts:
        raise PixartError("PROMPT: give at least one prompt")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, str) or not prompt.strip():
            raise PixartError(f"PROMPT #{index + 1} is empty; give some text to draw")
    if not isinstance(negative_prompt, str):
        raise PixartError(f"--negative-prompt {negative_prompt!r}: must be text")
    if max_sequence_length is not None and not 1 <= max_sequence_length <= 4096:
        raise PixartError(f"--max-sequence-length {max_sequence_length}: must be between 1 and 4096")
    if precision not in PRECISIONS:
        raise PixartError(f"--text-encoder-precision {precision!r}: use full, 8bit or 4bit")
    if clean_caption:
        import importlib.util

        missing = [name for name, module in (("beautifulsoup4", "bs4"), ("ftfy", "ftfy"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            # diffusers would silently skip cleaning and give a different image than the pipeline's default.
            raise PixartError(f"caption cleaning needs {' and '.join(missing)}: pip install {' '.join(missing)}, "
                              "or pass --no-clean-caption")


def plan(source: Model, budget: int | None, context: int, dtype, texts: int, max_length: int,
         precision: str = "full") -> memory.Plan:
    """Pick resident / streamed / quantized T5 from exact sizes counted on the meta device."""
    import torch

    from pixart_cli.streaming import parameter_dtypes
    from pixart_cli.t5 import t5_config, t5_encoder

    config = t5_config(source.config("text_encoder"))
    skeleton = memory.meta_model(t5_encoder, source.config("text_encoder"), dtype)
    dtypes = parameter_dtypes(skeleton, dtype)
    sizes = {name: p.numel() * dtypes[name].itemsize for name, p in skeleton.named_parameters()}
    block = sum(size for name, size in sizes.items() if name.startswith("encoder.block.0."))
    embedding = sizes.get("shared.weight", 0)
    # bitsandbytes quantizes the blocks' Linear weights, except those transformers keeps in fp32 (`wo`)
    linear = {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}
    quantizable = sum(size for name, size in sizes.items() if name in linear and dtypes[name] == dtype)
    return memory.plan_encode(budget, context, sum(sizes.values()), block, embedding, min(texts, BATCH) * max_length,
                              config.d_ff, dtype.itemsize, precision, quantizable)


def _load_text_encoder(source: Model, chosen: memory.Plan, dtype, device):
    """The T5 encoder for a plan: resident or streamed through our reader, or bitsandbytes-quantized."""
    if chosen.name in ("streamed", "resident"):
        # Our reader (parallel pread, no memory map) serves both plans: low RSS, and faster than transformers'
        # loader (README, benchmark).
        from pixart_cli.streaming import StreamedT5

        def read(**_):
            folder = source.folder("text_encoder")
            return StreamedT5(folder, dtype, device, resident=chosen.name == "resident").model

        return load_component(source, "text_encoder", read)
    from transformers import T5EncoderModel

    kwargs = {"dtype": dtype}
    if chosen.name.startswith("resident-"):
        from transformers import BitsAndBytesConfig

        bits = chosen.name.removeprefix("resident-")
        kwargs["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else
                                         BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype))
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}  # read shards straight to the GPU: no full copy in CPU RAM
    model = load_component(source, "text_encoder", T5EncoderModel.from_pretrained, **kwargs)
    if device.type != "cuda":
        model.to(device)
    return model.eval()


def encode(prompts: Sequence[str], *, model: str, negative_prompt: str = "", device: str = "auto",
           dtype: str = "auto", max_sequence_length: int | None = None, clean_caption: bool = True,
           vram: str | None = None, precision: str = "full", revision: str | None = None, cache=None,
           progress: Progress | None = None, log: Callable[[str], None] | None = None,
           reports: list | None = None) -> artifacts.Embeddings:
    """Encode prompts (and the negative prompt) with T5, as the pipeline's ``__call__`` does.

    Returns Embeddings: prompt_embeds / negative_prompt_embeds [B, L, C], masks [B, L], L = max_sequence_length.
    With ``cache`` (a folder), prompts encoded before with the same model and settings skip T5.
    """
    import torch

    # 1. Check inputs and read the model's facts
    prompts = list(prompts)
    check_inputs(prompts, negative_prompt, max_sequence_length, clean_caption, precision)
    memory.parse_vram(vram)
    source = Model(model, revision)
    family = source.family
    max_length = family.max_sequence_length if max_sequence_length is None else max_sequence_length
    torch_device = runtime.resolve_device(device)
    torch_dtype = runtime.resolve_dtype(dtype, torch_device)
    if precision != "full" and torch_device.type != "cuda":
        raise PixartError(f"--text-encoder-precision {precision}: bitsandbytes quantization needs a CUDA GPU; "
                          "use full precision (--dtype bf16 halves T5's memory on CPU)")
    meter = memory.Meter("encode", torch_device)
    settings = {"model": source.id, "revision": revision, "text_encoder": source.config("text_encoder"),
                "negative_prompt": negative_prompt, "max_sequence_length": max_length,
                "clean_caption": clean_caption, "dtype": runtime.dtype_name(torch_dtype), "precision": precision}
    store = EmbeddingCache(cache, settings) if cache is not None else None
    rows = {prompt: store.get(prompt) for prompt in prompts} if store else {}
    todo = [prompt for prompt in dict.fromkeys(prompts) if rows.get(prompt) is None]

    # 2. Encode what the cache lacks: those prompts and the negative prompt, in as few T5 calls as possible
    plan_name = "cache"
    if todo:
        (embeds, mask), plan_name = _encode_texts(source, todo + [negative_prompt], max_length, clean_caption,
                                                  torch_dtype, torch_device, vram, precision, meter, progress, log)
        for index, prompt in enumerate(todo):
            rows[prompt] = (embeds[index:index + 1], mask[index:index + 1], embeds[-1:], mask[-1:])
            if store:
                store.put(prompt, rows[prompt])
    elif log:
        log(f"encode: all {len(prompts)} prompt(s) found in the cache {cache}; T5 not loaded")
    tensors = [torch.cat([rows[prompt][i] for prompt in prompts]) for i in range(4)]
    meter.finish(plan_name, reports)

    # 3. Record what the next stage needs
    meta = {
        "format": artifacts.EMBEDDINGS_FORMAT, "version": artifacts.FORMAT_VERSION,
        "model": source.id, "revision": revision, "family": family.name, "dtype": runtime.dtype_name(torch_dtype),
        "prompts": prompts, "negative_prompt": negative_prompt, "max_sequence_length": max_length,
        "clean_caption": clean_caption, "text_encoder_precision": precision,
    }
    return artifacts.Embeddings(*tensors, meta=meta)


def _encode_texts(source: Model, texts: list[str], max_length: int, clean_caption: bool, dtype, device,
                  vram: str | None, precision: str, meter: memory.Meter, progress, log):
    """Load T5 under a memory plan and encode ``texts``. Returns ((embeds [N, L, C], mask [N, L]), plan name)."""
    import torch

    from pixart_cli.lean import import_transformers
    from pixart_cli.prompts import encode_prompts

    T5Tokenizer = import_transformers("transformers.models.t5.tokenization_t5").T5Tokenizer

    budget, context = memory.device_budget(vram, device)
    chosen = plan(source, budget, context, dtype, len(texts), max_length, precision)
    if log:
        log(chosen.describe())

    # Load the tokenizer and T5 only; dtype at load time (a later .to(fp16) breaks T5, diffusers #8604)
    with meter.phase("load"):
        tokenizer = load_component(source, "tokenizer", T5Tokenizer.from_pretrained)
        text_encoder = _load_text_encoder(source, chosen, dtype, device)

    # The pipeline's encode_prompt (prompts.py: same cleaning, padding and truncation as __call__; without CFG
    # it encodes the list as given). Its warning naming the text cut off a long prompt is passed on.
    embeds, masks = [], []
    with meter.phase("compute"), torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            chunk = texts[start:start + BATCH]
            chunk_embeds, chunk_mask = encode_prompts(
                tokenizer, text_encoder, chunk, max_length=max_length, clean_caption=clean_caption, device=device,
                warn=(lambda message: log(f"warning: {message}")) if log else None)
            embeds.append(chunk_embeds.cpu())
            masks.append(chunk_mask.cpu())
            if progress:
                progress("encode", min(start + BATCH, len(texts)), len(texts))
    del text_encoder
    runtime.free(device)
    return (torch.cat(embeds), torch.cat(masks)), chosen.name


class EmbeddingCache:
    """One embeddings file per (model, T5 config, prompt, settings), named by their hash; read back validated."""

    def __init__(self, folder, settings: dict):
        self.folder = Path(folder).expanduser()
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise PixartError(f"--cache {folder}: cannot create it ({error.strerror})") from None
        self.settings = settings

    def path(self, prompt: str) -> Path:
        key = json.dumps({**self.settings, "prompt": prompt}, sort_keys=True)
        return self.folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.pt"

    def get(self, prompt: str):
        """(embeds, mask, negative, negative mask) of one prompt, each [1, ...], or None."""
        path = self.path(prompt)
        if not path.is_file():
            return None
        try:
            entry = artifacts.load_embeddings(path)
        except PixartError:
            return None  # a damaged entry is encoded again and rewritten
        return tuple(entry.tensors().values()) if entry.meta.get("prompts") == [prompt] else None

    def put(self, prompt: str, row: tuple) -> None:
        meta = {"format": artifacts.EMBEDDINGS_FORMAT, "version": artifacts.FORMAT_VERSION,
                "model": self.settings["model"], "family": "cache", "dtype": self.settings["dtype"],
                "prompts": [prompt], "max_sequence_length": self.settings["max_sequence_length"]}
        artifacts.save(self.path(prompt), artifacts.Embeddings(*row, meta=meta))
