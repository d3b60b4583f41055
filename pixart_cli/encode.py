"""Stage 1: prompts -> T5 embeddings. Loads only the tokenizer and the text encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pixart_cli import artifacts, memory, runtime
from pixart_cli.errors import PixartError
from pixart_cli.models import Model, load_component, stage_pipeline

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
    from transformers import T5Config, T5EncoderModel

    from pixart_cli.streaming import parameter_dtypes

    config = T5Config.from_dict(source.config("text_encoder"))
    skeleton = memory.meta_model(T5EncoderModel, config, dtype)
    dtypes = parameter_dtypes(skeleton, dtype)
    sizes = {name: p.numel() * dtypes[name].itemsize for name, p in skeleton.named_parameters()}
    block = sum(size for name, size in sizes.items() if name.startswith("encoder.block.0."))
    embedding = sizes.get("shared.weight", 0)
    return memory.plan_encode(budget, context, sum(sizes.values()), block, embedding, min(texts, BATCH) * max_length,
                              config.d_ff, dtype.itemsize, precision)


def _load_text_encoder(source: Model, chosen: memory.Plan, dtype, device):
    """The T5 encoder for a plan: resident (straight onto the device), streamed, or bitsandbytes-quantized."""
    from transformers import T5EncoderModel

    if chosen.name == "streamed":
        from pixart_cli.streaming import StreamedT5

        try:
            return StreamedT5(source.folder("text_encoder"), dtype, device).model
        except (OSError, KeyError, ValueError) as error:
            raise PixartError(f"--model {source.id}: cannot stream text_encoder/ ({error})", 1) from error
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
           vram: str | None = None, precision: str = "full", revision: str | None = None,
           progress: Progress | None = None, log: Callable[[str], None] | None = None,
           reports: list | None = None) -> artifacts.Embeddings:
    """Encode prompts (and the negative prompt) with T5, as the pipeline's ``__call__`` does.

    Returns Embeddings: prompt_embeds / negative_prompt_embeds [B, L, C], masks [B, L], L = max_sequence_length.
    """
    import torch
    from transformers import T5Tokenizer

    # 1. Check inputs, read the model's facts, pick a plan for the budget
    prompts = list(prompts)
    check_inputs(prompts, negative_prompt, max_sequence_length, clean_caption, precision)
    budget_bytes = memory.parse_vram(vram)
    source = Model(model, revision)
    family = source.family
    max_length = family.max_sequence_length if max_sequence_length is None else max_sequence_length
    torch_device = runtime.resolve_device(device)
    torch_dtype = runtime.resolve_dtype(dtype, torch_device)
    if precision != "full" and torch_device.type != "cuda":
        raise PixartError(f"--text-encoder-precision {precision}: bitsandbytes quantization needs a CUDA GPU; "
                          "use full precision (--dtype bf16 halves T5's memory on CPU)")
    meter = memory.Meter("encode", torch_device)
    budget, context = memory.device_budget(budget_bytes, torch_device)
    texts = prompts + [negative_prompt]
    chosen = plan(source, budget, context, torch_dtype, len(texts), max_length, precision)
    if log:
        log(chosen.describe())

    # 2. Load the tokenizer and T5 only; dtype at load time (a later .to(fp16) breaks T5, diffusers #8604)
    with meter.phase("load"):
        tokenizer = load_component(source, "tokenizer", T5Tokenizer.from_pretrained)
        text_encoder = _load_text_encoder(source, chosen, torch_dtype, torch_device)
        pipe = stage_pipeline(source, tokenizer=tokenizer, text_encoder=text_encoder)

    # 3. Prompts and the negative prompt in as few T5 calls as possible, with the pipeline's own
    #    encode_prompt (same cleaning, padding and truncation as __call__; without CFG it encodes the list as is)
    rows, masks = [], []
    with meter.phase("compute"), torch.inference_mode():
        for start in range(0, len(texts), BATCH):
            chunk = texts[start:start + BATCH]
            embeds, mask, _, _ = pipe.encode_prompt(chunk, do_classifier_free_guidance=False, device=torch_device,
                                                    clean_caption=clean_caption, max_sequence_length=max_length)
            rows.append(embeds.cpu())
            masks.append(mask.cpu())
            if progress:
                progress("encode", min(start + BATCH, len(texts)), len(texts))
    embeds, mask = torch.cat(rows), torch.cat(masks)
    count = len(prompts)
    negative = embeds[count:].expand(count, -1, -1).clone()
    negative_mask = mask[count:].expand(count, -1).clone()
    del pipe, text_encoder
    runtime.free(torch_device)
    report = meter.finish()
    report.plan = chosen.name
    if reports is not None:
        reports.append(report)

    # 4. Record what the next stage needs
    meta = {
        "format": artifacts.EMBEDDINGS_FORMAT, "version": artifacts.FORMAT_VERSION,
        "model": source.id, "revision": revision, "family": family.name, "dtype": runtime.dtype_name(torch_dtype),
        "prompts": prompts, "negative_prompt": negative_prompt, "max_sequence_length": max_length,
        "clean_caption": clean_caption, "text_encoder_precision": precision,
    }
    return artifacts.Embeddings(embeds[:count], mask[:count], negative, negative_mask, meta)
