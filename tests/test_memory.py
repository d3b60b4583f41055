"""VRAM budgets: the planner on the full-size configs (no weights), and every plan end to end on the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SEED, decoded, denoised, encoded, generated, max_diff
from pixart_cli import random_model
from pixart_cli.errors import PixartError
from pixart_cli.models import memory
from pixart_cli.models.source import Model
from pixart_cli.stages import encode as encode_module

GB = memory.GIB
CONTEXT = memory.CONTEXT_ESTIMATE


@pytest.mark.parametrize(
    "text, expected",
    [("8GB", 8 * GB), ("3gb", 3 * GB), ("2.5G", int(2.5 * GB)), ("512MB", 512 * 2**20), ("auto", None), (None, None)],
)
def test_parse_vram(text, expected):
    assert memory.parse_vram(text) == expected


@pytest.mark.parametrize("text", ["8", "lots", "-3GB", "8TB", "100MB"])
def test_parse_vram_rejects_with_the_flag_named(text):
    with pytest.raises(PixartError, match=r"^--vram"):
        memory.parse_vram(text)


@pytest.fixture(scope="module")
def full_size(tmp_path_factory) -> Model:
    """PixArt-XL-2-1024-MS configs only (T5-XXL, 28-layer DiT, SD VAE): planning needs no weights."""
    return Model(str(random_model.write_full_size_configs(tmp_path_factory.mktemp("full") / "model")))


def test_full_size_weights_are_counted_exactly(full_size):
    plan = encode_module.plan(full_size, None, CONTEXT, torch.float16, 2, 120)
    # T5-v1.1-XXL encoder: 4,762,310,656 parameters; the 24 `wo` (10240 x 4096) stay fp32 under fp16.
    wo = 24 * 10240 * 4096
    t5_bytes = (4_762_310_656 - wo) * 2 + wo * 4
    assert plan.name == "resident"
    assert t5_bytes < plan.estimate - CONTEXT < t5_bytes + 0.1 * GB


@pytest.mark.parametrize("precision, measured", [("8bit", 8.29), ("4bit", 6.67)])
def test_quantized_t5_estimate_matches_the_h100_measurement(full_size, precision, measured):
    # Measured 2026-11-26 on an NVIDIA H100 (reserved + 0.51 GB context): bitsandbytes leaves `wo` in fp32.
    plan = encode_module.plan(full_size, None, int(0.51 * GB), torch.float16, 2, 120, precision)
    assert plan.name == f"resident-{precision}"
    assert abs(plan.estimate / GB - measured) < 0.5, plan.describe()


@pytest.mark.parametrize(
    "budget, encode_plan, denoise_plan, decode_plan",
    [
        (None, "resident", "resident", "full"),  # CPU: no budget
        (24 * GB, "resident", "resident", "full"),
        (8 * GB, "streamed", "resident", "full"),
        (3 * GB, "streamed", "resident", "tiled"),
        (int(1.5 * GB), "streamed", "streamed", "tiled"),
    ],
)
def test_planner_on_full_size_configs(full_size, budget, encode_plan, denoise_plan, decode_plan):
    fp16 = torch.float16
    encode = encode_module.plan(full_size, budget, CONTEXT, fp16, 2, 120)
    assert encode.name == encode_plan
    transformer = memory.meta_model(
        __import__("diffusers").PixArtTransformer2DModel.from_config, full_size.config("transformer"), fp16
    )
    denoise = memory.plan_denoise(
        budget, CONTEXT, memory.parameter_bytes(transformer), 64 * 64, transformer.inner_dim, 2, 1, cfg=True
    )
    assert denoise.name == denoise_plan
    vae_bytes = memory.parameter_bytes(
        memory.meta_model(__import__("diffusers").AutoencoderKL.from_config, full_size.config("vae"), fp16)
    )
    decode = memory.plan_decode(budget, CONTEXT, vae_bytes, 128, 1024, 1024, 2)
    assert decode.name == decode_plan
    for plan in (encode, denoise, decode):
        # 1.5 GB is below streamed T5 (context + embedding + blocks): the smallest plan runs, with a warning.
        expected_fit = not (plan is encode and budget == int(1.5 * GB))
        assert plan.fits is expected_fit, plan.describe()
        assert ("no plan fits" in plan.describe()) is not expected_fit


def test_streamed_t5_takes_as_many_texts_per_call_as_the_budget_allows(full_size):
    fp16 = torch.float16
    small = encode_module.plan(full_size, 2 * GB, CONTEXT, fp16, 33, 120)
    large = encode_module.plan(full_size, 8 * GB, CONTEXT, fp16, 33, 120)
    assert small.name == large.name == "streamed" and small.fits and large.fits
    assert 1 <= small.batch < large.batch == 33  # 8 GB: the 32 prompts and the negative prompt in one call


def test_denoise_batch_grows_with_the_budget():
    small = memory.plan_denoise(4 * GB, CONTEXT, int(1.2 * GB), 4096, 1152, 2, images=16, cfg=True)
    large = memory.plan_denoise(40 * GB, CONTEXT, int(1.2 * GB), 4096, 1152, 2, images=16, cfg=True)
    assert 1 <= small.batch < large.batch == 16


def test_streamed_denoise_takes_as_many_images_per_pass_as_fit():
    """The streamed plan holds two blocks, not the transformer: the rest of the budget takes images (each pass reads
    every block once, whatever the batch)."""
    args = (CONTEXT, int(1.2 * GB), 64 * 64, 1152, 2)
    small = memory.plan_denoise(int(1.5 * GB), *args, images=8, cfg=True, streamed_bytes=int(0.1 * GB))
    large = memory.plan_denoise(int(2.5 * GB), *args, images=8, cfg=True, streamed_bytes=int(0.1 * GB))
    assert small.name == large.name == "streamed" and small.fits and large.fits
    assert small.batch == 1 < large.batch == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_tiled_vae_halves_equal_diffusers_tiling(tiny_model, dtype):
    """The compact decoder and encoder tile as AutoencoderKL.tiled_decode and _tiled_encode do (overlap, blend,
    crop), without AutoencoderKL: bit for bit, on sizes that leave ragged edge tiles."""
    from diffusers import AutoencoderKL

    from pixart_cli.models.vae import load_vae_decoder, load_vae_encoder

    config = Model(str(tiny_model)).config("vae")
    reference = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae", dtype=dtype).eval()
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = 64, 8
    decoder = load_vae_decoder(tiny_model / "vae", config, dtype, torch.device("cpu"))
    encoder = load_vae_encoder(tiny_model / "vae", config, dtype, torch.device("cpu"))
    decoder.tile = encoder.tile = 64
    generator = torch.Generator().manual_seed(SEED)
    latents = torch.randn(2, 4, 25, 17, generator=generator).to(dtype)
    pixels = torch.rand(1, 3, 200, 136, generator=generator).to(dtype) * 2 - 1
    with torch.no_grad():
        assert torch.equal(decoder.decode(latents)[0], reference.decode(latents, return_dict=False)[0])
        ours, theirs = encoder.encode(pixels).latent_dist, reference.encode(pixels).latent_dist
        assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.logvar, theirs.logvar)
        small = latents[:, :, :8, :8]  # not larger than a tile: not tiled, as in diffusers
        assert torch.equal(decoder.decode(small)[0], reference.decode(small, return_dict=False)[0])


def test_block_streamer_equals_the_resident_transformer():
    """Blocks stream through two slots in turn, the next one copied while this one runs; with an odd number of
    blocks the first block of the next call lands in the other slot. Every call equals the resident model's."""
    import copy

    from diffusers import PixArtTransformer2DModel

    from pixart_cli.models.transformer import SLOTS, BlockStreamer

    torch.manual_seed(SEED)
    resident = PixArtTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=3,
        caption_channels=16,
        cross_attention_dim=16,
        sample_size=8,
        norm_num_groups=1,
    ).eval()
    streamed = copy.deepcopy(resident)
    streamer = BlockStreamer(streamed, torch.device("cpu"))
    slots = {slot.untyped_storage().data_ptr() for slot in streamer.slots}
    assert len(slots) == SLOTS
    inputs = dict(
        encoder_hidden_states=torch.randn(2, 5, 16),
        encoder_attention_mask=torch.ones(2, 5),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )
    with torch.inference_mode():
        for call in range(3):
            hidden = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(call))
            timestep = torch.tensor([10 * call + 1] * 2)
            expected = resident(hidden, timestep=timestep, **inputs)[0]
            assert torch.equal(streamed(hidden, timestep=timestep, **inputs)[0], expected), call
    for block in streamed.transformer_blocks:  # every block's weights live in one of the two slots
        assert {p.untyped_storage().data_ptr() for p in block.parameters()} <= slots


