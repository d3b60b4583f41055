"""LoRA: every accepted naming fuses to the hand-merged weights, the image equals diffusers on hand-merged weights,
every denoise plan gives the same result, and a LoRA that does not fit exits 2 before anything loads or is written."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from helpers import denoised, encoded, max_diff, read_png, run_pixart
from pixart_cli import random_model
from pixart_cli.errors import PixartError
from pixart_cli.files import image_io, lora_file, staged
from pixart_cli.models import lora, memory

PROMPT = "a cute cat"
# A few layers of each kind the tiny transformer has: self/cross attention, MLP, conditioning, output, patch conv.
LAYERS = (
    "transformer_blocks.0.attn1.to_q",
    "transformer_blocks.1.attn2.to_k",
    "transformer_blocks.0.ff.net.0.proj",
    "transformer_blocks.1.ff.net.2",
    "adaln_single.linear",
    "caption_projection.linear_1",
    "proj_out",
    "pos_embed.proj",
)
# Original PixArt names for OneTrainer's OMI naming (its convert_pixart_lora.py table), for the layers above.
OMI_NAMES = {
    "transformer_blocks.0.attn1.to_q": "transformer.blocks.0.attn.qkv.0",
    "transformer_blocks.1.attn2.to_k": "transformer.blocks.1.cross_attn.kv_linear.0",
    "transformer_blocks.0.ff.net.0.proj": "transformer.blocks.0.mlp.fc1",
    "transformer_blocks.1.ff.net.2": "transformer.blocks.1.mlp.fc2",
    "adaln_single.linear": "transformer.t_block.1",
    "caption_projection.linear_1": "transformer.y_embedder.y_proj.fc1",
    "proj_out": "transformer.final_layer.linear",
    "pos_embed.proj": "transformer.x_embedder.proj",
}


@pytest.fixture(scope="module")
def transformer(tiny_model):
    from diffusers import PixArtTransformer2DModel

    return PixArtTransformer2DModel.from_pretrained(tiny_model, subfolder="transformer").eval()


def random_lora(transformer, rank: int, seed: int, layers=LAYERS, magnitude: float = 0.5) -> dict:
    """{layer: (down, up)} shaped for the transformer's layers (conv: [r, in, kh, kw] and [out, r, 1, 1])."""
    generator = torch.Generator().manual_seed(seed)
    modules = dict(transformer.named_modules())
    result = {}
    for name in layers:
        weight = modules[name].weight
        down = torch.randn((rank, *weight.shape[1:]), generator=generator) * magnitude
        up = torch.randn((weight.shape[0], rank, *([1, 1] if weight.dim() == 4 else [])), generator=generator)
        result[name] = (down, up * magnitude)
    return result


def write_lora(path, weights: dict, naming: str, alpha: float | None = None, metadata_alpha: float | None = None):
    """Save {layer: (down, up)} the way a trainer names it. alpha: as .alpha keys; metadata_alpha: diffusers'
    lora_adapter_metadata (transformer.lora_alpha)."""
    tensors = {}
    for name, (down, up) in weights.items():
        if naming == "diffusers":
            base, roles = f"transformer.{name}", ("lora_A.weight", "lora_B.weight")
        elif naming == "peft":  # PeftModel.save_pretrained
            base, roles = f"base_model.model.{name}", ("lora_A.weight", "lora_B.weight")
        elif naming == "onetrainer":  # convert_to_legacy_diffusers
            base, roles = "lora_transformer_" + name.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        elif naming == "lycoris":
            base, roles = "lycoris_" + name.replace(".", "_"), ("lora_down.weight", "lora_up.weight")
        elif naming == "omi":
            base, roles = OMI_NAMES[name], ("lora_down.weight", "lora_up.weight")
        else:
            raise ValueError(naming)
        tensors[f"{base}.{roles[0]}"] = down.contiguous()
        tensors[f"{base}.{roles[1]}"] = up.contiguous()
        if alpha is not None:
            tensors[f"{base}.alpha"] = torch.tensor(float(alpha))
    metadata = {"format": "pt"}
    if metadata_alpha is not None:
        rank = next(iter(weights.values()))[0].shape[0]
        metadata["lora_adapter_metadata"] = json.dumps(
            {"transformer.r": rank, "transformer.lora_alpha": metadata_alpha}
        )
    save_file(tensors, str(path), metadata=metadata)
    return path


