"""Process-wide state, set only at a process's edge (``cli.edge`` for the `pixart` command, the Ray actor on a
worker): the libraries' warning filters and environment, the lean-import switches, gc freezing, and the tag of the
temp files a Ray actor writes."""

from __future__ import annotations

import gc
import logging
import os
import warnings


def debugging() -> bool:
    """PIXART_DEBUG=1: tracebacks, and the libraries' own warnings and progress bars left on."""
    return os.environ.get("PIXART_DEBUG") == "1"


def quiet_libraries() -> None:
    """Silence diffusers', transformers' and the hub's progress bars and advisory warnings (we show our own), and
    their error logs too: each failure reaches the edge as an exception and becomes our one line there (diffusers
    logs "An error occurred while trying to fetch ..." before it falls back from safetensors to a .bin). torch's C++
    warnings (the process group's connection retries) likewise. With PIXART_DEBUG=1 all of it shows."""
    if debugging():
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "critical")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "critical")
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "FATAL")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Only the libraries' own advisory warnings; a warning from our code or the user's still shows.
    for module in ("diffusers", "transformers", "torch", "huggingface_hub", "accelerate", "bitsandbytes", "ray"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=UserWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
    logging.getLogger("torch").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # retry chatter; our own line says it all


def tag_temp_files(tag: str) -> None:
    """This process's temp files carry the run's ``tag`` (a Ray actor's), so that the run's driver can remove what
    the process left half-written if it is killed (``files.atomic.remove_temps``)."""
    from pixart_cli.files import atomic

    atomic.tag_temps(tag)


def compile_cache() -> None:
    """Keep torch.compile's caches (Inductor's compiled graphs and autotuning results, Triton's kernels) under the
    user's cache folder, ``$XDG_CACHE_HOME/pixart/compile`` (``~/.cache``), not /tmp: a later process with
    --compile and the same model config, shapes, dtype, torch version and GPU (Inductor's own cache keys) loads
    them instead of compiling again. A TORCHINDUCTOR_CACHE_DIR already set wins. Nothing is imported here."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(base, "pixart", "compile"))


def lean_imports(quantized: bool = False) -> None:
    """Keep bitsandbytes (unless a stage quantizes) and peft out of this process: see facade.keep_out.
    Call before importing diffusers or transformers."""
    from pixart_cli.models.facade import keep_out

    keep_out(quantized=quantized)


def settle() -> None:
    """Freeze what survives a stage's collection: the process's lasting state (imported modules, settings) is
    then never scanned again, so the next stage's collection looks only at what that stage made. A full
    collection over torch's and diffusers' objects took 0.19 s each time (3 times in a CPU `generate` of the tiny
    model). Called once torch is imported (the run context is resolved) and after each stage (``RunContext.free``)."""
    gc.freeze()