def test_block_buffers_share_power_of_two_chunks(monkeypatch):
    """Pinned memory is allocated in powers of two: blocks are packed into chunks of that size, not one buffer that
    the allocator would round up to twice the blocks' size."""
    from pixart_cli.models import transformer

    monkeypatch.setattr(transformer, "CHUNK", 1024)
    buffers = transformer._host_buffers([512, 512, 512, 2048], pin=False)
    assert [b.numel() for b in buffers] == [512, 512, 512, 2048]
    chunks = [(b.untyped_storage().data_ptr(), b.untyped_storage().nbytes()) for b in buffers]
    assert chunks[0] == chunks[1] != chunks[2] != chunks[3]
    assert [size for _, size in chunks] == [1024, 1024, 1024, 2048]


@pytest.fixture
def tiny_budget(monkeypatch):
    """Pretend the CPU is a device with a 1 KB budget, so every stage takes its smallest plan."""
    monkeypatch.setattr(memory, "device_budget", lambda budget, device: (1024, 0))


def test_every_small_plan_matches_the_plain_plan(tiny_model, tiny_budget, monkeypatch):
    logs: list[str] = []
    small_embeddings = encoded(["a cute cat"], tiny_model, log=logs.append)
    small_latents = denoised(small_embeddings, steps=2, seed=SEED, log=logs.append)
    small_images = decoded(small_latents, log=logs.append)
    plans = [line.split(" (")[0] for line in logs if ": plan " in line]
    assert plans == [
        "encode: plan streamed, up to 1 texts per call",
        "denoise: plan streamed, batch 1",
        "decode: plan tiled, tile 128px",
    ]
    monkeypatch.undo()
    embeddings = encoded(["a cute cat"], tiny_model)
    latents = denoised(embeddings, steps=2, seed=SEED)
    for key, value in embeddings.tensors().items():
        assert torch.equal(value, small_embeddings.tensors()[key]), key  # streamed T5 == resident T5
    assert torch.equal(latents.latents, small_latents.latents)  # group-offloaded == resident transformer
    # Tiled decode blends overlapping tiles, so it is not the full decode; it must be diffusers' tiled decode.
    from diffusers import AutoencoderKL
    from diffusers.image_processor import PixArtImageProcessor

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = 128, 16
    with torch.no_grad():
        reference = vae.decode(latents.latents / vae.config.scaling_factor, return_dict=False)[0]
    reference = np.asarray(PixArtImageProcessor(vae_scale_factor=8).postprocess(reference, output_type="pil")[0])
    assert max_diff(np.asarray(small_images[0])[None], reference[None]) <= 1


