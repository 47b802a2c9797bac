"""Image embeddings for the seed 003 losses from a transformers vision encoder.

Any local DINOv2 or CLIP checkpoint works: its patch tokens (``last_hidden_state``) are the
embedding. Pre-processing (resize to the encoder's input size, normalise with its mean and std)
is written in torch so gradients flow from the embedding back to a decoded prediction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoImageProcessor, AutoModel, CLIPVisionModel


class ImageEmbedder(torch.nn.Module):
    """Frozen vision encoder mapping images ``[B, 3, H, W]`` in [-1, 1] to tokens ``[B, P, D]``."""

    def __init__(self, path: str) -> None:
        super().__init__()
        config = AutoConfig.from_pretrained(path)
        # A full CLIP checkpoint also holds a text tower; only the vision tower is needed.
        model_cls = CLIPVisionModel if config.model_type == "clip" else AutoModel
        self.encoder = model_cls.from_pretrained(path).requires_grad_(False).eval()
        processor = AutoImageProcessor.from_pretrained(path)
        size = getattr(processor, "crop_size", None) or processor.size
        side = size.get("height") or size.get("shortest_edge")
        self.input_size = (side, side)
        self.register_buffer("mean", torch.tensor(processor.image_mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(processor.image_std).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images: [B, 3, H, W]`` in [-1, 1] -> patch tokens ``[B, P, D]``."""
        pixels = F.interpolate(
            (images.float() + 1) / 2, size=self.input_size, mode="bilinear", antialias=True
        )
        pixels = (pixels - self.mean) / self.std
        return self.encoder(pixel_values=pixels.to(self.encoder.dtype)).last_hidden_state
