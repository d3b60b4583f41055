"""Lean start-up (issue 10): each stage process imports only what it runs, and the compact pieces that make
that possible (facade.py, sampling.py, prompts.py, t5.py, vae.py) compute what diffusers and
transformers compute. The import lists are checked in real processes, so the guard cannot flake on timing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from helpers import SEED, denoised, encoded
from pixart_cli import random_model

# Heavy packages that no stage runs. Each was measured costing a stage process from 0.3 s to several seconds.
NEVER = [
    "sklearn",
    "sympy",
    "torch._dynamo",
    "torch._inductor",
    "torch.distributed.tensor",
    "bitsandbytes",
    "peft",
    "ray",
    "diffusers.pipelines",
    "diffusers.loaders",
    "diffusers.models.autoencoders.autoencoder_kl",
    "diffusers.hooks.group_offloading",
    "transformers.modeling_utils",
    "transformers.generation",
    "transformers.models.t5.modeling_t5",
    "transformers.models.auto",
]
NOT_IMPORTED = {
    "encode": NEVER + ["diffusers"],
    "denoise": NEVER + ["transformers"],
    "decode": NEVER + ["transformers"],
    "encode-image": NEVER + ["transformers"],
    "encode-mask": NEVER
    + ["transformers", "diffusers.models.transformers.pixart_transformer_2d", "diffusers.models.autoencoders.vae"],
    "generate": NEVER,
}
# What torch.compile may add (and only --compile): the compiler stack itself.
COMPILER = {"torch._dynamo", "torch._inductor", "sympy", "torch.distributed.tensor"}
# Runs the installed CLI in a process and writes the modules it imported (those not hidden) when it exits.
# TINY_BUDGET=1: every stage takes its smallest plan, as on a tiny card (tests/test_memory.py's tiny_budget).
# EAGER_COMPILE=1: torch.compile traces and runs as on the GPU, less Inductor's code generation (minutes on a CPU).
RECORD_MODULES = """
import atexit, json, os, runpy, sys
out = sys.argv[1]
if os.environ.get("TINY_BUDGET") == "1":
    from pixart_cli.models import memory
    memory.device_budget = lambda budget, device: (1024, 0)
if os.environ.get("EAGER_COMPILE") == "1":
    import torch
    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self, *args, **kwargs: compile_module(self, backend="eager")
atexit.register(lambda: open(out, "w").write(json.dumps(sorted(k for k, v in sys.modules.items() if v is not None))))
sys.argv = ["pixart", *sys.argv[2:]]
runpy.run_module("pixart_cli", run_name="__main__")
"""


def imported_by(tmp_path, *args, env=None) -> set[str]:
    record = tmp_path / "modules.json"
    result = subprocess.run(
        [sys.executable, "-c", RECORD_MODULES, str(record), *map(str, args)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    return set(json.loads(record.read_text()))


def test_each_stage_process_imports_only_what_it_runs(tiny_model, tmp_path):
    common = ["--model", tiny_model, "--device", "cpu", "--quiet"]
    runs = {
        "encode": ["encode", "a cute cat", "-o", "emb.pt", *common],
        "denoise": ["denoise", "emb.pt", "--steps", "2", "-o", "lat.pt", *common],
        "decode": ["decode", "lat.pt", "-o", "image.png", *common],
        "encode-image": ["encode-image", "image.png", "-o", "init.pt", *common],
        "encode-mask": ["encode-mask", "image.png", "--image", "image.png", "-o", "mask.pt", *common[:2], "--quiet"],
        "generate": ["generate", "a cute cat", "--steps", "2", "-o", "gen.png", *common],
    }
    for stage, args in runs.items():
        modules = imported_by(tmp_path, *args)
        assert "torch" in modules  # the recording works
        loaded = [name for name in NOT_IMPORTED[stage] if name in modules]
        assert not loaded, f"{stage} imported {loaded}"


@pytest.fixture(scope="module")
def staged_files(tiny_model, tmp_path_factory):
    """emb.pt, lat.pt, image.png and a LoRA for the tiny model's transformer, in one folder."""
    from safetensors.torch import save_file

    from pixart_cli.models.source import Model
    from pixart_cli.models.transformer import skeleton

    folder = tmp_path_factory.mktemp("lean-plans")
    common = ["--model", str(tiny_model), "--device", "cpu", "--quiet"]
    for args in (
        ["encode", "a cute cat", "-o", "emb.pt"],
        ["denoise", "emb.pt", "--steps", "2", "-o", "lat.pt"],
        ["decode", "lat.pt", "-o", "image.png"],
    ):
        subprocess.run([sys.executable, "-m", "pixart_cli", *args, *common], cwd=folder, check=True, timeout=300)
    generator = torch.Generator().manual_seed(SEED)
    tensors = {}
    for name, layer in skeleton(Model(str(tiny_model)).config("transformer"), torch.float32).named_modules():
        if isinstance(layer, torch.nn.Linear) and name.startswith("transformer_blocks"):
            tensors[f"transformer.{name}.lora_A.weight"] = torch.randn(4, layer.in_features, generator=generator)
            tensors[f"transformer.{name}.lora_B.weight"] = torch.randn(layer.out_features, 4, generator=generator)
    save_file({k: v * 0.01 for k, v in tensors.items()}, str(folder / "style.safetensors"))
    return folder


