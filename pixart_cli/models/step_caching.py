"""Opt-in step caching (approximate), with diffusers' own caches: ``--step-cache METHOD:VALUE``.

- ``fbc:THRESHOLD``: First Block Cache (ParaAttention; diffusers.hooks.first_block_cache). The first transformer
  block runs at every step; when its residual changed less than THRESHOLD (relative) since the last full step,
  the other blocks are skipped and their cached residual is added instead. How many steps it skips depends on
  the weights, so its speed-up cannot be measured on random weights (none is skipped there).
- ``taylorseer:INTERVAL``: TaylorSeer (arXiv 2503.06923; diffusers.hooks.taylorseer_cache), lite variant: after
  3 full steps, the transformer runs in full every INTERVAL-th step only; in between its output is forecast from
  the last full steps (first-order Taylor series) and the blocks are skipped. Its speed-up is fixed by the
  schedule, whatever the weights.

Both change the output, so neither is the default, and a file made with one records it (``step_cache``).
diffusers hooks its caches onto models that carry its CacheMixin; PixArt's transformer class does not, so the
class is extended with it here (``cache_context``, ``is_cache_enabled``). The hooks go on as
``CacheMixin.enable_cache`` puts them on (its ``apply_*`` call, then the registry's cache invalidated), without its
``from diffusers.hooks import ...``, which imports every hook module (group offloading, context parallelism), and
without torch._dynamo, which the hooks' ``@torch.compiler.disable`` marks import (facade.import_eager) unless the
run compiles. tests/test_families.py checks the result against ``enable_cache``.
"""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

from pixart_cli.errors import PixartError

METHODS = {
    "fbc": "a threshold above 0 and at most 1, e.g. fbc:0.1",
    "taylorseer": "a whole number of steps from 2 to 1000, e.g. taylorseer:2",
}
# Plain ASCII numbers only: int() and float() also take "1_0", "+3", " 3" and other scripts' digits.
NUMBER = {
    "fbc": re.compile(r"\d+(\.\d*)?|\.\d+|\d+(\.\d*)?[eE]-?\d+", re.ASCII),
    "taylorseer": re.compile(r"\d+", re.ASCII),
}
MAX_FBC_THRESHOLD = 1.0  # a relative change; at 1 a step would be skipped even when the residual doubled
TAYLORSEER_FULL_STEPS_FIRST = 3  # diffusers' default: the forecast needs a few full steps to start from


def check(text: str) -> str:
    """``--step-cache`` as given -> its canonical form (``fbc:0.1``, ``taylorseer:2``); one line if it is not."""
    method, _, value = text.strip().partition(":")
    method = method.lower()
    if method not in METHODS:
        raise PixartError(
            f"--step-cache {text!r}: unknown method; use fbc:THRESHOLD (e.g. fbc:0.1) or taylorseer:INTERVAL "
            "(e.g. taylorseer:2)"
        )
    number = None
    if NUMBER[method].fullmatch(value):
        number = float(value) if method == "fbc" else int(value)
    if method == "fbc" and number is not None and math.isfinite(number) and 0 < number <= MAX_FBC_THRESHOLD:
        return f"fbc:{number:g}"
    if method == "taylorseer" and number is not None and 2 <= number <= 1000:
        return f"taylorseer:{number}"
    raise PixartError(f"--step-cache {text!r}: {method} takes {METHODS[method]}")


def runs_anything(step_cache: str, steps: int) -> bool:
    """Whether the cache can skip any of ``steps`` steps: TaylorSeer runs its first steps in full, and the step
    after them too (it forecasts from the full steps before)."""
    return not step_cache.startswith("taylorseer:") or steps > TAYLORSEER_FULL_STEPS_FIRST + 1


def acting(step_cache: str | None, steps: int, streamed: bool = False) -> tuple[str | None, str | None]:
    """(the step cache a run uses and records, a note for the user): the one asked for, unless it cannot act
    here (under the streamed plan, or when all ``steps`` would run in full anyway)."""
    if step_cache is None:
        return None, None
    if streamed:
        return None, f"--step-cache {step_cache}: ignored under the streamed plan (its blocks move between devices)"
    if not runs_anything(step_cache, steps):
        return None, f"--step-cache {step_cache}: ignored, {steps} steps are all run in full by it"
    return step_cache, f"step cache: {step_cache} (approximate: images differ from the exact run's)"


def transformer_class(cached: bool):
    """PixArtTransformer2DModel, or the same class with diffusers' CacheMixin when a step cache is asked for."""
    from pixart_cli.models.facade import import_diffusers

    PixArtTransformer2DModel = import_diffusers(
        "diffusers.models.transformers.pixart_transformer_2d"
    ).PixArtTransformer2DModel
    if not cached:
        return PixArtTransformer2DModel
    CacheMixin = import_diffusers("diffusers.models.cache_utils").CacheMixin
    return type("PixArtTransformer2DModelWithCache", (PixArtTransformer2DModel, CacheMixin), {})


def enable(transformer, step_cache: str, compiled: bool = False) -> None:
    """Hook the cache ``step_cache`` (as ``check`` returns it) onto a transformer built by
    ``transformer_class(True)``, as ``CacheMixin.enable_cache`` does. ``compiled``: the run compiles the
    transformer, so the hooks' compiler marks must be the real ones."""
    from pixart_cli.models import facade

    load = facade.import_diffusers if compiled else facade.import_eager
    method, _, value = step_cache.partition(":")
    if method == "fbc":
        hooks = load("diffusers.hooks.first_block_cache")
        # PixArt's blocks are diffusers' BasicTransformerBlock, registered as diffusers registers it
        block = facade.import_diffusers("diffusers.models.attention").BasicTransformerBlock
        facade.register_block(block, return_hidden_states_index=0, return_encoder_hidden_states_index=None)
        config = hooks.FirstBlockCacheConfig(threshold=float(value))
        hooks.apply_first_block_cache(transformer, config)
    else:
        hooks = load("diffusers.hooks.taylorseer_cache")
        config = hooks.TaylorSeerCacheConfig(
            cache_interval=int(value),
            disable_cache_before_step=TAYLORSEER_FULL_STEPS_FIRST,
            use_lite_mode=True,
            taylor_factors_dtype=transformer.dtype,
        )
        hooks.apply_taylorseer_cache(transformer, config)
    registry = load("diffusers.hooks.hooks").HookRegistry
    registry.check_if_exists_or_initialize(transformer).invalidate_child_registries_cache()
    transformer._cache_config = config


def step_context(transformer):
    """Around each transformer call: the cache's state for this denoising loop (a no-op without a cache)."""
    if getattr(transformer, "is_cache_enabled", False):
        return transformer.cache_context("cond")
    return nullcontext()


def reset(transformer) -> None:
    """Forget the cached residuals: a new batch of images starts from its own first step."""
    if getattr(transformer, "is_cache_enabled", False):
        from pixart_cli.models.facade import import_diffusers

        HookRegistry = import_diffusers("diffusers.hooks.hooks").HookRegistry
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