def hand_merged(transformer, adapters) -> dict:
    """The oracle: W + scale * alpha / rank * B @ A per layer, in fp32, for [(weights, alpha, scale), ...]."""
    state = {key: value.clone() for key, value in transformer.state_dict().items()}
    for weights, alpha, scale in adapters:
        for name, (down, up) in weights.items():
            key = f"{name}.weight"
            rank = down.shape[0]
            state[key] = state[key] + scale * (alpha / rank) * (up.flatten(1) @ down.flatten(1)).reshape(
                state[key].shape
            )
    return state


def fused(transformer, loras) -> dict:
    import copy

    model = copy.deepcopy(transformer)
    lora.apply_loras(model, loras)
    return model.state_dict()


def assert_state_close(ours: dict, reference: dict):
    assert ours.keys() == reference.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize(
    "naming, alpha, metadata_alpha, expected_alpha",
    [
        ("diffusers", None, 2.0, 2.0),  # alpha from diffusers' lora_adapter_metadata
        ("diffusers", None, None, 4.0),  # no alpha anywhere: alpha = rank
        ("peft", 8.0, None, 8.0),  # .alpha keys
        ("onetrainer", 1.0, None, 1.0),
        ("lycoris", 3.0, None, 3.0),
        ("omi", 2.0, None, 2.0),
    ],
)
def test_each_naming_fuses_to_the_hand_merge(transformer, tmp_path, naming, alpha, metadata_alpha, expected_alpha):
    weights = random_lora(transformer, rank=4, seed=1)
    path = write_lora(tmp_path / "style.safetensors", weights, naming, alpha, metadata_alpha)
    loaded = lora_file.read_lora(lora_file.parse_lora_spec(f"{path}:0.7"))
    assert loaded.scale == 0.7 and len(loaded.modules) == len(LAYERS)
    assert {m.alpha for m in loaded.modules.values()} == {expected_alpha}
    assert_state_close(fused(transformer, [loaded]), hand_merged(transformer, [(weights, expected_alpha, 0.7)]))


def test_peft_save_pretrained_alpha_comes_from_its_adapter_config(transformer, tmp_path):
    """PeftModel.save_pretrained keeps lora_alpha in adapter_config.json beside adapter_model.safetensors (PixArt-Σ's
    LoRA script leaves it at PEFT's default, 8, whatever the rank)."""
    weights = random_lora(transformer, rank=4, seed=8)
    path = write_lora(tmp_path / "adapter_model.safetensors", weights, "peft")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 8, "peft_type": "LORA"}))
    loaded = lora_file.read_lora(lora_file.LoraSpec(path))
    assert loaded.alpha_source == "adapter_config.json" and {m.alpha for m in loaded.modules.values()} == {8.0}
    assert_state_close(fused(transformer, [loaded]), hand_merged(transformer, [(weights, 8.0, 1.0)]))


def test_two_loras_at_different_scales_add_up(transformer, tmp_path):
    first, second = random_lora(transformer, 4, seed=2), random_lora(transformer, 8, seed=3, layers=LAYERS[2:])
    loras = [
        lora_file.read_lora(lora_file.LoraSpec(write_lora(tmp_path / "a.safetensors", first, "diffusers", 4.0), 0.8)),
        lora_file.read_lora(
            lora_file.LoraSpec(write_lora(tmp_path / "b.safetensors", second, "onetrainer", 2.0), -0.5)
        ),
    ]
    reference = hand_merged(transformer, [(first, 4.0, 0.8), (second, 2.0, -0.5)])
    assert_state_close(fused(transformer, loras), reference)


