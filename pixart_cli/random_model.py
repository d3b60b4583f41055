"""Build a random-weight PixArt-α model folder in the diffusers layout.

No weights can be downloaded where this project is built, so the tests, `make demo` and the GPU
benchmark all run on models made here:

* ``tiny``: a few MB, built on the CPU in about a second. Its tokenizer is a sentencepiece model
  trained on the spot and saved the way the real checkpoint ships it (``spiece.model``, no
  ``tokenizer.json``).
* ``full``: the PixArt-XL-2-1024-MS architecture at full size (T5-v1.1-XXL, 28-layer DiT, SD VAE),
  for memory and speed measurements. Memory and time do not depend on weight values.

Usage: ``python -m pixart_cli.random_model OUT_DIR [--size tiny|full] [--sample-size N]``; with
``--controlnet-for MODEL_DIR``, OUT is instead a random ControlNet adapter (``.safetensors``, diffusers layout) that
fits that model, for trying ``--controlnet`` offline. Images made with these weights are noise.
"""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

from pixart_cli.models.facade import plain

# Tokens that the tiny tokenizer learns from; the words of the test prompts, so they are not all <unk>.
_CORPUS = """
a cute cat sitting on a red chair in the sun, photo, high detail
an astronaut riding a horse on the moon, oil painting
a bowl of fruit: apples, pears and grapes on a wooden table
dogs and cats playing in the snow at night under the stars
a small house by the lake with mountains behind it, watercolor
visit our shop at www example com for more pictures of cute animals
""".strip().splitlines()


# PixArt-XL-2-1024-MS's scheduler: DPM-Solver++ 2M on linear betas, epsilon prediction.
_SCHEDULER = dict(
    beta_start=0.0001, beta_end=0.02, beta_schedule="linear", prediction_type="epsilon", num_train_timesteps=1000
)


def train_tiny_tokenizer(folder: Path, vocab_size: int = 96) -> int:
    """Train a T5-style sentencepiece tokenizer into ``folder`` (spiece.model only); return its vocab size."""
    import sentencepiece as spm

    T5Tokenizer = plain("transformers").T5Tokenizer

    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    # T5's special ids: pad 0, eos 1, unk 2, no bos.
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    (folder / "spiece.model").write_bytes(model.getvalue())
    # The real checkpoint ships only the slow tokenizer's files (no tokenizer.json); keep that layout so that
    # loading it is what the tests exercise.
    config = {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<pad>",
        "extra_ids": 0,
        "legacy": True,
        "model_max_length": 512,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=1) + "\n")
    tokenizer = T5Tokenizer.from_pretrained(folder)
    return len(tokenizer)


def _copy_tokenizer(source: Path, folder: Path) -> int:
    import shutil

    T5Tokenizer = plain("transformers").T5Tokenizer

    shutil.copytree(source, folder, dirs_exist_ok=True)
    return len(T5Tokenizer.from_pretrained(folder))


def _build_modules(t5_config, dit: dict, vae: dict, device: str, scale_t5: bool):
    """Instantiate the three networks with random weights in the current default dtype."""
    import torch

    AutoencoderKL, PixArtTransformer2DModel = (
        plain("diffusers").AutoencoderKL,
        plain("diffusers").PixArtTransformer2DModel,
    )
    T5EncoderModel = plain("transformers").T5EncoderModel

    with torch.device(device):
        text_encoder = T5EncoderModel(t5_config)
        if scale_t5:
            # Random T5 weights overflow fp16 activations; scaled down they stay finite.
            with torch.no_grad():
                for module in text_encoder.modules():
                    if isinstance(module, torch.nn.Linear):
                        module.weight.mul_(0.05)
        transformer = PixArtTransformer2DModel(**transformer_kwargs(dit))
        autoencoder = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            **{"scaling_factor": 0.18215, **vae},
        )
    return text_encoder, transformer, autoencoder


def transformer_kwargs(dit: dict | None = None) -> dict:
    """PixArtTransformer2DModel's arguments: ``dit`` (of ``_configs``; default: the full-size architecture)
    with the SD VAE's 4 latent channels (8 out: learned sigma) and patch size 2."""
    if dit is None:
        dit = _configs("full", 32128, None)[1]
    return {"in_channels": 4, "out_channels": 8, "patch_size": 2, **dit}


