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
