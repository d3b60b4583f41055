"""LoRA for the PixArt transformer: read a .safetensors file, check it against the model, fuse it into the weights.

diffusers has no LoRA loader for PixArt (its issue #9887: no ``PeftAdapterMixin`` on ``PixArtTransformer2DModel``),
so pixart reads the files itself. Three namings are accepted, each found in the trainers' own code:

* diffusers / PEFT: ``transformer.<module>.lora_A.weight`` and ``.lora_B.weight`` (diffusers' ``pack_weights`` with
  the ``transformer`` prefix, as SimpleTuner saves PixArt LoRAs), also with PEFT's ``base_model.model.`` prefix
  (``PeftModel.save_pretrained``, the PixArt-Σ repo's LoRA script) or none. Alpha comes from ``.alpha`` keys, from
  the ``lora_adapter_metadata`` JSON that diffusers' ``write_lora_layers`` puts in the safetensors metadata
  (``transformer.lora_alpha``, ``transformer.alpha_pattern``, ``transformer.use_rslora``), else alpha = rank.
* kohya: ``<prefix>_<module with dots as underscores>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.
  OneTrainer's PixArt saver writes prefix ``lora_transformer`` (its ``convert_to_legacy_diffusers``, the default);
  LyCORIS (SimpleTuner's ``lora_type=lycoris``, algo ``lora``) writes ``lycoris``; kohya's own trainers use
  ``lora_unet`` for the denoiser.
* OneTrainer's OMI naming (``enable_omi_format``): the original PixArt module names, ``transformer.blocks.N.attn.qkv.0``
  and so on, with ``lora_down`` / ``lora_up`` / ``alpha``.

The LoRA is fused into the weights when the transformer loads: W' = W + scale * alpha / rank * up @ down, computed
in fp32 and rounded once to the model's dtype. That costs nothing per step and works with every denoise plan (the
streamed plan fuses on the CPU, before its blocks go to their pinned buffers). ``benchmarks/lora_bench.py`` measures
it against peft's unfused adapters.
"""

from __future__ import annotations

from typing import Any

from pixart_cli.errors import PixartError
from pixart_cli.files.lora_file import KOHYA_PREFIXES, OPTION, PEFT_PREFIXES, LoraModule, LoraWeights


def _omi_names(num_layers: int) -> dict[str, str]:
    """OneTrainer's OMI names (the original PixArt checkpoint's) -> diffusers module names.

    The same table as OneTrainer's modules/util/convert/lora/convert_pixart_lora.py.
    """
    names = {
        "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
        "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
        "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
        "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
        "y_embedder.y_proj.fc1": "caption_projection.linear_1",
        "y_embedder.y_proj.fc2": "caption_projection.linear_2",
        "x_embedder.proj": "pos_embed.proj",
        "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
        "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
        "t_block.1": "adaln_single.linear",
        "final_layer.linear": "proj_out",
    }
    block = {
        "attn.qkv.0": "attn1.to_q",
        "attn.qkv.1": "attn1.to_k",
        "attn.qkv.2": "attn1.to_v",
        "attn.proj": "attn1.to_out.0",
        "cross_attn.q_linear": "attn2.to_q",
        "cross_attn.kv_linear.0": "attn2.to_k",
        "cross_attn.kv_linear.1": "attn2.to_v",
        "cross_attn.proj": "attn2.to_out.0",
        "mlp.fc1": "ff.net.0.proj",
        "mlp.fc2": "ff.net.2",
    }
    for index in range(num_layers):
        names.update({f"blocks.{index}.{k}": f"transformer_blocks.{index}.{v}" for k, v in block.items()})
    return {f"transformer.{k}": v for k, v in names.items()}


def _layers(transformer) -> dict[str, Any]:
    """The transformer's Linear and Conv2d layers by name (works on a meta-device skeleton too)."""
    import torch

    return {
        name: module
        for name, module in transformer.named_modules()
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))
    }