def test_streamed_plan_equals_resident_plan_with_loras(tiny_model, transformer, tmp_path, monkeypatch):
    """Fused before diffusers' group offloading: the streamed transformer gives the same latents."""
    loras = [
        lora_file.read_lora(
            lora_file.LoraSpec(write_lora(tmp_path / "a.safetensors", random_lora(transformer, 4, 4), "diffusers"), 0.6)
        )
    ]
    embeddings = encoded([PROMPT], tiny_model)
    resident = denoised(embeddings, steps=2, seed=0, loras=tuple(loras))
    logs: list[str] = []
    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))  # every plan its smallest
    streamed = denoised(embeddings, steps=2, seed=0, loras=tuple(loras), log=logs.append)
    logs = [line for line in logs if not line.startswith("seed: ")]
    assert logs[0].startswith("denoise: plan streamed") and logs[1].startswith("lora: a.safetensors x0.6 (8 layers")
    assert torch.equal(resident.latents, streamed.latents)
    plain = denoised(embeddings, steps=2, seed=0)
    assert not torch.equal(plain.latents, resident.latents)  # the LoRA did change the result
    assert resident.meta["loras"] == [{"file": "a.safetensors", "sha256": loras[0].sha256, "scale": 0.6}]
    assert plain.meta["loras"] == []


def test_generate_with_two_loras_equals_diffusers_on_hand_merged_weights(tiny_model, transformer, tmp_path):
    """A real `pixart generate` process against diffusers' own pipeline whose transformer was merged by hand."""
    from diffusers import PixArtAlphaPipeline

    first, second = random_lora(transformer, 4, seed=5), random_lora(transformer, 2, seed=6, layers=LAYERS[:4])
    write_lora(tmp_path / "first.safetensors", first, "diffusers", metadata_alpha=2.0)
    write_lora(tmp_path / "second.safetensors", second, "onetrainer", alpha=1.0)
    result = run_pixart(
        "generate",
        PROMPT,
        "--steps",
        "2",
        "--seed",
        "3",
        "--lora",
        "first.safetensors:0.8",
        "--lora",
        "second.safetensors:0.5",
        "-o",
        "out.png",
        cwd=tmp_path,
        env={"PIXART_MODEL": str(tiny_model)},
    )
    assert result.stdout == "out.png\n"
    assert "lora: first.safetensors x0.8 (8 layers, rank 4, peft naming, alpha from lora_adapter_metadata)" in (
        result.stderr
    )

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.transformer.load_state_dict(hand_merged(pipe.transformer, [(first, 2.0, 0.8), (second, 1.0, 0.5)]))
    reference = np.asarray(
        pipe(PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)).images[0]
    )
    assert max_diff(read_png(tmp_path / "out.png"), reference) <= 1
    without = np.asarray(
        PixArtAlphaPipeline.from_pretrained(tiny_model, dtype=torch.float32)(
            PROMPT, num_inference_steps=2, generator=torch.Generator("cpu").manual_seed(3)
        ).images[0]
    )
    assert max_diff(without, reference) > 8  # the comparison can tell a LoRA from none

    settings = image_io.read_image_metadata(tmp_path / "out.png")["settings"]
    import hashlib

    assert settings["loras"] == [
        {"file": name, "sha256": hashlib.sha256((tmp_path / name).read_bytes()).hexdigest(), "scale": scale}
        for name, scale in (("first.safetensors", 0.8), ("second.safetensors", 0.5))
    ]


# --- bad LoRA files ------------------------------------------------------------------------------------------
def _bad_files(transformer, folder):
    good = random_lora(transformer, 4, seed=7, layers=LAYERS[:2])
    down, up = good["transformer_blocks.0.attn1.to_q"]
    files = {
        "unknown-module": (
            {
                "transformer.transformer_blocks.9.attn1.to_q.lora_A.weight": down,
                "transformer.transformer_blocks.9.attn1.to_q.lora_B.weight": up,
            },
            "transformer_blocks.9.attn1.to_q is not a layer of this model's transformer",
        ),
        "wrong-shape": (
            {"transformer.proj_out.lora_A.weight": down, "transformer.proj_out.lora_B.weight": up},
            "transformer.proj_out does not fit: down [4, 16] and up [16, 4] for a layer of weight [32, 16]",
        ),
        "wrong-rank-pairing": (
            {
                "lora_transformer_proj_out.lora_down.weight": down,
                "lora_transformer_proj_out.lora_up.weight": torch.zeros(32, 3),
            },
            "wrong rank pairing, down [4, 16] has rank 4 but up [32, 3] has 3",
        ),
        "unpaired": ({"transformer.proj_out.lora_A.weight": down}, "has a LoRA down matrix but no up matrix"),
        "text-encoder": (
            {
                "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight": down,
                "lora_te_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight": up,
            },
            "text-encoder (T5) LoRA weights",
        ),
        "lokr": ({"lycoris_proj_out.lokr_w1": down}, "holds LoKr weights"),
    }
    paths = {}
    for name, (tensors, fragment) in files.items():
        paths[name] = (write_lora_tensors(folder / f"{name}.safetensors", tensors), fragment)
    pickle = folder / "pickle.safetensors"
    torch.save({"a": down}, pickle)
    paths["pickle"] = (pickle, "not a .safetensors file")
    return paths


