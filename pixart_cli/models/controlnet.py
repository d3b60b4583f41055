"""ControlNet for PixArt-α (PixArt-δ's "ControlNet-Transformer", half variant): the adapter built from diffusers'
own transformer blocks, and the base transformer wrapped so that the sampling loop (and diffusers'
PixArtAlphaPipeline) calls the pair exactly as it calls ``PixArtTransformer2DModel``. Reading and checking the
adapter file (untrusted) is ``files/controlnet_file.py`` and ``files/controlnet_keys.py``.

The structure, as the public sources define it (read for structure and key names; no code is taken from them):

* PixArt-alpha/PixArt-alpha ``diffusion/model/nets/pixart_controlnet.py``: ``ControlPixArtHalf`` holds the frozen
  base model as ``base_model`` and ``controlnet``, a list of ``copy_blocks_num = 13`` ``ControlT2IDitBlockHalf``
  (of the base's 28 blocks). Copy ``i`` is ``copied_block`` (a deep copy of base block ``i``), ``after_proj``
  (Linear hidden -> hidden, zero-initialised) and, for copy 0 only, ``before_proj`` (the same, zero-initialised).
  The control latents ``c`` go through the base's own patch embedding plus its sin-cos position embedding
  (``forward_c``: ``x_embedder(c) + pos_embed``). Base block 0 runs; then for ``index`` 1..13 copy ``index - 1``
  returns ``(c, c_skip)``, copy 0 from ``copied_block(x + before_proj(c))``, later copies from ``copied_block(c)``,
  with ``c_skip = after_proj(c)``, and base block ``index`` runs on ``x + c_skip``; the rest run unchanged. Every
  copy gets the base's caption tokens, timestep modulation ``t0`` and caption mask.
  So the original checkpoint's keys are ``base_model.*`` (the frozen base, PixArt names), and per copy
  ``controlnet.{i}.copied_block.{scale_shift_table, attn.qkv.*, attn.proj.*, cross_attn.q_linear.*,
  cross_attn.kv_linear.*, cross_attn.proj.*, mlp.fc1.*, mlp.fc2.*}``, ``controlnet.{i}.after_proj.{weight,bias}``
  and ``controlnet.0.before_proj.{weight,bias}``.
* PixArt-alpha/PixArt-alpha ``diffusion/model/nets/PixArtMS.py`` and ``PixArt_blocks.py``: the block layout
  (``WindowAttention.qkv`` fused [3h, h], ``MultiHeadCrossAttention.q_linear`` [h, h] and ``kv_linear`` fused
  [2h, h], ``proj``, the timm ``Mlp`` ``fc1``/``fc2``, ``scale_shift_table`` [6, h]; the norms have no weights).
* PixArt-alpha/PixArt-alpha ``app/app_controlnet.py``: the published ``PixArt-XL-2-1024-ControlNet.pth`` (and
  ``-512-``) is read as ``find_model(path)['state_dict']``; the control image is a HED edge map, normalised to
  [-1, 1], repeated to 3 channels, ``vae.encode(...).latent_dist.sample()`` times the VAE scale factor.
* huggingface/diffusers ``scripts/convert_pixart_alpha_to_diffusers.py``: the base block mapping onto diffusers'
  ``BasicTransformerBlock``: ``attn.qkv`` chunked in 3 -> ``attn1.to_q/to_k/to_v``, ``attn.proj`` ->
  ``attn1.to_out.0``, ``cross_attn.q_linear`` -> ``attn2.to_q``, ``cross_attn.kv_linear`` chunked in 2 ->
  ``attn2.to_k/to_v``, ``cross_attn.proj`` -> ``attn2.to_out.0``, ``mlp.fc1`` -> ``ff.net.0.proj``, ``mlp.fc2`` ->
  ``ff.net.2``, ``scale_shift_table`` as is.
* huggingface/diffusers ``examples/research_projects/pixart/controlnet_pixart_alpha.py`` and
  ``pipeline_pixart_alpha_controlnet.py`` (PR #8857): the diffusers layout, ``PixArtControlNetAdapterModel``
  with ``controlnet_blocks.{i}.transformer_block.*`` (a ``BasicTransformerBlock`` built with the base
  transformer's arguments), ``controlnet_blocks.{i}.after_proj.*`` and ``controlnet_blocks.0.before_proj.*``;
  the control image goes through ``PixArtImageProcessor.preprocess`` ([-1, 1]), ``vae.encode(...).latent_dist
  .sample() * scaling_factor``, and is concatenated twice for classifier-free guidance. The conversion that
  circulates for the published .pth (``state_dict`` entry, ``controlnet.{i}.copied_block.*`` ->
  ``controlnet_blocks.{i}.transformer_block.*``, number of blocks inferred from the ``controlnet.{i}.`` keys) maps
  the blocks as the convert script above does.

Under the streamed memory plan (the base's blocks streamed through two device slots, models/transformer.py) the
adapter streams too (``stream_adapter``): the device holds one copy's weights at a time. The control latents are
embedded inside the base's forward (the first adapter hook), with the patch embedding on the device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from pixart_cli.errors import PixartError

DEFAULT_SCALE = 1.0
PUBLISHED_BLOCKS = 13  # copy_blocks_num of the published checkpoints (N = 13 of PixArt-δ's report)


# --- the adapter's shapes, from the base transformer's config ------------------------------------------------
def transformer_defaults() -> dict:
    """PixArtTransformer2DModel's own defaults, for a config that leaves an argument out."""
    import inspect

    from pixart_cli.models.facade import import_diffusers

    model = import_diffusers("diffusers.models.transformers.pixart_transformer_2d").PixArtTransformer2DModel
    return {
        name: parameter.default
        for name, parameter in inspect.signature(model.__init__).parameters.items()
        if parameter.default is not inspect.Parameter.empty
    }


