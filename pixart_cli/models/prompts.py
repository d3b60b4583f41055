"""The PixArt pipelines' ``encode_prompt`` (without classifier-free guidance), without importing the pipelines.

Importing ``diffusers.pipelines.pixart_alpha`` loads transformers' T5, the VAE and the pipeline machinery
(issue 10). Encoding needs the tokenizer, the text encoder and the pipelines' caption cleaning. The cleaning is
a long list of regular expressions (``_clean_caption`` and the class's ``bad_punct_regex``); rather than keep a
copy that could drift from the pipeline's, it is compiled from the pipeline's own source file, unchanged.
tests/test_lean.py compares captions and embeddings with the pipeline's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

PIPELINE_SOURCE = "pipelines/pixart_alpha/pipeline_pixart_alpha.py"
PIPELINE_CLASS = "PixArtAlphaPipeline"


def preprocess(texts: list[str], clean_caption: bool) -> list[str]:
    """``pipeline._text_preprocessing``: cleaned twice, or lower-cased and stripped. (The caller has checked
    that bs4 and ftfy are installed when cleaning; the pipeline would silently skip cleaning without them.)"""
    if clean_caption:
        clean = _caption_cleaner()
        return [clean(clean(text)) for text in texts]
    return [text.lower().strip() for text in texts]


def encode_prompts(
    tokenizer,
    text_encoder,
    texts: list[str],
    *,
    max_length: int,
    clean_caption: bool,
    device,
    warn: Callable[[str], None] | None = None,
):
    """``pipeline.encode_prompt(texts, do_classifier_free_guidance=False, ...)`` -> (embeds [N, L, C], mask [N, L])."""
    import torch

    texts = preprocess(texts, clean_caption)
    text_inputs = tokenizer(
        texts,
        padding="max_length",
        max_length=max_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    text_input_ids = text_inputs.input_ids
    untruncated_ids = tokenizer(texts, padding="longest", return_tensors="pt").input_ids
    if untruncated_ids.shape[-1] >= text_input_ids.shape[-1] and not torch.equal(text_input_ids, untruncated_ids):
        removed_text = tokenizer.batch_decode(untruncated_ids[:, max_length - 1 : -1])
        if warn:
            warn(
                "The following part of your input was truncated because T5 can only handle sequences up to"
                f" {max_length} tokens: {removed_text}"
            )
    mask = text_inputs.attention_mask.to(device)
    embeds = text_encoder(text_input_ids.to(device), attention_mask=mask)[0]
    return embeds.to(dtype=text_encoder.dtype, device=device), mask


@functools.cache
def _caption_cleaner() -> Callable[[str], str]:
    """The pipeline's ``_clean_caption``, compiled from its source with the names it uses, bound to an object
    holding the class's ``bad_punct_regex``."""
    import ast
    import html
    import importlib.util
    import re
    import urllib.parse
    from pathlib import Path

    import ftfy
    from bs4 import BeautifulSoup

    path = Path(importlib.util.find_spec("diffusers").origin).parent / PIPELINE_SOURCE
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    pipeline = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == PIPELINE_CLASS)
    wanted = [
        node
        for node in pipeline.body
        if (isinstance(node, ast.FunctionDef) and node.name == "_clean_caption")
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "bad_punct_regex" for t in node.targets))
    ]
    if len(wanted) != 2:
        raise LookupError(f"{PIPELINE_CLASS}._clean_caption or bad_punct_regex not found in {path}")
    newer_fields = {"type_params": []} if "type_params" in ast.ClassDef._fields else {}  # Python 3.12+
    captions = ast.ClassDef(name="Captions", bases=[], keywords=[], body=wanted, decorator_list=[], **newer_fields)
    namespace = {"re": re, "html": html, "ul": urllib.parse, "ftfy": ftfy, "BeautifulSoup": BeautifulSoup}
    exec(
        compile(ast.fix_missing_locations(ast.Module(body=[captions], type_ignores=[])), str(path), "exec"),
        namespace,
    )
    return namespace["Captions"]()._clean_caption