def resolve(lora: LoraWeights, transformer) -> dict[str, LoraModule]:
    """Map the file's module names onto the transformer's layers and check every shape.

    Raises PixartError (exit 2) naming the file and the first module that does not fit: unknown to this
    transformer, or of the wrong shape. Needs only module names and shapes, so a meta-device skeleton will do.
    """
    where = f"{OPTION} {lora.path}"
    layers = _layers(transformer)
    underscored = {name.replace(".", "_"): name for name in layers}
    table = _omi_names(len(getattr(transformer, "transformer_blocks", ()))) if lora.naming == "omi" else {}

    def lookup(key: str) -> str | None:
        """The transformer layer a file's module name means, in the file's naming, or None."""
        if lora.naming == "kohya":
            prefixes, names = KOHYA_PREFIXES, underscored
        elif lora.naming == "omi":
            return table.get(key) if table.get(key) in layers else None
        else:
            prefixes, names = PEFT_PREFIXES, {name: name for name in layers}
        return next((names[key[len(p) :]] for p in prefixes if key.startswith(p) and key[len(p) :] in names), None)

    resolved: dict[str, LoraModule] = {}
    for key, module in lora.modules.items():
        name = lookup(key)
        if name is None:
            raise PixartError(
                f"{where}: module {key} is not a layer of this model's transformer; the LoRA was made "
                "for another model (pixart applies PixArt transformer LoRAs)"
            )
        if name in resolved:
            raise PixartError(f"{where}: two entries adapt the same layer {name}; the file is inconsistent")
        layer = layers[name]
        weight_shape = tuple(layer.weight.shape)
        down_shape, up_shape = tuple(module.down.shape), tuple(module.up.shape)
        fits = (
            up_shape[0] == weight_shape[0]
            and down_shape[1:] == weight_shape[1:]
            and len(down_shape) == len(weight_shape)
        )
        if not fits:
            raise PixartError(
                f"{where}: {key} does not fit: down {list(down_shape)} and up {list(up_shape)} for a "
                f"layer of weight {list(weight_shape)}; the LoRA was made for another model size"
            )
        resolved[name] = module
    return resolved


def check_lora(lora: LoraWeights, transformer) -> None:
    """Raise PixartError unless every module of ``lora`` fits ``transformer`` (a meta skeleton is enough)."""
    resolve(lora, transformer)


def fuse_peak_bytes(transformer, loras: list[LoraWeights]) -> int:
    """Device memory that fusing adds for a moment: an fp32 copy of the largest adapted weight and its delta,
    plus that layer's LoRA matrices. Nothing stays after fusing."""
    peak = 0
    for lora in loras:
        layers = _layers(transformer)
        for name, module in resolve(lora, transformer).items():
            weight = layers[name].weight
            peak = max(peak, 2 * 4 * weight.numel() + 4 * (module.down.numel() + module.up.numel()))
    return peak


def apply_loras(transformer, loras: list[LoraWeights]) -> None:
    """Fuse each LoRA into the transformer's weights, in place, where the weights are (CPU or device).

    Per layer: W' = W + sum_i scale_i * alpha_i / rank_i * up_i @ down_i, accumulated in fp32 in the given order
    (one addmm per LoRA, no full-size temporaries) and rounded once to W's dtype. Call before the streamed plan's
    block streamer takes over the weights.
    """
    import torch

    if not loras:
        return
    layers = _layers(transformer)
    per_layer: dict[str, list[tuple[float, LoraModule]]] = {}
    for lora in loras:
        for name, module in resolve(lora, transformer).items():
            per_layer.setdefault(name, []).append((lora.scale, module))
    with torch.no_grad():
        for name, adapters in per_layer.items():
            weight = layers[name].weight
            # fp32 weights are updated in place; others through one fp32 copy, rounded once at the end.
            exact = weight.dtype == torch.float32 and weight.is_contiguous()
            target = weight if exact else weight.to(torch.float32).contiguous()
            matrix = target.view(target.shape[0], -1)
            for scale, module in adapters:
                down = module.down.to(device=weight.device, dtype=torch.float32).flatten(1)
                up = module.up.to(device=weight.device, dtype=torch.float32).flatten(1)
                matrix.addmm_(up, down, alpha=scale * module.alpha / module.rank)
            if not exact:
                weight.copy_(target)


def records(loras: list[LoraWeights]) -> list[dict]:
    """The meta entry: one {file, sha256, scale} per LoRA, in the order they were applied."""
    return [lora.record() for lora in loras]


def check_loras_for_model(loras: list[LoraWeights], model) -> None:
    """Check LoRAs against a Model's transformer config on the meta device (no weights read), before any model
    loads (the run plan: generate must fail before T5 does any work). The skeleton is fp16 whatever the run's dtype
    (only names and shapes are read), the one a CUDA run's denoise plans with, so one process builds it once."""
    if not loras:
        return
    import torch

    from pixart_cli.models.transformer import skeleton

    model.check_fit("transformer")  # the config within bounds and agreeing with the weights: a bounded skeleton
    transformer = skeleton(model.config("transformer"), torch.float16)
    for adapter in loras:
        check_lora(adapter, transformer)
