"""Perturbed-attention guidance (PAG) as diffusers' ``PixArtSigmaPAGPipeline`` runs it, without importing the
pipeline (``diffusers.pipelines`` costs a denoise process seconds, issue 10).

The pipeline (diffusers 0.42, pipelines/pag/pipeline_pag_pixart_sigma.py with pag_utils.PAGMixin):
- its default ``pag_applied_layers`` is ``"blocks.1"``, read here from the pipeline's source (``default_layers``);
- each layer id is a regular expression ``re.search``-ed in the transformer's module names, and applies to every
  self-attention module it finds, except a "fake integral match" (``blocks.1`` is not ``blocks.10`` when both names
  end in a number). A PixArt transformer's self-attention modules are ``transformer_blocks.N.attn1``, which end in
  ``attn1``, so ``blocks.1`` also matches blocks 10 to 19 of a 28-block transformer: the pipeline does so too.
  ``selected`` copies that rule; tests/test_pag.py checks it against ``PAGMixin._set_pag_attn_processor``;
- those modules get diffusers' own ``PAGCFGIdentitySelfAttnProcessor2_0`` (with classifier-free guidance) or
  ``PAGIdentitySelfAttnProcessor2_0`` (without): the last third (half) of the batch takes the identity attention;
- the batch is [negative, prompt, prompt] (without CFG [prompt, prompt]), and the guidance formula is
  ``PAGMixin._apply_perturbed_attention_guidance`` with ``pag_adaptive_scale`` 0 (``guide``).
"""

from __future__ import annotations

import re

from pixart_cli.errors import PixartError

PIPELINE_SOURCE = "pipelines/pag/pipeline_pag_pixart_sigma.py"
FAMILIES = ("sigma",)  # diffusers has a PAG pipeline for PixArt-Σ only


def default_layers() -> tuple[str, ...]:
    """diffusers' default ``pag_applied_layers`` of PixArtSigmaPAGPipeline (a string or a list in its source)."""
    from pixart_cli.models.facade import diffusers_default

    value = diffusers_default(PIPELINE_SOURCE, "PixArtSigmaPAGPipeline", "__init__", "pag_applied_layers")
    return (value,) if isinstance(value, str) else tuple(value)


def _fake_integral_match(layer_id: str, name: str) -> bool:
    """PAGMixin's is_fake_integral_match."""
    layer_id, name = layer_id.split(".")[-1], name.split(".")[-1]
    return layer_id.isnumeric() and name.isnumeric() and layer_id == name


def selected(transformer, layers) -> dict[str, list[str]]:
    """For each layer id, the names of the self-attention modules PAG applies to (PAGMixin's rule, in its order)."""
    from pixart_cli.models.facade import import_diffusers

    Attention = import_diffusers("diffusers.models.attention_processor").Attention
    attention = [
        (name, module)
        for name, module in transformer.named_modules()
        if isinstance(module, Attention) and not module.is_cross_attention
    ]
    return {
        layer: [
            name
            for name, _ in attention
            if re.search(layer, name) is not None and not _fake_integral_match(layer, name)
        ]
        for layer in layers
    }


def check_layers(transformer, layers, source_id: str) -> None:
    """Every --pag-layers entry must find a self-attention module (the pipeline raises otherwise, after loading)."""
    found = selected(transformer, layers)
    missing = [layer for layer, names in found.items() if not names]
    if missing:
        blocks = len(getattr(transformer, "transformer_blocks", ()))
        raise PixartError(
            option="--pag-layers",
            value=",".join(missing),
            reason=f"finds no self-attention layer in the transformer of {source_id}",
            fix=f"name its blocks as diffusers does: blocks.0 to blocks.{blocks - 1}" if blocks else None,
        )


def apply(transformer, layers, cfg: bool) -> list[str]:
    """Put diffusers' PAG attention processors on the selected modules; returns their names (sorted)."""
    from pixart_cli.models.facade import import_diffusers

    processors = import_diffusers("diffusers.models.attention_processor")
    processor = processors.PAGCFGIdentitySelfAttnProcessor2_0() if cfg else processors.PAGIdentitySelfAttnProcessor2_0()
    modules = dict(transformer.named_modules())
    names = sorted({name for found in selected(transformer, layers).values() for name in found})
    for name in names:
        modules[name].processor = processor
    return names


def describe(names: list[str]) -> str:
    """'transformer_blocks 1, 10-19 (11 self-attention layers)'."""
    numbers = sorted(int(match.group(1)) for name in names if (match := re.search(r"blocks\.(\d+)\.", name)))
    if len(numbers) != len(names):
        return ", ".join(names)
    runs: list[list[int]] = []
    for number in numbers:
        if runs and runs[-1][-1] == number - 1:
            runs[-1].append(number)
        else:
            runs.append([number])
    text = ", ".join(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}" for run in runs)
    return f"transformer_blocks {text} ({len(names)} self-attention layer{'s' if len(names) != 1 else ''})"


def rows(embeds, negative, cfg: bool):
    """PAGMixin._prepare_perturbed_attention_guidance: [prompt, prompt], with CFG [negative, prompt, prompt]."""
    import torch

    cond = torch.cat([embeds] * 2, dim=0)
    if cfg:
        cond = torch.cat([negative, cond], dim=0)
    return cond


def guide(noise_pred, cfg: bool, guidance_scale: float, pag_scale: float):
    """PAGMixin._apply_perturbed_attention_guidance with pag_adaptive_scale 0 (the scale is constant)."""
    if cfg:
        noise_pred_uncond, noise_pred_text, noise_pred_perturb = noise_pred.chunk(3)
        return (
            noise_pred_uncond
            + guidance_scale * (noise_pred_text - noise_pred_uncond)
            + pag_scale * (noise_pred_text - noise_pred_perturb)
        )
    noise_pred_text, noise_pred_perturb = noise_pred.chunk(2)
    return noise_pred_text + pag_scale * (noise_pred_text - noise_pred_perturb)
