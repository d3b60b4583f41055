"""ControlNet adapter (pixart_cli.models.controlnet, pixart_cli.files.controlnet_file): zero projections or scale 0 give exactly the base model, both
file layouts load to the same weights and output, the controlled forward equals a reference loop written here from
the published structure, diffusers' pipeline takes the controlled transformer as a drop-in, and every hostile or
mismatched file is one PixartError line (exit 2) before anything is built."""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from pixart_cli import random_model
from pixart_cli.errors import PixartError
from pixart_cli.files import controlnet_file as cf
from pixart_cli.models import controlnet as cn
from pixart_cli.models.source import Model

SEED = 0
LAYERS = 4  # the tiny transformer with 4 layers: adapters of up to 3 blocks, so the copies chain
NO_CONDITIONS = {"resolution": None, "aspect_ratio": None}


# --- fixtures ------------------------------------------------------------------------------------------------
def _deepen(folder: Path, num_layers: int, seed: int = SEED) -> Path:
    """Replace a model folder's transformer with a random one of ``num_layers`` layers (same config otherwise)."""
    from diffusers import PixArtTransformer2DModel

    config = dict(PixArtTransformer2DModel.load_config(folder / "transformer"))
    config["num_layers"] = num_layers
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel.from_config(config)
    shutil.rmtree(folder / "transformer")
    transformer.save_pretrained(folder / "transformer")
    return folder


@pytest.fixture(scope="module")
def deep_model(tmp_path_factory) -> Path:
    return _deepen(random_model.build(tmp_path_factory.mktemp("cn") / "model", "tiny"), LAYERS)


@pytest.fixture(scope="module")
def model(deep_model) -> Model:
    return Model(str(deep_model))


@pytest.fixture(scope="module")
def base(deep_model):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(deep_model, subfolder="transformer").eval()


