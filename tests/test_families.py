"""The PixArt family, schedulers, batches, the embedding cache, image metadata and `pixart info`."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from helpers import SEED, assert_one_line_error, decoded, denoised, encoded, generated, invoke, max_diff
from pixart_cli import random_model, record
from pixart_cli.files import staged
from pixart_cli.models.source import Model

PROMPT = "a small house by the lake"


@pytest.fixture(scope="module")
def family_models(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("families")
    return {family: random_model.build(root / family, "tiny", family=family) for family in ("sigma", "lcm", "dmd")}


def oracle(pipe_class, folder, prompt, seed=SEED, **kwargs):
    pipe = pipe_class.from_pretrained(folder, **kwargs.pop("components", {}))
    pipe.set_progress_bar_config(disable=True)
    if "scheduler" in kwargs:
        pipe.scheduler = kwargs.pop("scheduler")(pipe.scheduler.config)
    images = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs).images
    return np.stack([np.asarray(image) for image in images])


def ours(model, prompt, seed=SEED, **options):
    images, meta = generated([prompt], model, seed=seed, **options)
    return np.stack([np.asarray(image) for image in images]), meta


def test_family_detection(tiny_model, family_models):
    assert Model(str(tiny_model)).family.name == "alpha"
    assert {name: Model(str(path)).family.name for name, path in family_models.items()} == {
        "sigma": "sigma",
        "lcm": "lcm",
        "dmd": "dmd",
    }


def test_sigma_equals_its_pipeline(family_models):
    from diffusers import PixArtSigmaPipeline

    image, meta = ours(family_models["sigma"], PROMPT, steps=3)
    assert meta["family"] == "sigma" and meta["max_sequence_length"] == 300
    assert max_diff(image, oracle(PixArtSigmaPipeline, family_models["sigma"], PROMPT, num_inference_steps=3)) <= 1


def test_lcm_defaults_and_parity(family_models):
    from diffusers import PixArtAlphaPipeline

    image, meta = ours(family_models["lcm"], PROMPT)
    assert (meta["steps"], meta["guidance_scale"], meta["scheduler"]) == (4, 0.0, "LCMScheduler")
    reference = oracle(PixArtAlphaPipeline, family_models["lcm"], PROMPT, num_inference_steps=4, guidance_scale=0.0)
    assert max_diff(image, reference) <= 1


def test_dmd_borrows_t5_and_vae_from_the_base_model(family_models, tiny_model, monkeypatch):
    from diffusers import AutoencoderKL, PixArtAlphaPipeline
    from transformers import T5EncoderModel, T5Tokenizer

    monkeypatch.setenv("PIXART_BASE_MODEL", str(tiny_model))
    image, meta = ours(family_models["dmd"], PROMPT)
    assert (meta["steps"], meta["timesteps"], meta["guidance_scale"]) == (1, [400], 1.0)
    components = {
        "tokenizer": T5Tokenizer.from_pretrained(tiny_model, subfolder="tokenizer"),
        "text_encoder": T5EncoderModel.from_pretrained(tiny_model, subfolder="text_encoder"),
        "vae": AutoencoderKL.from_pretrained(tiny_model, subfolder="vae"),
    }
    reference = oracle(
        PixArtAlphaPipeline,
        family_models["dmd"],
        PROMPT,
        components=components,
        timesteps=[400],
        num_inference_steps=1,
        guidance_scale=1.0,
    )
    assert max_diff(image, reference) <= 1


def test_user_flags_win_over_family_defaults(family_models):
    _, meta = ours(family_models["lcm"], PROMPT, steps=2, guidance_scale=1.5)
    assert (meta["steps"], meta["guidance_scale"]) == (2, 1.5)


@pytest.mark.parametrize(
    "name, class_name",
    [("euler-a", "EulerAncestralDiscreteScheduler"), ("ddim", "DDIMScheduler"), ("sa-solver", "SASolverScheduler")],
)
def test_scheduler_choice_equals_pipeline_with_that_scheduler(tiny_model, name, class_name):
    import diffusers
    from diffusers import PixArtAlphaPipeline

    image, meta = ours(tiny_model, PROMPT, steps=3, scheduler=name)
    assert meta["scheduler"] == class_name
    from pixart_cli.stages.denoise import SCHEDULER_OVERRIDES

    scheduler_class = getattr(diffusers, class_name)
    overrides = SCHEDULER_OVERRIDES.get(class_name, {})
    reference = oracle(
        PixArtAlphaPipeline,
        tiny_model,
        PROMPT,
        num_inference_steps=3,
        scheduler=lambda config: scheduler_class.from_config(config, **overrides),
    )
    assert max_diff(image, reference) <= 1


def test_batches_give_the_same_images_as_one_by_one(tiny_model):
    prompts = ["a cat", "a dog", "a chair"]
    batched, _ = generated(prompts, tiny_model, steps=2, seed=SEED, num_images=2, batch_size=6)
    single, meta = generated(prompts, tiny_model, steps=2, seed=SEED, num_images=2, batch_size=1)
    assert meta["seeds"] == list(range(SEED, SEED + 6))
    assert meta["prompts"] == ["a cat", "a cat", "a dog", "a dog", "a chair", "a chair"]
    for left, right in zip(batched, single):
        assert max_diff(np.asarray(left), np.asarray(right)) <= 1


def test_embedding_cache_skips_t5(tiny_model, tmp_path):
    logs: list[str] = []
    first = encoded(["a cat", "a dog"], tiny_model, cache=tmp_path, log=logs.append)
    assert len(list(tmp_path.glob("*.pt"))) == 2
    logs.clear()
    second = encoded(["a dog", "a cat"], tiny_model, cache=tmp_path, log=logs.append)
    assert logs == [f"encode: all 2 prompt(s) found in the cache {tmp_path}; T5 not loaded"]
    assert torch.equal(second.prompt_embeds[0], first.prompt_embeds[1])
    other = encoded(["a cat"], tiny_model, cache=tmp_path, negative_prompt="blurry", log=logs.append)
    assert any("plan resident" in line for line in logs)  # another negative prompt is another cache entry
    assert not torch.equal(other.negative_prompt_embeds, first.negative_prompt_embeds[:1])


def test_long_prompt_warns_with_the_dropped_text(tiny_model):
    logs: list[str] = []
    encoded(["a cute cat " * 40 + "THE END"], tiny_model, max_sequence_length=16, log=logs.append)
    warnings = [line for line in logs if line.startswith("warning:")]
    assert len(warnings) == 1 and "truncated" in warnings[0] and "end" in warnings[0].lower()


@pytest.mark.parametrize("suffix", [".png", ".jpg", ".webp"])
def test_images_carry_their_settings_and_info_reads_them(tiny_model, tmp_path, suffix):
    result = invoke(
        "generate", PROMPT, "--steps", "2", "--seed", "11", "--model", tiny_model, "-o", f"pic{suffix}", cwd=tmp_path
    )
    assert result.exit_code == 0 and result.stdout == f"pic{suffix}\n"
    shown = invoke("info", f"pic{suffix}", "--json", cwd=tmp_path)
    described = json.loads(shown.stdout)
    assert described["settings"]["seed"] == 11 and described["settings"]["prompt"] == PROMPT
    assert "Steps: 2, Sampler: DPM++ 2M, CFG scale: 4.5, Seed: 11, Size: 256x256" in described["parameters"]
    # every setting that changes an image is in it, the text encoder's precision and caption cleaning included
    settings = described["settings"]
    assert (settings["text_encoder_precision"], settings["clean_caption"], settings["max_sequence_length"]) == (
        "full",
        True,
        120,
    )
    assert (settings["step_cache"], settings["compiled"], settings["loras"]) == (None, False, [])
    table = invoke("info", f"pic{suffix}", cwd=tmp_path).stdout
    assert "seed" in table and "11" in table


def test_info_on_pt_files_and_bad_extension(tiny_model, tmp_path):
    embeddings = encoded([PROMPT], tiny_model)
    staged.save(tmp_path / "emb.pt", embeddings)
    described = json.loads(invoke("info", "emb.pt", "--json", cwd=tmp_path).stdout)
    assert described["kind"] == "embeddings"
    assert described["tensors"]["prompt_embeds"] == {"shape": [1, 120, 32], "dtype": "float32"}
    assert described["meta"]["prompts"] == [PROMPT]
    latents = denoised(embeddings, steps=2, seed=SEED)
    staged.save(tmp_path / "lat.pt", latents)
    assert json.loads(invoke("info", "lat.pt", "--json", cwd=tmp_path).stdout)["meta"]["seeds"] == [SEED]
    result = invoke("decode", "lat.pt", "-o", "pic.bmp", cwd=tmp_path)
    assert result.exit_code == 2 and "unknown image type .bmp" in result.stderr
    assert len(decoded(latents, batch_size=1)) == 1


def test_compile_is_opt_in_and_recorded(tiny_model, monkeypatch):
    """--compile hands the resident transformer's blocks to torch.compile, one by one (regional compilation: one
    code, compiled once; numerics are checked on the GPU bench: compiling takes minutes on a 2-core CPU) and says so
    in the file; the default never compiles."""
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda module, *a, **k: compiled.append(type(module).__name__))
    embeddings = encoded([PROMPT], tiny_model)
    eager = denoised(embeddings, steps=2, seed=SEED)
    assert compiled == [] and eager.meta["compiled"] is False
    marked = denoised(embeddings, steps=2, seed=SEED, compile=True)
    layers = Model(str(tiny_model)).config("transformer")["num_layers"]
    assert compiled == ["BasicTransformerBlock"] * layers and marked.meta["compiled"] is True
    assert torch.equal(marked.latents, eager.latents)  # compile was stubbed: everything else is the same run


def test_compile_cache_is_kept_under_the_users_cache_folder(monkeypatch, tmp_path):
    from pixart_cli import process

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    process.compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "pixart" / "compile")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    process.compile_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")  # the user's own setting wins


def test_step_cache_is_opt_in_recorded_and_exact_when_it_skips_nothing(tiny_model):
    """--step-cache hooks diffusers' caches onto the transformer. A First Block Cache threshold no step change
    falls below skips nothing and gives the default output exactly (the hooks alone change nothing); TaylorSeer
    forecasts steps, so its output differs; each file says which cache made it."""
    embeddings = encoded([PROMPT, "a dog"], tiny_model)
    exact = denoised(embeddings, steps=8, seed=SEED)
    assert exact.meta["step_cache"] is None
    hooked = denoised(embeddings, steps=8, seed=SEED, step_cache="fbc:1e-9")
    assert hooked.meta["step_cache"] == "fbc:1e-09" and torch.equal(hooked.latents, exact.latents)
    forecast = denoised(embeddings, steps=8, seed=SEED, step_cache="TaylorSeer:2", batch_size=1)
    assert forecast.meta["step_cache"] == "taylorseer:2"
    assert torch.isfinite(forecast.latents).all() and not torch.equal(forecast.latents, exact.latents)
    # each batch starts its own cache: image 2 alone equals image 2 of a batch of both
    both = denoised(embeddings, steps=8, seed=SEED, step_cache="taylorseer:2")
    assert torch.allclose(both.latents, forecast.latents, rtol=1e-4, atol=1e-3)  # batching: float order only
    _, settings = record.image_metadata(record.RunRecord.from_meta(forecast.meta), 0)
    assert settings["step_cache"] == "taylorseer:2"
    # with 4 steps TaylorSeer runs every one in full: not applied, not recorded
    assert denoised(embeddings, steps=4, seed=SEED, step_cache="taylorseer:2").meta["step_cache"] is None


@pytest.mark.parametrize("step_cache", ["taylorseer:2", "fbc:0.3"])
def test_step_caches_hook_on_as_diffusers_enable_cache_does(tiny_model, step_cache):
    """The step caches go on without CacheMixin.enable_cache (whose imports pull in every hook module and
    torch._dynamo): the same hooks, so the same latents as enable_cache's, step for step."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    from pixart_cli.models import sampling, step_caching
    from pixart_cli.models.facade import make_scheduler

    embeddings = encoded([PROMPT, "a dog"], tiny_model)
    source = Model(str(tiny_model))
    cls = step_caching.transformer_class(True)
    ours, theirs = (cls.from_pretrained(source.folder("transformer")).eval() for _ in range(2))
    step_caching.enable(ours, step_cache)
    method, _, value = step_cache.partition(":")
    if method == "fbc":
        theirs.enable_cache(FirstBlockCacheConfig(threshold=float(value)))
    else:
        theirs.enable_cache(
            TaylorSeerCacheConfig(
                cache_interval=int(value),
                disable_cache_before_step=3,
                use_lite_mode=True,
                taylor_factors_dtype=theirs.dtype,
            )
        )
    assert ours.is_cache_enabled and type(ours._cache_config) is type(theirs._cache_config)
    results = []
    for transformer in (ours, theirs):
        scheduler = make_scheduler(source.config("scheduler")["_class_name"], source.config("scheduler"))
        with torch.no_grad():
            results.append(
                sampling.sample_latents(
                    transformer,
                    scheduler,
                    source.family.pipeline,
                    **embeddings.tensors(),
                    num_inference_steps=8,
                    timesteps=None,
                    guidance_scale=4.5,
                    height=256,
                    width=256,
                    vae_scale_factor=source.vae_scale_factor,
                    generator=[torch.Generator().manual_seed(SEED + i) for i in range(2)],
                    device=torch.device("cpu"),
                )
            )
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize(
    "value, fragment",
    [
        ("fast", "unknown method"),
        ("fbc:0", "above 0 and at most 1"),
        ("fbc:1.5", "above 0 and at most 1"),
        ("taylorseer:1_0", "from 2 to 1000"),
    ],
)
def test_bad_step_cache_is_one_line(value, fragment, tmp_path):
    result = invoke("generate", "a cat", "--step-cache", value, "-o", "cat.png", cwd=tmp_path)
    assert_one_line_error(result, 2, f"--step-cache {value!r}", fragment)
    assert list(tmp_path.iterdir()) == []
