"""The staged .pt formats: their names, version and tensor keys (diffusers' keyword names)."""

EMBEDDINGS_FORMAT = "pixart-cli/embeddings"
LATENTS_FORMAT = "pixart-cli/latents"
CONTROL_FORMAT = "pixart-cli/control-latents"  # a ControlNet's condition (encode-control): VAE latents of an edge map
MASK_FORMAT = "pixart-cli/mask"
FORMAT_VERSION = 1
EMBEDDING_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
# Inpainting with --keep-unmasked: what decode pastes back (the source image and the blurred mask at the size decode
# restores), in a mask file and in the latents denoise writes from it
OVERLAY_KEYS = ("overlay_image", "overlay_mask")
LATENTS_KEYS = ("latents", *OVERLAY_KEYS)
MASK_KEYS = ("mask", *OVERLAY_KEYS)
# The tensors each format may hold
FORMAT_KEYS = {
    EMBEDDINGS_FORMAT: EMBEDDING_KEYS,
    LATENTS_FORMAT: LATENTS_KEYS,
    MASK_FORMAT: MASK_KEYS,
    CONTROL_FORMAT: ("latents",),
}
# safetensors' dtype codes and torch's names for them (the ones pixart reads)
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


def entry_layout_valid(shape, offsets, data_size: int) -> bool:
    """A safetensors header entry's shape (at most 8 dimensions, each below 2^40) and data offsets (two integers,
    in order, within the ``data_size`` bytes after the header), as JSON gave them."""
    return (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(type(n) is int and 0 <= n < 2**40 for n in shape)
        and isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(n) is int for n in offsets)
        and 0 <= offsets[0] <= offsets[1] <= data_size
    )
