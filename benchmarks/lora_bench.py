"""LoRA: fused into the weights at load (pixart_cli.models.lora) vs applied through peft's unfused adapters.

Measures, on random weights (time does not depend on values), the load-time cost of each way (reading the same
file included) and the time of one CFG denoising step (one transformer forward with batch 2). On CPU it counts the
process's CPU time on one thread, so that other work on a shared machine barely moves the numbers. Needs peft, which pixart does not depend on:
``pip install peft``. CPU by default; ``--device cuda`` works too.

    python benchmarks/lora_bench.py --size tiny mid --rank 16 --repeat 5
"""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import time

import torch

# Transformer configs: the test suite's tiny one, and a mid-size slice of PixArt-XL (hidden 1152, 4 of its 28 blocks,
# 256 px so that a CPU run stays short).
SIZES = {
    "tiny": dict(
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        caption_channels=32,
        cross_attention_dim=16,
        sample_size=32,
        norm_num_groups=1,
    ),
    "mid": dict(
        num_attention_heads=16,
        attention_head_dim=72,
        num_layers=4,
        caption_channels=4096,
        cross_attention_dim=1152,
        sample_size=16,
    ),
}
# Typical PixArt LoRA targets: attention and MLP of each block (a subset of PixArt-Σ's LoRA script's targets).
TARGETS = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)


def build(size: str, device: str):
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        return PixArtTransformer2DModel(in_channels=4, out_channels=8, patch_size=2, **SIZES[size]).eval()


def lora_state(transformer, rank: int) -> dict:
    """diffusers-named LoRA tensors for every targeted layer."""
    state = {}
    for name, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(TARGETS) and name.startswith("transformer_blocks"):
            state[f"{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.01
            state[f"{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.01
    return state


def step_inputs(transformer, device):
    config = transformer.config
    side = config.sample_size
    return dict(
        hidden_states=torch.randn(2, 4, side, side, device=device),
        encoder_hidden_states=torch.randn(2, 120, config.caption_channels, device=device),
        timestep=torch.tensor([500, 500], device=device),
        added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        return_dict=False,
    )


def time_steps(models: dict, inputs, repeat: int, device: str) -> tuple[dict, dict]:
    """Fastest of ``repeat`` forwards per model (after one warm-up), the models interleaved so that other work on
    the machine disturbs them alike; on CPU, process CPU time (single thread), which contention barely moves."""
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    times = {name: [] for name in models}
    outputs = {}
    with torch.inference_mode():
        for name, model in models.items():
            outputs[name] = model(**inputs)[0]
        for _ in range(repeat):
            for name, model in models.items():
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                started = clock()
                outputs[name] = model(**inputs)[0]
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                times[name].append(clock() - started)
    return {name: min(values) for name, values in times.items()}, outputs


def peft_import_seconds() -> float:
    """`import peft` in a fresh process that has already imported torch and diffusers (its own cost only)."""
    code = "import time, torch, diffusers.models; t = time.perf_counter(); import peft; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def run(size: str, rank: int, repeat: int, device: str) -> dict:
    import pathlib
    import tempfile

    from safetensors.torch import load_file, save_file

    from pixart_cli.files import lora_file
    from pixart_cli.models import lora

    base = build(size, device)
    state = lora_state(base, rank)
    inputs = step_inputs(base, device)
    clock = time.perf_counter if device.startswith("cuda") else time.process_time
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "lora.safetensors"
        save_file({f"transformer.{k}": v.contiguous() for k, v in state.items()}, str(path))

        # 1. Fused: read the file as pixart does (sha256 included), check it, W += scale * alpha/rank * B @ A once.
        fused_model = copy.deepcopy(base)
        started = clock()
        weights = lora_file.read_lora(lora_file.LoraSpec(path, 1.0))
        lora.check_lora(weights, fused_model)
        lora.apply_loras(fused_model, [weights])
        fused_load = clock() - started

        # 2. peft: read the same file, inject unfused LoRA layers and load the tensors (what users do by hand today).
        from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

        peft_model = copy.deepcopy(base)
        started = clock()
        loaded = {k.removeprefix("transformer."): v for k, v in load_file(str(path)).items()}
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(TARGETS)), peft_model)
        set_peft_model_state_dict(peft_model, loaded)
        peft_model.to(device)
        peft_load = clock() - started

    steps, outputs = time_steps({"plain": base, "fused": fused_model, "peft": peft_model}, inputs, repeat, device)
    extra_params = sum(p.numel() * p.element_size() for n, p in peft_model.named_parameters() if "lora_" in n)
    return {
        "size": size,
        "rank": rank,
        "device": device,
        "layers": len(state) // 2,
        "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 1),
        "step_plain_s": steps["plain"],
        "step_fused_s": steps["fused"],
        "step_peft_s": steps["peft"],
        "load_fused_s": fused_load,
        "load_peft_s": peft_load,
        "peft_resident_mb": extra_params / 2**20,
        "max_diff_fused_vs_peft": float((outputs["fused"] - outputs["peft"]).abs().max()),
        "lora_effect": float((outputs["fused"] - outputs["plain"]).abs().max()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", nargs="+", choices=tuple(SIZES), default=["tiny", "mid"])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(1)  # CPU time of one thread: comparable on a machine shared with other work
    print(f"import peft (after torch + diffusers): {peft_import_seconds():.2f} s")
    print(
        "| size | params M | LoRA layers | step plain s | step fused s | step peft s | load fused s | load peft s "
        "| peft resident MB | max diff fused vs peft |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for size in args.size:
        r = run(size, args.rank, args.repeat, args.device)
        print(
            f"| {r['size']} | {r['params_m']} | {r['layers']} | {r['step_plain_s']:.4f} | {r['step_fused_s']:.4f} "
            f"| {r['step_peft_s']:.4f} | {r['load_fused_s']:.3f} | {r['load_peft_s']:.3f} "
            f"| {r['peft_resident_mb']:.1f} | {r['max_diff_fused_vs_peft']:.2e} (effect {r['lora_effect']:.2e}) |",
            flush=True,
        )


if __name__ == "__main__":
    main()