# The plans small cards get and the opt-in paths import no more than the plain stage does (issue 19: the tiled VAE
# imported AutoencoderKL and torch._dynamo, the streamed transformer diffusers' group offloading, --step-cache
# torch._dynamo and every transformer model's block, --lora's check torch._dynamo).
PLAN_RUNS = {
    "denoise --lora": (["denoise", "emb.pt", "--steps", "2", "--lora", "style.safetensors"], {}, "denoise"),
    "generate --lora": (["generate", "a cat", "--steps", "2", "--lora", "style.safetensors:0.5"], {}, "generate"),
    "denoise, streamed": (["denoise", "emb.pt", "--steps", "2"], {"TINY_BUDGET": "1"}, "denoise"),
    "denoise --lora, streamed": (
        ["denoise", "emb.pt", "--steps", "2", "--lora", "style.safetensors"],
        {"TINY_BUDGET": "1"},
        "denoise",
    ),
    "decode, tiled": (["decode", "lat.pt"], {"TINY_BUDGET": "1"}, "decode"),
    "encode-image, tiled": (["encode-image", "image.png"], {"TINY_BUDGET": "1"}, "encode-image"),
    "generate, smallest plans": (["generate", "a cat", "--steps", "2"], {"TINY_BUDGET": "1"}, "generate"),
    "denoise --step-cache taylorseer": (
        ["denoise", "emb.pt", "--steps", "6", "--step-cache", "taylorseer:2"],
        {},
        "denoise",
    ),
    "denoise --step-cache fbc": (["denoise", "emb.pt", "--steps", "4", "--step-cache", "fbc:0.1"], {}, "denoise"),
    "denoise --compile": (["denoise", "emb.pt", "--steps", "2", "--compile"], {"EAGER_COMPILE": "1"}, "compile"),
}


@pytest.mark.parametrize("case", PLAN_RUNS)
def test_small_card_plans_and_opt_in_paths_import_only_what_they_run(tiny_model, staged_files, case):
    args, env, stage = PLAN_RUNS[case]
    output = "out.png" if args[0] in ("generate", "decode") else "out.pt"
    modules = imported_by(
        staged_files,
        *args,
        "-o",
        output,
        "--model",
        tiny_model,
        "--device",
        "cpu",
        "--quiet",
        env={**os.environ, **env},
    )
    if stage == "compile":  # what compiling needs, and nothing else of the list
        assert "torch._dynamo" in modules  # it did compile
        forbidden = [name for name in NOT_IMPORTED["denoise"] if name not in COMPILER]
    else:
        forbidden = NOT_IMPORTED[stage]
    loaded = [name for name in forbidden if name in modules]
    assert not loaded, f"{case} imported {loaded}"