def random_adapter(transformer, num_blocks: int | None = None, seed: int = 1, zero_after: bool = False):
    """The published initialisation (copies of the first blocks, zero projections), then every weight moved at
    random so that nothing is zero and the copies differ from the base blocks."""
    adapter = cn.adapter_from_transformer(transformer, num_blocks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in adapter.named_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
            if zero_after and ".after_proj." in name:
                parameter.zero_()
    return adapter.eval().requires_grad_(False)


def diffusers_state(adapter) -> dict:
    return {key: value.detach().clone().contiguous() for key, value in adapter.state_dict().items()}


def to_original(state: dict, base_state: dict | None = None) -> dict:
    """The diffusers layout written back in PixArt's original names (the inverse of diffusers' convert script),
    with the frozen base under base_model.* as ControlPixArtHalf saves it."""
    original = {}
    blocks = sorted({int(key.split(".")[1]) for key in state})
    for i in blocks:
        d = f"controlnet_blocks.{i}.transformer_block."
        o = f"controlnet.{i}.copied_block."
        for kind in ("weight", "bias"):
            original[f"{o}attn.qkv.{kind}"] = torch.cat([state[f"{d}attn1.to_{x}.{kind}"] for x in "qkv"])
            original[f"{o}attn.proj.{kind}"] = state[f"{d}attn1.to_out.0.{kind}"]
            original[f"{o}cross_attn.q_linear.{kind}"] = state[f"{d}attn2.to_q.{kind}"]
            original[f"{o}cross_attn.kv_linear.{kind}"] = torch.cat([state[f"{d}attn2.to_{x}.{kind}"] for x in "kv"])
            original[f"{o}cross_attn.proj.{kind}"] = state[f"{d}attn2.to_out.0.{kind}"]
            original[f"{o}mlp.fc1.{kind}"] = state[f"{d}ff.net.0.proj.{kind}"]
            original[f"{o}mlp.fc2.{kind}"] = state[f"{d}ff.net.2.{kind}"]
            original[f"controlnet.{i}.after_proj.{kind}"] = state[f"controlnet_blocks.{i}.after_proj.{kind}"]
            if i == 0:
                original[f"controlnet.0.before_proj.{kind}"] = state[f"controlnet_blocks.0.before_proj.{kind}"]
        original[f"{o}scale_shift_table"] = state[f"{d}scale_shift_table"]
    for key, value in (base_state or {}).items():
        original[f"base_model.{key}"] = value
    return original


def base_model_tensors(transformer) -> dict:
    """A few of the frozen base's tensors in PixArt's names (caption projection, patch embedding, blocks, the
    sin-cos table app_controlnet.py deletes), shaped as the base's."""
    state = transformer.state_dict()
    tensors = {
        "x_embedder.proj.weight": state["pos_embed.proj.weight"],
        "y_embedder.y_proj.fc1.weight": state["caption_projection.linear_1.weight"],
        "y_embedder.y_proj.fc1.bias": state["caption_projection.linear_1.bias"],
        "pos_embed": torch.zeros(1, 256, 16),
        "final_layer.scale_shift_table": state["scale_shift_table"],
    }
    for i in range(len(transformer.transformer_blocks)):
        q, k, v = (state[f"transformer_blocks.{i}.attn1.to_{x}.weight"] for x in "qkv")
        tensors[f"blocks.{i}.attn.qkv.weight"] = torch.cat([q, k, v])
    return tensors


def save_original(path: Path, state: dict, base_state: dict | None = None, wrap: bool = True) -> Path:
    original = to_original(state, base_state)
    torch.save({"state_dict": original} if wrap else original, path)
    return path


def save_diffusers(path: Path, state: dict) -> Path:
    save_file(state, str(path))
    return path


def inputs(batch: int = 2, rows: int = 1, size: int = 32, seed: int = 3, tokens: int = 7):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    control = torch.randn(rows, 4, size, size, generator=generator)
    embeddings = torch.randn(batch, tokens, 32, generator=generator)
    mask = torch.ones(batch, tokens, dtype=torch.long)
    mask[0, 4:] = 0  # padding, so the caption mask matters
    timestep = torch.tensor([700] * batch)
    return latents, control, embeddings, mask, timestep


def call(transformer, latents, embeddings, mask, timestep, added=NO_CONDITIONS):
    """As pixart_cli/models/sampling.py calls the transformer."""
    with torch.no_grad():
        return transformer(
            latents,
            encoder_hidden_states=embeddings,
            encoder_attention_mask=mask,
            timestep=timestep,
            added_cond_kwargs=added,
            return_dict=False,
        )[0]


def reference(base, state: dict, latents, control, embeddings, mask, timestep, added=NO_CONDITIONS, scale=1.0):
    """The published structure, written out: its own loop over diffusers' blocks, its own copies of them loaded
    from the diffusers-layout state, projections as plain linear maps. Base block 0 runs; for i = 1..N copy i-1
    (copy 0 on x + before_proj(c), later ones on the previous copy's output) gives after_proj(c), added to the
    input of base block i; the other blocks run unchanged; then diffusers' output head."""
    from diffusers.models.attention import BasicTransformerBlock

    config = base.config
    hidden = config.num_attention_heads * config.attention_head_dim
    num_blocks = len({key.split(".")[1] for key in state})
    copies = []
    for i in range(num_blocks):
        block = BasicTransformerBlock(
            hidden,
            config.num_attention_heads,
            config.attention_head_dim,
            dropout=config.dropout,
            cross_attention_dim=config.cross_attention_dim,
            activation_fn=config.activation_fn,
            num_embeds_ada_norm=config.num_embeds_ada_norm,
            attention_bias=config.attention_bias,
            upcast_attention=config.upcast_attention,
            norm_type=config.norm_type,
            norm_elementwise_affine=config.norm_elementwise_affine,
            norm_eps=config.norm_eps,
            attention_type=config.attention_type,
        )
        prefix = f"controlnet_blocks.{i}.transformer_block."
        block.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
        copies.append(block.eval())

    def project(c, i, name):
        return F.linear(c, state[f"controlnet_blocks.{i}.{name}.weight"], state[f"controlnet_blocks.{i}.{name}.bias"])

    with torch.no_grad():
        batch, patch = latents.shape[0], config.patch_size
        height, width = latents.shape[-2] // patch, latents.shape[-1] // patch
        bias = ((1 - mask.to(latents.dtype)) * -10000.0).unsqueeze(1)
        x = base.pos_embed(latents)
        t, embedded_timestep = base.adaln_single(timestep, added, batch_size=batch, hidden_dtype=x.dtype)
        y = base.caption_projection(embeddings).view(batch, -1, x.shape[-1])
        c = base.pos_embed(control.expand(batch, -1, -1, -1) if control.shape[0] == 1 else control)
        common = dict(encoder_hidden_states=y, encoder_attention_mask=bias, timestep=t)
        x = base.transformer_blocks[0](x, **common)
        for i in range(1, len(base.transformer_blocks)):
            if i <= num_blocks:
                if i == 1:
                    c = x + project(c, 0, "before_proj")
                c = copies[i - 1](c, **common)
                x = x + scale * project(c, i - 1, "after_proj")
            x = base.transformer_blocks[i](x, **common)
        shift, shift_scale = (base.scale_shift_table[None] + embedded_timestep[:, None]).chunk(2, dim=1)
        x = base.proj_out(base.norm_out(x) * (1 + shift_scale) + shift)
        x = x.reshape(batch, height, width, patch, patch, base.out_channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(batch, base.out_channels, height * patch, width * patch)


def one_line_error(function, *args, **kwargs) -> str:
    with pytest.raises(PixartError) as info:
        function(*args, **kwargs)
    message = str(info.value)
    assert info.value.exit_code == 2
    assert "\n" not in message and message.strip() == message
    return message


# --- the forward pass ------------------------------------------------------------------------------------------
def test_zero_after_proj_gives_exactly_the_base_model(base, model, tmp_path):
    """(a) Random copies and before_proj, zero after_proj: the skips are zero, the output the base's, bit for bit.
    The published initialisation (zero projections) too."""
    path = save_diffusers(tmp_path / "zero.safetensors", diffusers_state(random_adapter(base, zero_after=True)))
    adapter = cn.build_adapter(cf.read_controlnet(path, model), model)
    latents, control, embeddings, mask, timestep = inputs()
    expected = call(base, latents, embeddings, mask, timestep)
    assert torch.equal(call(cn.controlled(base, adapter, control), latents, embeddings, mask, timestep), expected)
    fresh = cn.adapter_from_transformer(base, 2)
    assert torch.equal(call(cn.controlled(base, fresh, control), latents, embeddings, mask, timestep), expected)


def test_both_layouts_load_to_identical_weights_and_output(base, model, tmp_path):
    """(b) One random adapter saved in the diffusers layout (.safetensors) and in the original one (.pth with the
    frozen base under base_model.*, wrapped in state_dict as the published file is): the same tensors, the same
    output; the base_model tensors are not kept."""
    state = diffusers_state(random_adapter(base))
    diffusers_file = save_diffusers(tmp_path / "adapter.safetensors", state)
    base_tensors = base_model_tensors(base)
    original_file = save_original(tmp_path / "PixArt-XL-2-ControlNet.pth", state, base_tensors)
    unwrapped_file = save_original(tmp_path / "unwrapped.bin", state, base_tensors, wrap=False)

    from_diffusers = cf.read_controlnet(diffusers_file, model)
    from_original = cf.read_controlnet(original_file, model)
    assert (from_diffusers.layout, from_original.layout) == ("diffusers", "original")
    assert from_diffusers.num_blocks == from_original.num_blocks == LAYERS - 1
    assert from_original.base_tensors_ignored == len(base_tensors) and from_diffusers.base_tensors_ignored == 0
    assert set(from_original.tensors) == set(from_diffusers.tensors) == set(state)
    for key, value in state.items():
        assert torch.equal(from_original.tensors[key], value), key
        assert torch.equal(from_diffusers.tensors[key], value), key
    assert set(cf.read_controlnet(unwrapped_file, model).tensors) == set(state)
    assert "3 blocks, original PixArt layout" in from_original.describe()

    latents, control, embeddings, mask, timestep = inputs()
    outputs = [
        call(cn.controlled(base, cn.build_adapter(weights, model), control), latents, embeddings, mask, timestep)
        for weights in (from_diffusers, from_original)
    ]
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("num_blocks", [1, 3])
def test_controlled_forward_matches_the_published_structure(base, model, tmp_path, num_blocks):
    """(c) A random non-zero adapter changes the output, and the controlled transformer equals the reference loop
    within 1e-5 (fp32), with a padded caption mask and a guidance batch that reuses one control row."""
    state = diffusers_state(random_adapter(base, num_blocks))
    weights = cf.read_controlnet(save_diffusers(tmp_path / "a.safetensors", state), model)
    adapter = cn.build_adapter(weights, model)
    latents, control, embeddings, mask, timestep = inputs(batch=2, rows=1)
    ours = call(cn.controlled(base, adapter, control), latents, embeddings, mask, timestep)
    plain = call(base, latents, embeddings, mask, timestep)
    assert (ours - plain).abs().max() > 1e-2
    assert (ours - reference(base, state, latents, control, embeddings, mask, timestep)).abs().max() <= 1e-5


def test_controlled_forward_with_micro_conditions(tmp_path):
    """The 1024 transformer (sample_size 128) passes resolution and aspect ratio through adaln_single; the copies
    take the same modulation as the base blocks."""
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(SEED)
    base = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=3,
        caption_channels=32,
        cross_attention_dim=24,
        sample_size=128,
        norm_num_groups=1,
    ).eval()
    assert base.use_additional_conditions
    state = diffusers_state(random_adapter(base, 2))
    weights = cf.read_controlnet(save_diffusers(tmp_path / "a.safetensors", state), base)
    latents, control, embeddings, mask, timestep = inputs(batch=2, rows=2, size=16)
    added = {"resolution": torch.tensor([[128.0, 128.0]] * 2), "aspect_ratio": torch.tensor([[1.0]] * 2)}
    ours = call(
        cn.controlled(base, cn.build_adapter(weights, base), control), latents, embeddings, mask, timestep, added
    )
    expected = reference(base, state, latents, control, embeddings, mask, timestep, added)
    assert (ours - expected).abs().max() <= 1e-5


def test_scale_zero_is_no_control_and_scale_multiplies_the_skips(base, model, tmp_path):
    """(d) conditioning_scale 0 is exactly the base; another scale equals the reference with scaled skips."""
    state = diffusers_state(random_adapter(base))
    adapter = cn.build_adapter(cf.read_controlnet(save_diffusers(tmp_path / "a.safetensors", state), model), model)
    latents, control, embeddings, mask, timestep = inputs()
    controlled = cn.controlled(base, adapter, control, conditioning_scale=0.0)
    assert torch.equal(
        call(controlled, latents, embeddings, mask, timestep), call(base, latents, embeddings, mask, timestep)
    )
    controlled.set_control(control, 0.5)
    half = reference(base, state, latents, control, embeddings, mask, timestep, scale=0.5)
    assert (call(controlled, latents, embeddings, mask, timestep) - half).abs().max() <= 1e-5
    controlled.set_control(None)
    assert torch.equal(
        call(controlled, latents, embeddings, mask, timestep), call(base, latents, embeddings, mask, timestep)
    )


def test_control_rows_are_duplicated_for_classifier_free_guidance(base, model, tmp_path):
    """A batch of 2 x rows ([uncond; cond]) uses the control rows twice; other mismatches are one line."""
    adapter = cn.build_adapter(
        cf.read_controlnet(save_diffusers(tmp_path / "a.safetensors", diffusers_state(random_adapter(base))), model),
        model,
    )
    latents, control, embeddings, mask, timestep = inputs(batch=4, rows=2)
    doubled = call(cn.controlled(base, adapter, control), latents, embeddings, mask, timestep)
    explicit = call(cn.controlled(base, adapter, torch.cat([control, control])), latents, embeddings, mask, timestep)
    assert torch.equal(doubled, explicit)
    three = torch.cat([control, control[:1]])
    message = one_line_error(call, cn.controlled(base, adapter, three), latents, embeddings, mask, timestep)
    assert "3 control images for a batch of 4" in message
    small = control[:, :, :16, :16]
    message = one_line_error(call, cn.controlled(base, adapter, small), latents, embeddings, mask, timestep)
    assert "the size of the output image" in message


def test_diffusers_pipeline_and_the_sampling_loop_take_it_as_a_drop_in(deep_model, model, tmp_path):
    """diffusers' own PixArtAlphaPipeline with the controlled transformer as pipe.transformer (guidance on, so the
    control row is doubled) gives the latents pixart's sampling loop gives with it; at scale 0 the pipeline's
    latents are the plain pipeline's, bit for bit."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from pixart_cli.models.sampling import sample_latents

    pipe = PixArtAlphaPipeline.from_pretrained(deep_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    base = pipe.transformer
    state = diffusers_state(random_adapter(base))
    adapter = cn.build_adapter(cf.read_controlnet(save_diffusers(tmp_path / "a.safetensors", state), model), model)
    control = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    embeds, attention, negative, negative_attention = pipe.encode_prompt("a cute cat", negative_prompt="")
    texts = dict(
        prompt_embeds=embeds,
        prompt_attention_mask=attention,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_attention,
    )

    def run():
        return pipe(
            **texts,
            negative_prompt=None,
            num_inference_steps=2,
            guidance_scale=4.5,
            use_resolution_binning=False,
            output_type="latent",
            generator=[torch.Generator("cpu").manual_seed(SEED)],
        ).images

    plain = run()
    controlled = cn.controlled(base, adapter, control)
    pipe.transformer = controlled
    with_control = run()
    assert (with_control - plain).abs().max() > 1e-3
    with torch.no_grad():
        ours = sample_latents(
            controlled,
            DPMSolverMultistepScheduler.from_config(pipe.scheduler.config),
            "PixArtAlphaPipeline",
            **texts,
            num_inference_steps=2,
            timesteps=None,
            guidance_scale=4.5,
            height=256,
            width=256,
            vae_scale_factor=pipe.vae_scale_factor,
            generator=[torch.Generator("cpu").manual_seed(SEED)],
            device=torch.device("cpu"),
        )
    assert torch.equal(ours, with_control)

    controlled.set_control(control, 0.0)
    assert torch.equal(run(), plain)


# --- reading ---------------------------------------------------------------------------------------------------
def test_parameter_bytes_come_from_the_header(base, model, tmp_path):
    """The planner's number: the adapter's tensors only (not base_model.*), as stored or in another dtype."""
    state = diffusers_state(random_adapter(base))
    numel = sum(t.numel() for t in state.values())
    diffusers_file = save_diffusers(tmp_path / "a.safetensors", state)
    original_file = save_original(tmp_path / "a.pth", state, base_model_tensors(base))
    for path in (diffusers_file, original_file):
        assert cf.adapter_parameter_bytes(path, model) == 4 * numel
        assert cf.adapter_parameter_bytes(path, model, torch.float16) == 2 * numel
    assert cf.read_controlnet(original_file, model).parameter_bytes(torch.bfloat16) == 2 * numel
    assert cn.adapter_bytes_for(model, LAYERS - 1) == 4 * numel


def test_folder_with_one_weights_file(base, model, tmp_path):
    """A diffusers save_pretrained folder (config.json + diffusion_pytorch_model.safetensors), also as the
    controlnet/ subfolder, or a folder with one .pth; config.json's num_layers must agree with the weights."""
    state = diffusers_state(random_adapter(base, 2))
    folder = tmp_path / "saved"
    (folder / "controlnet").mkdir(parents=True)
    save_diffusers(folder / "controlnet" / "diffusion_pytorch_model.safetensors", state)
    (folder / "controlnet" / "config.json").write_text(
        '{"_class_name": "PixArtControlNetAdapterModel", "num_layers": 2}'
    )
    weights = cf.read_controlnet(folder, model)
    assert weights.num_blocks == 2 and weights.path.name == "diffusion_pytorch_model.safetensors"
    (folder / "controlnet" / "config.json").write_text('{"num_layers": 13}')
    assert "config.json says num_layers 13" in one_line_error(cf.read_controlnet, folder, model)

    single = tmp_path / "single"
    single.mkdir()
    save_original(single / "PixArt-XL-2-512-ControlNet.pth", state)
    assert cf.read_controlnet(single, model).layout == "original"
    save_diffusers(single / "other.safetensors", state)
    assert "holds 2 weights files" in one_line_error(cf.read_controlnet, single, model)


def test_importing_the_module_stays_light():
    code = (
        "import sys, pixart_cli.models.controlnet, pixart_cli.files.controlnet_file; "
        "print('torch' in sys.modules, 'diffusers' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "False"]


def test_control_image_encoding(deep_model):
    """Control latents as the sources make them: VAE posterior sample of [-1, 1] pixels times the scaling factor."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(deep_model, subfolder="vae").eval()
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ours = cn.encode_control_image(vae, pixels, torch.Generator().manual_seed(4))
        posterior = vae.encode(pixels).latent_dist
        expected = posterior.sample(torch.Generator().manual_seed(4)) * vae.config.scaling_factor
    assert ours.shape == (1, 4, 8, 8) and torch.equal(ours, expected)


# --- hostile and mismatched files --------------------------------------------------------------------------------
class RunsCode:
    """A pickle that runs code when unpickled (os.mkdir of a marker folder)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickles_that_run_code_never_run(base, model, tmp_path):
    """(e) torch.save of a __reduce__ object (alone, or inside a state dict) and a raw pickle: refused, and the
    code never runs (weights_only; a non-zip pickle is not even unpickled)."""
    marker = tmp_path / "ran"
    state = diffusers_state(random_adapter(base, 1))
    cases = {
        "object.pth": lambda path: torch.save(RunsCode(marker), path),
        "inside.pth": lambda path: torch.save({"state_dict": {**to_original(state), "x": RunsCode(marker)}}, path),
        "raw.pth": lambda path: path.write_bytes(pickle.dumps({"state_dict": RunsCode(marker)})),
        "legacy.pth": lambda path: torch.save(to_original(state), path, _use_new_zipfile_serialization=False),
    }
    for name, write in cases.items():
        path = tmp_path / name
        write(path)
        message = one_line_error(cf.read_controlnet, path, model)
        assert message.startswith(f"--controlnet {path}: "), message
        expected = {"object.pth": "it names posix.mkdir", "inside.pth": "it names posix.mkdir"}.get(name, "re-save it")
        assert "could run code" in message, message
        assert expected in message, message
        assert not marker.exists(), name


def _adapter_for_hidden(heads: int, head_dim: int) -> dict:
    from diffusers import PixArtTransformer2DModel

    other = PixArtTransformer2DModel(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        num_layers=LAYERS,
        caption_channels=32,
        cross_attention_dim=heads * head_dim,
        sample_size=32,
        norm_num_groups=1,
    )
    return diffusers_state(random_adapter(other, 2))


def test_mismatched_and_broken_files_are_one_line(base, model, deep_model, tmp_path):
    """(e) Each file that does not fit the model, or is not a ControlNet, is one PixartError line naming the file,
    the problem and the fix, before anything is built."""
    state = diffusers_state(random_adapter(base, 2))

    def without(key):
        return {k: v for k, v in state.items() if k != key}

    nan = dict(state)
    nan["controlnet_blocks.1.after_proj.bias"] = torch.full_like(
        state["controlnet_blocks.1.after_proj.bias"], float("nan")
    )
    integer = dict(state)
    integer["controlnet_blocks.0.after_proj.bias"] = torch.zeros(16, dtype=torch.int32)
    extra = {**state, "controlnet_blocks.1.before_proj.weight": torch.zeros(16, 16)}
    too_many = dict(state)  # blocks 2 and 3 added: 4 blocks for a 4-layer base
    for index in (2, 3):
        for key, value in state.items():
            if key.startswith("controlnet_blocks.1."):
                too_many[key.replace(".1.", f".{index}.", 1)] = value.clone()
    wrong_caption = {"y_embedder.y_proj.fc1.weight": torch.zeros(16, 64)}
    mixed = {**to_original(state), "controlnet_blocks.0.after_proj.bias": torch.zeros(16)}

    cases = {
        "hidden.safetensors": (lambda p: save_diffusers(p, _adapter_for_hidden(3, 8)), "hidden size 24"),
        "hidden.pth": (lambda p: save_original(p, _adapter_for_hidden(3, 8)), "hidden size 24"),
        "no_after.safetensors": (
            lambda p: save_diffusers(p, without("controlnet_blocks.1.after_proj.weight")),
            "controlnet_blocks.1.after_proj.weight is missing",
        ),
        "no_after.pth": (
            lambda p: torch.save(
                {"state_dict": {k: v for k, v in to_original(state).items() if k != "controlnet.1.after_proj.weight"}},
                p,
            ),
            "controlnet.1.after_proj.weight is missing",
        ),
        "nan.safetensors": (lambda p: save_diffusers(p, nan), "NaN or infinite"),
        "int.safetensors": (lambda p: save_diffusers(p, integer), "not a float tensor (dtype int32)"),
        "unknown.safetensors": (
            lambda p: save_diffusers(p, {**state, "lora.weight": torch.zeros(1)}),
            "unknown key 'lora.weight'",
        ),
        "extra.safetensors": (lambda p: save_diffusers(p, extra), "unexpected adapter tensor"),
        "deep.safetensors": (lambda p: save_diffusers(p, too_many), "at least 5 layers"),
        "caption.pth": (lambda p: save_original(p, state, wrong_caption), "64 caption channels"),
        "mixed.pth": (lambda p: torch.save(mixed, p), "mixes the original"),
        "base.safetensors": (
            lambda p: save_file(base.state_dict(), str(p)),
            "a PixArt transformer checkpoint, not a ControlNet adapter",
        ),
        "empty.pth": (lambda p: p.write_bytes(b""), "is empty"),
        "text.pth": (lambda p: p.write_text("not a checkpoint"), "neither a .safetensors file"),
        "truncated.safetensors": (
            lambda p: p.write_bytes((save_diffusers(tmp_path / "whole", state)).read_bytes()[:-100]),
            "damaged .safetensors",
        ),
        "compressed.pth": (lambda p: _deflated(save_original(tmp_path / "plain.pth", state), p), "compressed"),
        "not-a-dict.pth": (lambda p: torch.save([torch.zeros(1)], p), "not a state dict"),
    }
    for name, (write, expected) in cases.items():
        path = tmp_path / name
        write(path)
        message = one_line_error(cf.read_controlnet, path, model)
        assert message.startswith(f"--controlnet {path}: "), message
        assert expected in message, f"{name}: {message}"
        if name.endswith(".safetensors") and name != "truncated.safetensors" and name != "nan.safetensors":
            # the planner's helper checks names and shapes the same way
            assert expected in one_line_error(cf.adapter_parameter_bytes, path, model)

    missing = tmp_path / "missing.pth"
    assert "no such file" in one_line_error(cf.read_controlnet, missing, model)
    fifo = tmp_path / "pipe.pth"
    os.mkfifo(fifo)
    assert "is a FIFO" in one_line_error(cf.read_controlnet, fifo, model)
    huge = tmp_path / "huge.pth"
    with open(huge, "wb") as handle:  # sparse: no disk used
        handle.truncate(cf.file_size_limit(model) + 1)
    assert "more than a PixArt ControlNet for this model can be" in one_line_error(cf.read_controlnet, huge, model)
    empty_folder = tmp_path / "nothing"
    empty_folder.mkdir()
    assert "holds no ControlNet weights file" in one_line_error(cf.read_controlnet, empty_folder, model)


def _deflated(source: Path, target: Path) -> None:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for info in archive.infolist():
            out.writestr(info.filename, archive.read(info.filename))


def test_a_sigma_model_is_refused(base, tmp_path):
    """(e) The adapter works on PixArt-α's latents; a Σ model (same transformer shapes) is refused by family."""
    sigma = Model(str(_deepen(random_model.build(tmp_path / "sigma", "tiny", family="sigma"), LAYERS)))
    path = save_diffusers(tmp_path / "a.safetensors", diffusers_state(random_adapter(base)))
    message = one_line_error(cf.read_controlnet, path, sigma)
    assert "is a PixArt-Σ model" in message and "use a PixArt-α model" in message
    assert message.startswith(f"--controlnet {path}: ")


def test_base_model_tensors_are_never_read(base, model, deep_model, tmp_path):
    """The original file's frozen base (here one 96 MB tensor) is memory-mapped and dropped unread: reading the
    file grows a fresh process's peak memory by far less than the base's size."""
    state = diffusers_state(random_adapter(base))
    base_tensors = {"blocks.0.attn.qkv.weight": torch.ones(24 * 2**20)}  # 96 MB of fp32
    path = save_original(tmp_path / "big.pth", state, base_tensors)
    code = f"""
import resource
from pixart_cli.files import controlnet_file as cf
from pixart_cli.models.source import Model
model = Model({str(deep_model)!r})
cf.read_controlnet({str(tmp_path / "small.safetensors")!r}, model)  # imports and first use out of the way
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
weights = cf.read_controlnet({str(path)!r}, model)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024, weights.base_tensors_ignored)
"""
    save_diffusers(tmp_path / "small.safetensors", state)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    growth, ignored = (int(word) for word in result.stdout.split())
    assert ignored == 1
    assert growth < 16 * 2**20, f"reading grew the peak by {growth / 2**20:.1f} MB"
