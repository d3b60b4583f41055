"""Stage 1: prompts -> T5 embeddings. Loads only the tokenizer and the text encoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pixart_cli import artifacts, runtime
from pixart_cli.errors import PixartError
from pixart_cli.models import Model, load_component, stage_pipeline

Progress = Callable[[str, int, int], None]


def check_inputs(prompts: Sequence[str], negative_prompt: str, max_sequence_length: int | None,
                 clean_caption: bool) -> None:
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
    if clean_caption:
        import importlib.util

        missing = [name for name, module in (("beautifulsoup4", "bs4"), ("ftfy", "ftfy"))
                   if importlib.util.find_spec(module) is None]
        if missing:
            # diffusers would silently skip cleaning and give a different image than the pipeline's default.
            raise PixartError(f"caption cleaning needs {' and '.join(missing)}: pip install {' '.join(missing)}, "
                              "or pass --no-clean-caption")


def encode(prompts: Sequence[str], *, model: str, negative_prompt: str = "", device: str = "auto",
           dtype: str = "auto", max_sequence_length: int | None = None, clean_caption: bool = True,
           revision: str | None = None, progress: Progress | None = None) -> artifacts.Embeddings:
    """Encode prompts (and the negative prompt) with T5, as the pipeline's ``__call__`` does.

    Returns Embeddings: prompt_embeds / negative_prompt_embeds [B, L, C], masks [B, L], L = max_sequence_length.
    """
    import torch
    from transformers import T5EncoderModel, T5Tokenizer

    # 1. Check inputs, read the model's facts
    prompts = list(prompts)
    check_inputs(prompts, negative_prompt, max_sequence_length, clean_caption)
    source = Model(model, revision)
    family = source.family
    max_length = family.max_sequence_length if max_sequence_length is None else max_sequence_length
    torch_device = runtime.resolve_device(device)
    torch_dtype = runtime.resolve_dtype(dtype, torch_device)

    # 2. Load the tokenizer and T5 only; dtype at load time (a later .to(fp16) breaks T5, diffusers #8604)
    tokenizer = load_component(source, "tokenizer", T5Tokenizer.from_pretrained)
    text_encoder = load_component(source, "text_encoder", T5EncoderModel.from_pretrained, dtype=torch_dtype)
    text_encoder.to(torch_device).eval()
    pipe = stage_pipeline(source, tokenizer=tokenizer, text_encoder=text_encoder)

    # 3. Encode one prompt at a time with the pipeline's own method (same cleaning and padding as __call__)
    parts = []
    with torch.inference_mode():
        for index, prompt in enumerate(prompts):
            parts.append(pipe.encode_prompt(prompt, do_classifier_free_guidance=True, negative_prompt=negative_prompt,
                                            device=torch_device, clean_caption=clean_caption,
                                            max_sequence_length=max_length))
            if progress:
                progress("encode", index + 1, len(prompts))
    embeds, mask, negative, negative_mask = (torch.cat([part[i].cpu() for part in parts]) for i in range(4))
    del pipe, text_encoder
    runtime.free(torch_device)

    # 4. Record what the next stage needs
    meta = {
        "format": artifacts.EMBEDDINGS_FORMAT, "version": artifacts.FORMAT_VERSION,
        "model": source.id, "revision": revision, "family": family.name, "dtype": runtime.dtype_name(torch_dtype),
        "prompts": prompts, "negative_prompt": negative_prompt, "max_sequence_length": max_length,
        "clean_caption": clean_caption,
    }
    return artifacts.Embeddings(embeds, mask, negative, negative_mask, meta)