def write_lora_tensors(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_bad_loras_are_refused_before_the_weights_load(tiny_model, transformer, tmp_path):
    skeleton = memory.meta_model(type(transformer).from_config, transformer.config, torch.float32)
    for name, (path, fragment) in _bad_files(transformer, tmp_path).items():
        with pytest.raises(PixartError) as caught:
            lora.check_lora(lora_file.read_lora(lora_file.LoraSpec(path)), skeleton)
        assert fragment in str(caught.value), name
        assert caught.value.exit_code == 2 and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("style.safetensors:nan", "is not a finite number"),
        ("missing.safetensors:0.5", "--lora missing.safetensors: no such file"),
    ],
)
def test_bad_lora_values(text, fragment, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PixartError, match=fragment):
        lora_file.read_lora(lora_file.parse_lora_spec(text))


def test_parse_lora_spec():
    assert lora_file.parse_lora_spec("a.safetensors") == lora_file.LoraSpec(
        __import__("pathlib").Path("a.safetensors"), 1.0
    )
    assert lora_file.parse_lora_spec("dir/a.safetensors:-0.25").scale == -0.25
    assert str(lora_file.parse_lora_spec("C:\\loras\\a.safetensors").path) == "C:\\loras\\a.safetensors"


def test_a_lora_that_does_not_fit_exits_2_and_writes_nothing(tiny_model, transformer, tmp_path, monkeypatch):
    """generate (a real process) stops before T5 runs, denoise before the transformer loads: one line, no file."""
    from typer.testing import CliRunner

    from pixart_cli.cli.commands import app

    path, fragment = _bad_files(transformer, tmp_path)["wrong-shape"]
    staged.save(tmp_path / "emb.pt", encoded([PROMPT], tiny_model))
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run_pixart(
        "generate",
        PROMPT,
        "-o",
        "out.png",
        "--lora",
        f"{path.name}:0.5",
        cwd=tmp_path,
        env={"PIXART_MODEL": str(tiny_model)},
        check=False,
    )
    monkeypatch.chdir(tmp_path)
    in_process = CliRunner().invoke(app, ["denoise", "emb.pt", "-o", "lat.pt", "--lora", f"{path.name}:0.5"])
    for code, stdout, stderr in (
        (result.returncode, result.stdout, result.stderr),
        (in_process.exit_code, in_process.stdout, in_process.stderr),
    ):
        assert code == 2 and stdout == "", stderr
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: --lora {path.name}: ") and fragment in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_the_memory_plan_counts_the_moment_of_fusing():
    """Fusing needs an fp32 copy of the largest adapted layer and its LoRA on the device; nothing more stays."""
    from diffusers import PixArtTransformer2DModel

    xl = random_model.transformer_kwargs()  # PixArt-XL-2-1024
    skeleton = memory.meta_model(lambda config: PixArtTransformer2DModel(**config), xl, torch.float16)
    rank = 4
    weights = {
        "transformer_blocks.0.attn1.to_q": (torch.zeros(rank, 1152), torch.zeros(1152, rank)),
        "transformer_blocks.3.ff.net.0.proj": (torch.zeros(rank, 1152), torch.zeros(4608, rank)),
    }
    adapter = lora_file.LoraWeights(
        __import__("pathlib").Path("x.safetensors"),
        "0" * 64,
        1.0,
        "peft",
        {f"transformer.{k}": lora_file.LoraModule(d, u, 4.0) for k, (d, u) in weights.items()},
    )
    assert lora.fuse_peak_bytes(skeleton, [adapter]) == 2 * 4 * 4608 * 1152 + 4 * rank * (1152 + 4608)  # 42.5 MB
