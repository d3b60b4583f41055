"""The staged .pt formats: their names, version and tensor keys (diffusers' keyword names)."""

EMBEDDINGS_FORMAT = "pixart-cli/embeddings"
LATENTS_FORMAT = "pixart-cli/latents"
CONTROL_FORMAT = "pixart-cli/control-latents"  # a ControlNet's condition (encode-control): VAE latents of an edge map
FORMAT_VERSION = 1
EMBEDDING_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")