def block_arguments(config: Mapping) -> tuple[int, dict]:
    """(hidden size, keyword arguments of BasicTransformerBlock after dim) exactly as PixArtTransformer2DModel
    builds its blocks from this config."""
    defaults = transformer_defaults()

    def get(name):
        return config[name] if name in config else defaults[name]

    heads, head_dim = int(get("num_attention_heads")), int(get("attention_head_dim"))
    arguments = {
        "num_attention_heads": heads,
        "attention_head_dim": head_dim,
        "dropout": get("dropout"),
        "cross_attention_dim": get("cross_attention_dim"),
        "activation_fn": get("activation_fn"),
        "num_embeds_ada_norm": get("num_embeds_ada_norm"),
        "attention_bias": get("attention_bias"),
        "upcast_attention": get("upcast_attention"),
        "norm_type": get("norm_type"),
        "norm_elementwise_affine": get("norm_elementwise_affine"),
        "norm_eps": get("norm_eps"),
        "attention_type": get("attention_type"),
    }
    return heads * head_dim, arguments


def block_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape of one BasicTransformerBlock built with the base's arguments (on the meta device)."""
    import torch

    from pixart_cli.models import memory
    from pixart_cli.models.facade import import_diffusers

    BasicTransformerBlock = import_diffusers("diffusers.models.attention").BasicTransformerBlock
    hidden, arguments = block_arguments(config)
    block = memory.meta_model(lambda _: BasicTransformerBlock(hidden, **arguments), config, torch.float32, True)
    return {name: tuple(tensor.shape) for name, tensor in block.state_dict().items()}


def adapter_shapes(hidden: int, num_blocks: int, shapes: dict) -> dict[str, tuple[int, ...]]:
    """diffusers-layout key -> shape of an adapter of ``num_blocks`` copies of a block of these ``shapes``."""
    square, row = (hidden, hidden), (hidden,)
    result = {}
    for index in range(num_blocks):
        prefix = f"controlnet_blocks.{index}."
        result.update({f"{prefix}transformer_block.{k}": v for k, v in shapes.items()})
        if index == 0:
            result[f"{prefix}before_proj.weight"], result[f"{prefix}before_proj.bias"] = square, row
        result[f"{prefix}after_proj.weight"], result[f"{prefix}after_proj.bias"] = square, row
    return result


def config_of(model_or_config) -> tuple[dict, str]:
    """(transformer config, what to call the model) of a pixart Model, a transformer, or a config mapping."""
    from pixart_cli.models.source import Model

    if isinstance(model_or_config, Model):
        return dict(model_or_config.config("transformer")), f"--model {model_or_config.id}"
    config = getattr(model_or_config, "config", model_or_config)
    return dict(config), "the base transformer"