def fake_scipy(folder):
    """An installed-looking ``scipy`` (dist-info included, as diffusers checks) whose ``stats`` records its import;
    CI has no scipy, the GPU machines do."""
    (folder / "scipy" / "stats").mkdir(parents=True)
    (folder / "scipy" / "__init__.py").write_text("")
    (folder / "scipy" / "stats" / "__init__.py").write_text(
        "class beta:\n    @staticmethod\n    def ppf(q, a, b):\n        return float(q)\n"
    )
    info = folder / "scipy-1.99.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: scipy\nVersion: 1.99.0\n")
    (info / "top_level.txt").write_text("scipy\n")
    return folder


def test_denoise_imports_scipy_only_for_beta_sigmas(tiny_model, tmp_path):
    """Scheduler modules import scipy.stats at import time for beta sigmas alone; a denoise process skips it, and
    a scheduler that does use beta sigmas still gets it."""
    env = {**os.environ, "PYTHONPATH": str(fake_scipy(tmp_path / "site"))}
    subprocess.run(
        [sys.executable, "-m", "pixart_cli", "encode", "a cat", "--model", tiny_model, "-o", "emb.pt", "-q"],
        cwd=tmp_path,
        env=env,
        check=True,
        capture_output=True,
    )
    modules = imported_by(tmp_path, "denoise", "emb.pt", "--steps", "2", "--model", tiny_model, "-q", env=env)
    assert "scipy.stats" not in modules
    code = """
import sys
from pixart_cli.models.facade import scheduler_class
cls = scheduler_class("DPMSolverMultistepScheduler")
from diffusers.utils import is_scipy_available
assert is_scipy_available() and "scipy.stats" not in sys.modules  # diffusers sees the fake one, not imported
cls(use_beta_sigmas=True).set_timesteps(4)
print("scipy.stats" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True"]


def test_lean_import_leaves_the_rest_of_diffusers_importable(tmp_path):
    """Shallow packages run their __init__ when asked for something else; hidden modules come back."""
    code = """
import sys
from pixart_cli.models.facade import import_diffusers, import_transformers
import_transformers("transformers.models.t5.tokenization_t5")
import_diffusers("diffusers.models.transformers.pixart_transformer_2d")
assert "diffusers.models.transformers.dit_transformer_2d" not in sys.modules
assert sys.modules.get("torch._dynamo", "absent") == "absent"
from diffusers.models.transformers import DiTTransformer2DModel
from diffusers import AutoencoderKL, PixArtAlphaPipeline
from transformers import T5EncoderModel  # the quantized-T5 plans load it
import torch._dynamo
print(DiTTransformer2DModel.__name__, AutoencoderKL.__name__, PixArtAlphaPipeline.__name__, T5EncoderModel.__name__)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["DiTTransformer2DModel", "AutoencoderKL", "PixArtAlphaPipeline", "T5EncoderModel"]