@pytest.mark.parametrize("resident", [False, True])
def test_streamed_t5_holds_blocks_only_while_they_run(tiny_model, resident):
    from transformers import T5EncoderModel

    from pixart_cli.models.streaming import StreamedT5

    streamed = StreamedT5(tiny_model / "text_encoder", torch.float32, torch.device("cpu"), resident=resident)
    block_devices = {p.device.type for p in streamed.model.encoder.block.parameters()}
    assert block_devices == ({"cpu"} if resident else {"meta"})
    assert streamed.model.shared.weight.device.type == "cpu"
    seen = []
    streamed.model.encoder.block[1].register_forward_pre_hook(
        lambda module, args: seen.append({p.device.type for p in streamed.model.encoder.block.parameters()})
    )
    ids = torch.tensor([[5, 6, 7, 1]])
    with torch.no_grad():
        ours = streamed.model(ids, attention_mask=torch.ones_like(ids))[0]
        reference = T5EncoderModel.from_pretrained(tiny_model / "text_encoder")(ids, torch.ones_like(ids))[0]
    assert torch.equal(ours, reference)
    # When block 1 starts, block 0 is gone again and block 1 is loaded (streamed); everything stays (resident).
    assert seen == ([{"cpu"}] if resident else [{"cpu", "meta"}])
    if not resident:
        assert [p.device.type for p in streamed.model.encoder.block[0].parameters()] == ["meta"] * len(
            list(streamed.model.encoder.block[0].parameters())
        )


def test_report_memory_names_each_stage(tiny_model):
    reports: list = []
    generated(["a cat"], tiny_model, steps=2, seed=SEED, reports=reports)
    assert [r.stage for r in reports] == ["encode", "denoise", "decode"]
    for report in reports:
        row = report.as_dict()
        assert row["peak_rss_gb"] > 0 and row["load_s"] > 0 and row["compute_s"] > 0
        assert row["peak_device_gb"] == 0  # CPU: no device memory


def test_smallest_plans_run_in_a_fresh_process(tiny_model, tmp_path):
    """Tiled decode and the streamed transformer take the heavy library paths (AutoencoderKL, group offloading),
    which lean imports must not break. Other tests have imported those modules already; a fresh process has not."""
    import subprocess
    import sys

    script = f"""
from pixart_cli.models import memory
memory.device_budget = lambda budget, device: (1024, 0)  # every stage its smallest plan, as on a tiny card
from helpers import decoded, denoised, encoded
logs = []
images = decoded(denoised(encoded(["a cute cat"], {str(tiny_model)!r}), steps=2, seed=0, log=logs.append),
                 log=logs.append)
print(len(images), [line.split(" (")[0] for line in logs if ": plan " in line])
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
        },
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "1 ['denoise: plan streamed, batch 1', 'decode: plan tiled, tile 128px']"
