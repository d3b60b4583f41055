"""All three stages in one process: the same stage functions, each model freed before the next loads."""

from __future__ import annotations

from pixart_cli.plan import DenoisePlan, RunPlan
from pixart_cli.runtime import RunContext
from pixart_cli.stages.decode import decode
from pixart_cli.stages.denoise import denoise
from pixart_cli.stages.encode import encode
from pixart_cli.stages.encode_control import encode_control
from pixart_cli.stages.encode_image import encode_image
from pixart_cli.stages.encode_mask import encode_mask


def generate(plan: RunPlan, ctx: RunContext):
    """A checked run plan (``plan.plan_run``) -> (images, latents meta). Each stage's model is dropped when its
    function returns.

    ``plan.image``: image to image, the staged ``encode-image`` + ``denoise --init-latents`` in one process; with a
    mask, inpainting (``encode-mask`` too); ``plan.control_image``: ControlNet, the staged ``encode-control`` +
    ``denoise --control`` in one process.
    """
    denoising = with_mask(plan.denoise, ctx)
    if plan.image is not None:
        denoising = denoising.with_init(encode_image(plan.image, plan.image_sizes, ctx))
    if plan.control_image is not None:
        denoising = denoising.with_control(encode_control(plan.control_image, plan.control_sizes, ctx))
    embeddings = encode(plan.prompts, plan.encoding, ctx)
    latents = denoise(embeddings, denoising, ctx)
    images = decode(latents, ctx, batch_size=plan.decode_batch_size)
    return images, latents.meta


def with_mask(plan: DenoisePlan, ctx: RunContext) -> DenoisePlan:
    """The plan with the mask made from its checked mask image (no model loads), when it has one to make."""
    request = plan.mask_request
    if request is None:
        return plan
    return plan.with_mask(encode_mask(request.image, plan.schedule, request.blur, ctx, request.source, request.grid))