def test_diffusers_package_map_is_computed_only_when_read(tmp_path):
    """diffusers computes importlib.metadata.packages_distributions() when it imports (every file of every
    distribution statted); through the facade it is computed the first time diffusers reads it, with the same
    answers, and importlib.metadata is left as it was."""
    code = """
import importlib.metadata as metadata
calls = []
real = metadata.packages_distributions
metadata.packages_distributions = lambda: calls.append(1) or real()
from pixart_cli.models.facade import import_diffusers
import_diffusers("diffusers.models.autoencoders.vae")
assert calls == [], calls
assert metadata.packages_distributions() is not None and calls == [1]  # the caller's own function again
import diffusers.utils.import_utils as diffusers_imports
lazy = diffusers_imports._package_map
assert dict(lazy) == dict(real()) and len(calls) == 2  # read: computed once, the real map
assert diffusers_imports._is_package_available("numpy", get_dist_name=True)[0]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_bin_tables_read_from_source_equal_the_pipelines():
    from diffusers.pipelines.pixart_alpha import pipeline_pixart_alpha, pipeline_pixart_sigma

    from pixart_cli.models.facade import diffusers_constant
    from pixart_cli.models.source import BIN_TABLES

    for name in BIN_TABLES.values():
        module = pipeline_pixart_sigma if name == "ASPECT_RATIO_2048_BIN" else pipeline_pixart_alpha
        path = f"pipelines/pixart_alpha/{module.__name__.rsplit('.', 1)[-1]}.py"
        assert diffusers_constant(path, name) == getattr(module, name), name


@pytest.mark.parametrize(
    "caption",
    [
        "a cute cat &amp; dog, see https://example.com/cat.png",
        "<b>Hello</b> @nick #123 “quoted” ---- this-is-my-cute-cat_x www.shop.com/x",
        "IMG_12345678.jpg free shipping 1920x1080 page 3, jc6640vc 192.168.0.1",
        "  Ünïcödé   ‘quotes’ and — dashes — 東京 ...  ",
    ],
)
def test_caption_cleaning_is_the_pipelines(caption):
    from diffusers import PixArtAlphaPipeline

    from pixart_cli.models.prompts import preprocess

    pipeline = PixArtAlphaPipeline.__new__(PixArtAlphaPipeline)  # its methods only, no components
    for clean in (True, False):
        assert preprocess([caption], clean) == pipeline._text_preprocessing(caption, clean_caption=clean)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_t5_equals_transformers_with_padding(tiny_model, dtype):
    from transformers import T5EncoderModel

    from pixart_cli.models.streaming import StreamedT5

    ids = torch.tensor([[5, 6, 7, 8, 1, 0, 0], [9, 1, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[0, 4] = 1  # the EOS is attended
    ours = StreamedT5(tiny_model / "text_encoder", dtype, torch.device("cpu"), resident=True).model
    reference = T5EncoderModel.from_pretrained(tiny_model / "text_encoder", dtype=dtype).eval()
    assert {n: p.dtype for n, p in ours.named_parameters()} == {n: p.dtype for n, p in reference.named_parameters()}
    with torch.no_grad():
        assert torch.equal(ours(ids, attention_mask=mask)[0], reference(ids, attention_mask=mask)[0])


def test_vae_decoder_equals_autoencoder_kl(tiny_model):
    from diffusers import AutoencoderKL

    from pixart_cli.models.source import Model
    from pixart_cli.models.vae import load_vae_decoder

    config = Model(str(tiny_model)).config("vae")
    ours = load_vae_decoder(tiny_model / "vae", config, torch.float32, torch.device("cpu"))
    reference = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae").eval()
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))
    with torch.no_grad():
        assert torch.equal(ours.decode(latents)[0], reference.decode(latents, return_dict=False)[0])
    assert ours.config.scaling_factor == reference.config.scaling_factor


def test_micro_conditions_of_the_1024_transformer_match_the_pipeline(tmp_path):
    """Only sample_size 128 (PixArt-α 1024) passes resolution and aspect ratio; tiny models elsewhere are 32."""
    from diffusers import PixArtAlphaPipeline, PixArtTransformer2DModel

    model = random_model.build(tmp_path / "model", "tiny", sample_size=128)
    # The micro-condition embeddings split the hidden size in three: 24 wide, not the tiny model's 16.
    torch.manual_seed(SEED)
    PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=1,
        caption_channels=32,
        cross_attention_dim=24,
        sample_size=128,
        norm_num_groups=1,
    ).save_pretrained(model / "transformer")
    embeddings = encoded(["a cute cat"], model)
    ours = denoised(embeddings, steps=2, seed=SEED, width=64, height=48, binning=False)
    pipe = PixArtAlphaPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(
        prompt_embeds=embeddings.prompt_embeds,
        prompt_attention_mask=embeddings.prompt_attention_mask,
        negative_prompt_embeds=embeddings.negative_prompt_embeds,
        negative_prompt_attention_mask=embeddings.negative_prompt_attention_mask,
        negative_prompt=None,
        num_inference_steps=2,
        width=64,
        height=48,
        use_resolution_binning=False,
        output_type="latent",
        generator=[torch.Generator("cpu").manual_seed(SEED)],
    ).images
    assert pipe.transformer.config.sample_size == 128 and pipe.transformer.use_additional_conditions
    assert torch.equal(ours.latents, reference)
