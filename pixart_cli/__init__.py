"""pixart-cli: run PixArt text-to-image models in memory-staged steps (encode, denoise, decode)."""

__version__ = "0.1.0"