def adapter_bytes_for(model, num_blocks: int = PUBLISHED_BLOCKS, dtype=None) -> int:
    """Bytes of an adapter of ``num_blocks`` copies for ``model``'s transformer, from its config alone."""
    import torch

    config, _ = config_of(model)
    hidden, _ = block_arguments(config)
    numel = sum(math.prod(shape) for shape in adapter_shapes(hidden, num_blocks, block_shapes(config)).values())
    return numel * torch.empty((), dtype=torch.float32 if dtype is None else dtype).element_size()


def encode_control_image(vae, pixels, generator=None):
    """Control latents from a control image ``pixels`` [B, 3, H, W] in [-1, 1], as app_controlnet.py and diffusers'
    research pipeline make them: a sample of the VAE's posterior times its scaling factor."""
    posterior = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
    return posterior.sample(generator=generator) * vae.config.scaling_factor


# --- the modules ----------------------------------------------------------------------------------------------
_CLASSES: dict | None = None


def _classes() -> dict:
    """The torch modules, defined on first use so that importing this module costs no torch or diffusers."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    import inspect

    import torch

    from pixart_cli.models.facade import import_diffusers

    BasicTransformerBlock = import_diffusers("diffusers.models.attention").BasicTransformerBlock
    block_signature = inspect.signature(BasicTransformerBlock.forward)

    class ControlNetAdapterBlock(torch.nn.Module):
        """One copy: ``transformer_block`` (a BasicTransformerBlock as the base's), ``after_proj`` and, in copy 0,
        ``before_proj`` (both Linear hidden -> hidden, zero at initialisation)."""

        def __init__(self, index: int, hidden: int, arguments: dict):
            super().__init__()
            self.index = index
            self.before_proj = torch.nn.Linear(hidden, hidden) if index == 0 else None
            self.transformer_block = BasicTransformerBlock(hidden, **arguments)
            self.after_proj = torch.nn.Linear(hidden, hidden)
            for projection in (self.before_proj, self.after_proj):
                if projection is not None:
                    torch.nn.init.zeros_(projection.weight)
                    torch.nn.init.zeros_(projection.bias)

        def forward(
            self,
            hidden_states,
            control_states,
            *,
            encoder_hidden_states=None,
            timestep=None,
            attention_mask=None,
            encoder_attention_mask=None,
            cross_attention_kwargs=None,
        ):
            """(this copy's output, the skip for the next base block); copy 0 starts from the base's hidden states
            plus ``before_proj`` of the embedded control latents, later copies from the previous copy's output."""
            if self.before_proj is not None:
                control_states = hidden_states + self.before_proj(control_states)
            control_states = self.transformer_block(
                control_states,
                attention_mask=attention_mask,
                encoder_hidden_states=encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                timestep=timestep,
                cross_attention_kwargs=cross_attention_kwargs,
                class_labels=None,
            )
            return control_states, self.after_proj(control_states)

    class ControlNetAdapter(torch.nn.Module):
        """The adapter: ``controlnet_blocks``, so its state dict is the diffusers layout."""

        def __init__(self, config: Mapping, num_blocks: int):
            super().__init__()
            hidden, arguments = block_arguments(config)
            self.hidden_size = hidden
            self.controlnet_blocks = torch.nn.ModuleList(
                ControlNetAdapterBlock(index, hidden, arguments) for index in range(num_blocks)
            )

        @property
        def num_blocks(self) -> int:
            return len(self.controlnet_blocks)

        @property
        def dtype(self):
            return next(self.parameters()).dtype

    class ControlledTransformer(torch.nn.Module):
        """The base PixArtTransformer2DModel with a ControlNet adapter, called as the base is.

        The base's own forward runs; for its call only, a pre-hook on base blocks 1..N runs adapter copy i - 1 on
        the block's inputs (caption tokens, timestep modulation, masks as the base computed them) and adds
        ``conditioning_scale`` times its skip to the block's hidden states. ``control_latents`` [rows, C, h, w]
        (VAE latents times the scaling factor) are used for a batch of ``rows`` images, or twice over for a
        classifier-free guidance batch of 2 x rows ([uncond; cond], as the pipelines concatenate), or one row for
        any batch. Without control latents, or at scale 0, the call is exactly the base's.
        """

        def __init__(self, transformer, adapter, control_latents=None, conditioning_scale: float = DEFAULT_SCALE):
            super().__init__()
            blocks = len(transformer.transformer_blocks)
            if adapter.num_blocks + 1 > blocks:
                raise ValueError(f"an adapter of {adapter.num_blocks} blocks needs more than {blocks} base blocks")
            hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
            if adapter.hidden_size != hidden:
                raise ValueError(f"the adapter's hidden size {adapter.hidden_size} is not the base's {hidden}")
            self.transformer = transformer
            self.adapter = adapter
            self.control_latents = None
            self.conditioning_scale = DEFAULT_SCALE
            self.set_control(control_latents, conditioning_scale)

        def set_control(self, control_latents, conditioning_scale: float | None = None) -> None:
            """The control latents for the next calls (None: none), and the scale when given."""
            if conditioning_scale is not None:
                scale = float(conditioning_scale)
                if not math.isfinite(scale):
                    raise ValueError(f"conditioning_scale {conditioning_scale!r} is not a finite number")
                self.conditioning_scale = scale
            if control_latents is not None and control_latents.dim() != 4:
                raise ValueError(f"control latents must be [rows, channels, h, w], not {list(control_latents.shape)}")
            self.control_latents = control_latents

        @property
        def config(self):
            return self.transformer.config

        @property
        def dtype(self):
            return self.transformer.dtype

        @property
        def device(self):
            return self.transformer.device

        def _control_for(self, hidden_states):
            control = self.control_latents
            rows, batch = control.shape[0], hidden_states.shape[0]
            if tuple(control.shape[1:]) != tuple(hidden_states.shape[1:]):
                raise PixartError(
                    f"the control latents are {list(control.shape[1:])} (channels, h, w) but the image latents are "
                    f"{list(hidden_states.shape[1:])}; make the control image the size of the output image"
                )
            if rows == batch:
                pass
            elif batch == 2 * rows:
                control = torch.cat([control, control])  # classifier-free guidance: [uncond; cond]
            elif rows == 1:
                control = control.expand(batch, *control.shape[1:])
            else:
                raise PixartError(
                    f"{rows} control images for a batch of {batch} images; give one control image, or one per image"
                )
            return control.to(device=hidden_states.device, dtype=self.transformer.dtype)

        def forward(
            self,
            hidden_states,
            encoder_hidden_states=None,
            timestep=None,
            added_cond_kwargs=None,
            cross_attention_kwargs=None,
            attention_mask=None,
            encoder_attention_mask=None,
            return_dict: bool = True,
        ):
            call = dict(
                encoder_hidden_states=encoder_hidden_states,
                timestep=timestep,
                added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs,
                attention_mask=attention_mask,
                encoder_attention_mask=encoder_attention_mask,
                return_dict=return_dict,
            )
            if self.control_latents is None or self.conditioning_scale == 0:
                return self.transformer(hidden_states, **call)
            # embedded in the first hook, inside the base's forward (the patch embedding is on the device there)
            state = {"latents": self._control_for(hidden_states), "control": None}
            scale = self.conditioning_scale
            base_blocks = self.transformer.transformer_blocks

            def pre_block(copy, block, args, kwargs):
                bound = block_signature.bind(block, *args, **kwargs)
                bound.apply_defaults()
                given = bound.arguments
                hidden = given["hidden_states"]
                if state["control"] is None:
                    state["control"] = self.transformer.pos_embed(state.pop("latents"))
                state["control"], skip = copy(
                    hidden,
                    state["control"],
                    encoder_hidden_states=given["encoder_hidden_states"],
                    timestep=given["timestep"],
                    attention_mask=given["attention_mask"],
                    encoder_attention_mask=given["encoder_attention_mask"],
                    cross_attention_kwargs=given["cross_attention_kwargs"],
                )
                hidden = hidden + (skip if scale == 1.0 else skip * scale)
                if args:
                    return (hidden, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": hidden}

            handles = []
            try:
                for index, copy in enumerate(self.adapter.controlnet_blocks, start=1):
                    hook = _bind_hook(pre_block, copy)
                    handles.append(base_blocks[index].register_forward_pre_hook(hook, with_kwargs=True))
                return self.transformer(hidden_states, **call)
            finally:
                for handle in handles:
                    handle.remove()

    classes = (ControlNetAdapterBlock, ControlNetAdapter, ControlledTransformer)
    for cls in classes:
        cls.__qualname__ = cls.__name__  # as if defined at module level (reprs, diffusers' class records)
    _CLASSES = {cls.__name__: cls for cls in classes}
    return _CLASSES


def _bind_hook(pre_block, copy):
    def hook(block, args, kwargs):
        return pre_block(copy, block, args, kwargs)

    return hook


def __getattr__(name: str):
    if name in ("ControlNetAdapterBlock", "ControlNetAdapter", "ControlledTransformer"):
        return _classes()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def build_adapter(weights, model, *, dtype=None, device=None):
    """The adapter module of ``weights`` for ``model``'s transformer (a Model, a transformer or its config),
    built on the meta device and given the read tensors (no second copy on the CPU), then cast to ``dtype`` and
    moved to ``device`` when given. In eval mode, without gradients."""
    import torch

    from pixart_cli.models import memory

    config, _ = config_of(model)
    # parameters on the meta device, computed on the CPU (no reference decompositions: issue 10)
    adapter = memory.meta_model(
        lambda c: _classes()["ControlNetAdapter"](c, weights.num_blocks), config, torch.float32, True
    )
    state = {key: tensor if dtype is None else tensor.to(dtype) for key, tensor in weights.tensors.items()}
    adapter.load_state_dict(state, strict=True, assign=True)
    if device is not None:
        adapter.to(device)
    return adapter.eval().requires_grad_(False)


def adapter_from_transformer(transformer, num_blocks: int | None = None):
    """A new adapter as PixArt-δ initialises one: copies of the base's first ``num_blocks`` blocks (None: 13, or
    fewer for a shallower model) and zero projections, so it changes nothing until trained."""
    import torch

    blocks = len(transformer.transformer_blocks)
    count = min(PUBLISHED_BLOCKS, blocks - 1) if num_blocks is None else num_blocks
    if not 1 <= count <= blocks - 1:
        raise ValueError(f"num_blocks {count}: a base of {blocks} blocks takes 1 to {blocks - 1} adapter blocks")
    with torch.device(transformer.device):
        adapter = _classes()["ControlNetAdapter"](transformer.config, count)
    for index, copy in enumerate(adapter.controlnet_blocks):
        copy.transformer_block.load_state_dict(transformer.transformer_blocks[index].state_dict())
    return adapter.to(transformer.dtype)


def controlled(transformer, adapter, control_latents=None, conditioning_scale: float = DEFAULT_SCALE):
    """``ControlledTransformer(transformer, adapter, control_latents, conditioning_scale)``."""
    return _classes()["ControlledTransformer"](transformer, adapter, control_latents, conditioning_scale)


def stream_adapter(adapter, device) -> None:
    """Each copy's weights on the CPU (pinned for CUDA), on ``device`` for that copy's forward only. The transfer is
    queued on the stream that runs the copy, so it is ordered before the copy's kernels; the device copy is dropped
    after the forward (the allocator reuses it in stream order). The streamed plan counts one copy."""
    pin = device.type == "cuda"
    for copy in adapter.controlnet_blocks:
        tensors = [*copy.parameters(), *copy.buffers()]
        stored = []
        for tensor in tensors:
            tensor.data = tensor.data.cpu().pin_memory() if pin else tensor.data.cpu()
            stored.append(tensor.data)
        copy.register_forward_pre_hook(_onload(tensors, stored, device))
        copy.register_forward_hook(_offload(tensors, stored))


def _onload(tensors: list, stored: list, device):
    def onload(module, args):
        for tensor, cpu in zip(tensors, stored):
            tensor.data = cpu.to(device, non_blocking=True)

    return onload


def _offload(tensors: list, stored: list):
    def offload(module, args, output):
        for tensor, cpu in zip(tensors, stored):
            tensor.data = cpu
        return output

    return offload