def _configs(size: str, vocab: int, sample_size: int | None):
    """(T5Config, transformer kwargs, VAE kwargs, torch dtype) of the tiny or the full-size architecture."""
    import torch

    T5Config = plain("transformers").T5Config

    if size == "tiny":
        dtype = torch.float32
        t5 = T5Config(
            vocab_size=vocab,
            d_model=32,
            d_ff=64,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            tie_word_embeddings=False,
        )
        dit = dict(
            num_attention_heads=2,
            attention_head_dim=8,
            num_layers=2,
            caption_channels=32,
            cross_attention_dim=16,
            sample_size=32 if sample_size is None else sample_size,
            norm_num_groups=1,
        )
        vae = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
    elif size == "full":
        dtype = torch.float16
        t5 = T5Config(
            vocab_size=32128,
            d_model=4096,
            d_ff=10240,
            d_kv=64,
            num_layers=24,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            is_encoder_decoder=False,
            tie_word_embeddings=False,
        )
        dit = dict(
            num_attention_heads=16,
            attention_head_dim=72,
            num_layers=28,
            caption_channels=4096,
            cross_attention_dim=1152,
            sample_size=128 if sample_size is None else sample_size,
        )
        vae = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=512)
    else:
        raise ValueError(f"size must be 'tiny' or 'full', not {size!r}")

    return t5, dit, vae, dtype


