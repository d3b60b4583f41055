"""Stage 1: prompts -> T5 embeddings. Loads only the tokenizer and the text encoder."""

from __future__ import annotations

from collections.abc import Sequence

from pixart_cli import record
from pixart_cli.errors import PixartError
from pixart_cli.files import staged
from pixart_cli.models import memory
from pixart_cli.models.source import Model, config_where, load_component
from pixart_cli.plan import max_sequence_length
from pixart_cli.runtime import RunContext
from pixart_cli.settings import EncodeSettings, check_prompts


def plan(
    source: Model, budget: int | None, context: int, dtype, texts: int, max_length: int, precision: str = "full"
) -> memory.Plan:
    """Pick resident / streamed / quantized T5 from exact sizes counted on the meta device."""
    import torch

    from pixart_cli.models.streaming import parameter_dtypes
    from pixart_cli.models.t5 import t5_config, t5_encoder

    source.check_fit("text_encoder")  # its files and config agree with its weights before a skeleton is built
    config = t5_config(source.config("text_encoder"))
    skeleton = memory.meta_model(
        t5_encoder, source.config("text_encoder"), dtype, where=config_where(source, "text_encoder")
    )
    dtypes = parameter_dtypes(skeleton, dtype)
    sizes = {name: p.numel() * dtypes[name].itemsize for name, p in skeleton.named_parameters()}
    block = sum(size for name, size in sizes.items() if name.startswith("encoder.block.0."))
    embedding = sizes.get("shared.weight", 0)
    # bitsandbytes quantizes the blocks' Linear weights, except those transformers keeps in fp32 (`wo`)
    linear = {f"{name}.weight" for name, module in skeleton.named_modules() if isinstance(module, torch.nn.Linear)}
    quantizable = sum(size for name, size in sizes.items() if name in linear and dtypes[name] == dtype)
    return memory.plan_encode(
        budget,
        context,
        sum(sizes.values()),
        block,
        embedding,
        texts,
        max_length,
        config.d_ff,
        dtype.itemsize,
        precision,
        quantizable,
    )


def _load_text_encoder(source: Model, chosen: memory.Plan, dtype, device):
    """The T5 encoder for a plan: resident or streamed through our reader, or bitsandbytes-quantized."""
    if chosen.name in ("streamed", "resident"):
        # Our reader (parallel pread, no memory map) serves both plans: low RSS, and faster than transformers'
        # loader (README, benchmark).
        from pixart_cli.models.streaming import StreamedT5

        def read(**_):
            folder = source.folder("text_encoder")
            return StreamedT5(folder, dtype, device, resident=chosen.name == "resident").model

        return load_component(source, "text_encoder", read)
    from pixart_cli.models.facade import plain

    T5EncoderModel = plain("transformers").T5EncoderModel

    kwargs = {"dtype": dtype}
    if chosen.name.startswith("resident-"):
        BitsAndBytesConfig = plain("transformers").BitsAndBytesConfig
        bits = chosen.name.removeprefix("resident-")
        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if bits == "8bit"
            else BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=dtype)
        )
    if device.type == "cuda":
        kwargs["device_map"] = {"": device}  # read shards straight to the GPU: no full copy in CPU RAM
    model = load_component(source, "text_encoder", T5EncoderModel.from_pretrained, **kwargs)
    if device.type != "cuda":
        model.to(device)
    return model.eval()


