"""diffusers baselines, one per process, on the same random full-size model as pixart.

Usage: python benchmarks/baselines.py MODEL_DIR CASE OUT_JSON
CASE: all-gpu | model-cpu-offload | group-offload | staged-8bit | loop-32
Each prints/writes: wall seconds of load and of generation, torch peaks per phase. The caller (bench.py)
adds the whole-process wall time and the nvidia-smi peak.
"""

from __future__ import annotations

import json
import sys
import time

PROMPT = "a small house by a lake with mountains behind it, watercolor"
SETTINGS = {"num_inference_steps": 20, "guidance_scale": 4.5, "height": 1024, "width": 1024}


def _peak_gb() -> float:
    import torch

    free, total = torch.cuda.mem_get_info()
    context = total - free - torch.cuda.memory_reserved()
    return round((torch.cuda.max_memory_reserved() + context) / 2**30, 3)


def main(model: str, case: str, out: str) -> None:
    started = time.perf_counter()
    import torch
    from diffusers import PixArtAlphaPipeline

    result: dict = {"case": case, "device": torch.cuda.get_device_name()}
    generator = lambda: torch.Generator("cpu").manual_seed(0)  # noqa: E731
    t0 = time.perf_counter()
    result["import_s"] = round(t0 - started, 2)

    if case == "loop-32":
        # What a user of diffusers writes for a list of prompts: the pipeline on the GPU, one call and one PNG each.
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
        from bench import many_prompts

        pipe = PixArtAlphaPipeline.from_pretrained(model, torch_dtype=torch.float16).to("cuda")
        pipe.set_progress_bar_config(disable=True)
        result["load_s"] = round(time.perf_counter() - t0, 2)
        folder = __import__("pathlib").Path(out).parent / "diffusers-32"
        folder.mkdir(exist_ok=True)
        t1 = time.perf_counter()
        for index, prompt in enumerate(many_prompts(32)):
            image = pipe(prompt, generator=torch.Generator("cpu").manual_seed(index), **SETTINGS).images[0]
            image.save(folder / f"image-{index}.png")
        torch.cuda.synchronize()
        result["generation_s"] = round(time.perf_counter() - t1, 2)
        result["peak_gb"] = _peak_gb()
    elif case == "staged-8bit":
        # The recipe from diffusers' PixArt docs: 8-bit T5 alone, then the pipeline without it, then the VAE.
        from transformers import BitsAndBytesConfig, T5EncoderModel

        text_encoder = T5EncoderModel.from_pretrained(
            model,
            subfolder="text_encoder",
            quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            device_map="auto",
        )
        pipe = PixArtAlphaPipeline.from_pretrained(
            model, text_encoder=text_encoder, transformer=None, device_map="balanced"
        )
        result["encode_load_s"] = round(time.perf_counter() - t0, 2)
        with torch.no_grad():
            embeds = pipe.encode_prompt(PROMPT)
        result["encode_peak_gb"] = _peak_gb()
        del text_encoder, pipe
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pipe = PixArtAlphaPipeline.from_pretrained(model, text_encoder=None, torch_dtype=torch.float16).to("cuda")
        latents = pipe(
            negative_prompt=None,
            prompt_embeds=embeds[0],
            prompt_attention_mask=embeds[1],
            negative_prompt_embeds=embeds[2],
            negative_prompt_attention_mask=embeds[3],
            output_type="latent",
            generator=generator(),
            **SETTINGS,
        ).images
        result["denoise_peak_gb"] = _peak_gb()
        del pipe.transformer
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
        torch.cuda.synchronize()
        result["decode_peak_gb"] = _peak_gb()
        result["total_s"] = round(time.perf_counter() - t0, 2)
    else:
        pipe = PixArtAlphaPipeline.from_pretrained(model, torch_dtype=torch.float16)
        if case == "all-gpu":
            pipe.to("cuda")
        elif case == "model-cpu-offload":
            pipe.enable_model_cpu_offload()
        elif case == "group-offload":
            for component in (pipe.text_encoder, pipe.transformer, pipe.vae):
                from diffusers.hooks import apply_group_offloading

                apply_group_offloading(
                    component, onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True
                )
        else:
            raise SystemExit(f"unknown case {case}")
        pipe.set_progress_bar_config(disable=True)
        torch.cuda.synchronize()
        result["load_s"] = round(time.perf_counter() - t0, 2)
        t1 = time.perf_counter()
        first = pipe(PROMPT, generator=generator(), **SETTINGS).images[0]
        torch.cuda.synchronize()
        if case == "all-gpu":  # the parity reference for pixart generate --seed 0 (bench.py)
            first.save(__import__("pathlib").Path(out).parent / "diffusers-all-gpu.png")
        result["first_generation_s"] = round(time.perf_counter() - t1, 2)
        t2 = time.perf_counter()
        pipe(PROMPT, generator=generator(), **SETTINGS)
        torch.cuda.synchronize()
        result["warm_generation_s"] = round(time.perf_counter() - t2, 2)
        result["load_plus_first_s"] = round(t2 - t0, 2)
        result["peak_gb"] = _peak_gb()
    with open(out, "w") as handle:
        json.dump(result, handle, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:4])
