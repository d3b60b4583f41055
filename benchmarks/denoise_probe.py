"""GPU probe: seconds per image of pixart's denoising loop under attention backends, dtypes and step caches.

    python benchmarks/denoise_probe.py [--batch 8] [--steps 20] CASE...

Builds the full-size PixArt-XL-2-1024-MS transformer with random weights on the GPU (time does not depend on
weight values; a *dynamic* step cache's skip rate does, so its figures here say nothing about real weights), and
runs sampling.sample_latents, the loop `pixart denoise` runs, on random embeddings at 1024², cfg 4.5. Prints one
JSON line per case: seconds per image (best of two runs after a warm-up), and the largest latent difference from
the exact fp16 run with the default backend.

Cases: default, cudnn, flash, efficient, bf16, bf16-cudnn, fbc-<threshold>, taylorseer-<interval> (--step-cache),
compile (torch.compile, as --compile; steady state after a warm-up that compiles), attention (attention alone,
TFLOP/s per backend).
"""

from __future__ import annotations

import argparse
import json
import time


def build(dtype, cached: bool = False):
    import torch
    from diffusers import DPMSolverMultistepScheduler

    from pixart_cli import random_model
    from pixart_cli.models import step_caching

    torch.manual_seed(0)
    with torch.device("cuda"):
        transformer = step_caching.transformer_class(cached)(**random_model.transformer_kwargs()).to(dtype)
    transformer.eval()
    scheduler = DPMSolverMultistepScheduler()
    return transformer, scheduler


def embeddings(batch: int, dtype):
    import torch

    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(batch, 300, 4096, generator=generator).to("cuda", dtype) * 0.1
    negative = torch.randn(batch, 300, 4096, generator=generator).to("cuda", dtype) * 0.1
    mask = torch.ones(batch, 300, dtype=torch.long, device="cuda")
    mask[:, 40:] = 0  # real prompts are short: most of the 300 tokens are padding
    return dict(
        prompt_embeds=prompt,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=mask.clone(),
    )


def run_loop(transformer, scheduler, batch: int, steps: int, dtype, backends=None):
    import torch

    from pixart_cli.models.sampling import sample_latents

    tensors = embeddings(batch, dtype)

    def once():
        generators = [torch.Generator().manual_seed(i) for i in range(batch)]
        with torch.inference_mode():
            return sample_latents(
                transformer,
                scheduler,
                "PixArtAlphaPipeline",
                **tensors,
                num_inference_steps=steps,
                timesteps=None,
                guidance_scale=4.5,
                height=1024,
                width=1024,
                vae_scale_factor=8,
                generator=generators,
                device=torch.device("cuda"),
            )

    def timed():
        torch.cuda.synchronize()
        start = time.perf_counter()
        if backends is None:
            out = once()
        else:
            from torch.nn.attention import sdpa_kernel

            with sdpa_kernel(backends, set_priority=True):
                out = once()
        torch.cuda.synchronize()
        return time.perf_counter() - start, out

    timed()  # warm-up (kernels, cuDNN plans)
    best, out = min((timed() for _ in range(2)), key=lambda r: r[0])
    return best / batch, out.float().cpu()


def attention_rates(batch: int):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(2 * batch, 16, 4096, 72, device="cuda", dtype=torch.float16) for _ in range(3))
    flops = 4 * (2 * batch) * 16 * 4096 * 4096 * 72
    rates = {}
    for name in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel([getattr(SDPBackend, name)]):
                F.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
                start = time.perf_counter()
                for _ in range(10):
                    F.scaled_dot_product_attention(q, k, v)
                torch.cuda.synchronize()
            rates[name] = round(flops * 10 / (time.perf_counter() - start) / 1e12, 1)
        except RuntimeError as error:
            rates[name] = f"unavailable: {str(error)[:120]}"
    return rates


def main() -> None:
    import torch
    from torch.nn.attention import SDPBackend

    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("cases", nargs="+")
    args = parser.parse_args()
    order = {
        "cudnn": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "flash": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION],
        "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    }
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
    models = {}
    exact = None
    for case in args.cases:
        if case == "attention":
            print(json.dumps({"case": case, "tflops": attention_rates(args.batch)}), flush=True)
            continue
        dtype = torch.bfloat16 if case.startswith("bf16") else torch.float16
        if dtype not in models or case.startswith(
            ("fbc-", "taylorseer-")
        ):  # a cache's hooks stay on the model: a fresh one
            models.clear()
            torch.cuda.empty_cache()
            models[dtype] = build(dtype, cached=case.startswith(("fbc-", "taylorseer-")))
        transformer, scheduler = models[dtype]
        backends = order.get(case.removeprefix("bf16-"))
        record = {"case": case}
        if case.startswith(("fbc-", "taylorseer-")):
            from pixart_cli.models import step_caching

            step_caching.enable(transformer, step_caching.check(case.replace("-", ":", 1)))
            per_image, out = run_loop(transformer, scheduler, args.batch, args.steps, dtype)
            models.clear()
        elif case == "compile":
            # torch.compile as `pixart denoise --compile` applies it; the warm-up run pays the compilation
            transformer.compile()
            started = time.perf_counter()
            per_image, out = run_loop(transformer, scheduler, args.batch, args.steps, dtype)
            record["warm_up_and_timed_s"] = round(time.perf_counter() - started, 1)
            models.clear()
        else:
            torch.cuda.reset_peak_memory_stats()
            per_image, out = run_loop(transformer, scheduler, args.batch, args.steps, dtype, backends)
            record["peak_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["s_per_image"] = round(per_image, 4)
        if case == "default":
            exact = out
        elif exact is not None:
            record["max_latent_diff_vs_default"] = float((out - exact).abs().max())
            record["mean_latent_diff_vs_default"] = float((out - exact).abs().mean())
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