def encode(prompts: Sequence[str], settings: EncodeSettings, ctx: RunContext) -> staged.Embeddings:
    """Encode prompts (and the negative prompt) with T5, as the pipeline's ``__call__`` does.

    Returns Embeddings: prompt_embeds / negative_prompt_embeds [B, L, C], masks [B, L], L = max_sequence_length.
    With ``settings.cache`` (a folder), prompts encoded before with the same model and settings skip T5.
    """
    import torch

    # 1. Check inputs and read the model's facts
    prompts = check_prompts(prompts)  # a no-op on a plan's prompts; the library's callers get the same check
    source = ctx.model
    max_length = max_sequence_length(settings, source)
    if settings.precision != "full" and ctx.device.type != "cuda":
        raise PixartError(
            f"--text-encoder-precision {settings.precision}: bitsandbytes quantization needs a CUDA "
            "GPU; use full precision (--dtype bf16 halves T5's memory on CPU)"
        )
    meter = ctx.meter("encode")
    made = record.for_encode(source, ctx.dtype_name, prompts, settings, max_length)
    store = None
    if settings.cache is not None:
        from pixart_cli.models.cache import EmbeddingCache

        store = EmbeddingCache(
            settings.cache, made, source.config("text_encoder"), ctx.dtype, ctx.log, settings.cache_option
        )
    rows = {prompt: store.get(prompt) for prompt in prompts} if store else {}
    todo = [prompt for prompt in dict.fromkeys(prompts) if rows.get(prompt) is None]

    # 2. Encode what the cache lacks: those prompts and the negative prompt, in as few T5 calls as possible
    plan_name = "cache"
    if todo:
        (embeds, mask), plan_name = _encode_texts(todo + [settings.negative_prompt], max_length, settings, ctx, meter)
        for index, prompt in enumerate(todo):
            # each prompt's own rows, not views of the batch (a view would keep the whole batch alive)
            rows[prompt] = tuple(
                t.clone() for t in (embeds[index : index + 1], mask[index : index + 1], embeds[-1:], mask[-1:])
            )
            if store:
                store.put(prompt, rows[prompt])
    else:
        ctx.note(f"encode: all {len(prompts)} prompt(s) found in the cache {settings.cache}; T5 not loaded")
    tensors = [torch.cat([rows[prompt][i] for prompt in prompts]) for i in range(4)]
    meter.finish(plan_name, ctx.reports)

    # 3. The record of what made them: what the next stage needs
    return staged.Embeddings(*tensors, meta=record.embeddings_meta(made))


def _encode_texts(texts: list[str], max_length: int, settings: EncodeSettings, ctx: RunContext, meter: memory.Meter):
    """Load T5 under a memory plan and encode ``texts``. Returns ((embeds [N, L, C], mask [N, L]), plan name)."""
    import torch

    from pixart_cli.models.facade import import_transformers
    from pixart_cli.models.prompts import encode_prompts

    T5Tokenizer = import_transformers("transformers.models.t5.tokenization_t5").T5Tokenizer

    source = ctx.model
    budget, context = ctx.budget()
    chosen = plan(source, budget, context, ctx.dtype, len(texts), max_length, settings.precision)
    ctx.note(chosen.describe())

    # Load the tokenizer and T5 only; dtype at load time (a later .to(fp16) breaks T5, diffusers #8604)
    source.check_fit("tokenizer")  # its files regular and within bounds: its library reads them whole
    with meter.phase("load"):
        tokenizer = load_component(source, "tokenizer", T5Tokenizer.from_pretrained)
        text_encoder = _load_text_encoder(source, chosen, ctx.dtype, ctx.device)

    # The pipeline's encode_prompt (prompts.py: same cleaning, padding and truncation as __call__; without CFG
    # it encodes the list as given). Its warning naming the text cut off a long prompt is passed on.
    embeds, masks = [], []
    ctx.advance("encode", 0, len(texts))
    with meter.phase("compute"), torch.inference_mode():
        chunk_size = chosen.batch
        for start in range(0, len(texts), chunk_size):
            chunk = texts[start : start + chunk_size]
            chunk_embeds, chunk_mask = encode_prompts(
                tokenizer,
                text_encoder,
                chunk,
                max_length=max_length,
                clean_caption=settings.clean_caption,
                device=ctx.device,
                warn=lambda message: ctx.note(f"warning: {message}"),
            )
            embeds.append(chunk_embeds.cpu())
            masks.append(chunk_mask.cpu())
            # counts texts: the prompts and, last, the negative prompt ("" when none is given)
            ctx.advance("encode", min(start + chunk_size, len(texts)), len(texts))
    del text_encoder
    ctx.free()
    return (torch.cat(embeds), torch.cat(masks)), chosen.name