def write_full_size_configs(out: Path) -> Path:
    """PixArt-XL-2-1024-MS's folder layout with configs only, no weights: enough to plan memory exactly."""
    DPMSolverMultistepScheduler = plain("diffusers").DPMSolverMultistepScheduler

    out = Path(out)
    t5, dit, vae, _ = _configs("full", 32128, None)
    text_encoder, transformer, autoencoder = _build_modules(t5, dit, vae, "meta", scale_t5=False)
    text_encoder.config.save_pretrained(out / "text_encoder")
    transformer.save_config(out / "transformer")
    autoencoder.save_config(out / "vae")
    DPMSolverMultistepScheduler(**_SCHEDULER).save_config(out / "scheduler")
    train_tiny_tokenizer(out / "tokenizer")  # every component folder is there, as in the real checkpoint
    index = {
        "_class_name": "PixArtAlphaPipeline",
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5Tokenizer"],
        "transformer": ["diffusers", "PixArtTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return out


FAMILIES = ("alpha", "sigma", "lcm", "dmd")


def build(
    out: Path,
    size: str = "tiny",
    sample_size: int | None = None,
    tokenizer_dir: Path | None = None,
    device: str = "cpu",
    seed: int = 0,
    family: str = "alpha",
    dtype: str | None = None,
) -> Path:
    """Write a random PixArt pipeline folder of one family to ``out`` and return it.

    sigma: PixArtSigmaPipeline, no micro-conditions, SDXL-VAE scaling. lcm: LCMScheduler. dmd: DDPMScheduler and,
    like the published DMD checkpoint, no tokenizer, T5 or VAE (they come from a base model). ``dtype`` "fp32" or
    "fp16" (default: fp32 tiny, fp16 full); a full-size fp32 build is stored as the published checkpoint is (every
    component in fp32, T5 in shards of up to 10 GB).
    """
    import torch

    diffusers = plain("diffusers")
    DPMSolverMultistepScheduler, PixArtAlphaPipeline = (
        diffusers.DPMSolverMultistepScheduler,
        diffusers.PixArtAlphaPipeline,
    )

    out = Path(out)
    torch.manual_seed(seed)
    if tokenizer_dir is not None:
        vocab = _copy_tokenizer(Path(tokenizer_dir), out / "tokenizer")
    else:
        vocab = train_tiny_tokenizer(out / "tokenizer")

    t5, dit, vae, default_dtype = _configs(size, vocab, sample_size)
    dtype = default_dtype if dtype is None else {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if family == "sigma":
        dit.update(use_additional_conditions=False, interpolation_scale=2 if dit["sample_size"] >= 128 else 1)
        vae["scaling_factor"] = 0.13025
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: a full-size fp32 T5 would need 19 GB first
    try:
        text_encoder, transformer, autoencoder = _build_modules(t5, dit, vae, device, scale_t5=size == "full")
    finally:
        torch.set_default_dtype(previous_dtype)
    diffusers = plain("diffusers")

    scheduler_class = {"lcm": diffusers.LCMScheduler, "dmd": diffusers.DDPMScheduler}.get(
        family, DPMSolverMultistepScheduler
    )
    scheduler = scheduler_class(**_SCHEDULER)
    pipeline_class = diffusers.PixArtSigmaPipeline if family == "sigma" else PixArtAlphaPipeline
    if family == "dmd":  # the published DMD repo has only its transformer and scheduler
        import shutil

        shutil.rmtree(out / "tokenizer")
        text_encoder = autoencoder = None
    # The tokenizer folder is already in place; the pipeline saves the other four next to it.
    pipe = pipeline_class(
        tokenizer=None, text_encoder=text_encoder, vae=autoencoder, transformer=transformer, scheduler=scheduler
    )
    # Shards like the real checkpoint's, so per-shard loading paths are exercised.
    shard = "100MB" if size == "tiny" else ("10GB" if dtype == torch.float32 else "5GB")
    pipe.save_pretrained(out, max_shard_size=shard)
    index_path = out / "model_index.json"
    index = json.loads(index_path.read_text())
    if family != "dmd":
        index["tokenizer"] = ["transformers", "T5Tokenizer"]
    index_path.write_text(json.dumps(index, indent=2) + "\n")
    info = {
        "random_weights": True,
        "size": size,
        "family": family,
        "note": "built by pixart_cli.random_model; images are noise",
    }
    (out / "RANDOM_WEIGHTS.json").write_text(json.dumps(info, indent=1) + "\n")
    return out


def build_controlnet(model: Path, out: Path, num_blocks: int | None = None, seed: int = 1) -> Path:
    """Write a random PixArt-α ControlNet adapter for the model folder ``model`` to ``out`` (a ``.safetensors``
    file in the diffusers layout, which ``--controlnet`` reads) and return it: the published initialisation
    (copies of the transformer's first ``num_blocks`` blocks, default 13 or one fewer than it has, and zero
    projections, which change nothing), then every weight moved at random so that it steers the image."""
    import torch
    from safetensors.torch import save_file

    from pixart_cli.models import controlnet

    out = Path(out)
    if out.suffix != ".safetensors":
        raise SystemExit(f"--controlnet-for: name the adapter file *.safetensors, not {out.name}")
    transformer = plain("diffusers").PixArtTransformer2DModel.from_pretrained(Path(model), subfolder="transformer")
    adapter = controlnet.adapter_from_transformer(transformer, num_blocks)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in adapter.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in adapter.state_dict().items()}, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pixart_cli.random_model", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--sample-size", type=int, default=None, help="transformer sample_size (latent side)")
    parser.add_argument("--tokenizer", type=Path, default=None, help="copy this T5 tokenizer folder instead")
    parser.add_argument("--device", default="cpu", help="where to build the weights (full size: cuda is fast)")
    parser.add_argument("--family", choices=FAMILIES, default="alpha")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default=None, help="default: fp32 tiny, fp16 full")
    parser.add_argument(
        "--controlnet-for",
        type=Path,
        default=None,
        metavar="MODEL_DIR",
        help="write OUT, a random ControlNet adapter (.safetensors) for this model folder, instead of a model",
    )
    parser.add_argument("--controlnet-blocks", type=int, default=None, help="its blocks (default 13, or fewer)")
    args = parser.parse_args(argv)
    from pixart_cli import process

    # the libraries' noise (bitsandbytes' kernel probe, save progress bars, "cannot be saved" for the absent
    # components of a dmd model) stays off the terminal unless PIXART_DEBUG=1
    process.quiet_libraries()
    if not process.debugging():
        process.lean_imports()
    if args.controlnet_for is not None:
        print(build_controlnet(args.controlnet_for, args.out, args.controlnet_blocks))
        return
    print(
        build(args.out, args.size, args.sample_size, args.tokenizer, args.device, family=args.family, dtype=args.dtype)
    )


if __name__ == "__main__":
    main()
