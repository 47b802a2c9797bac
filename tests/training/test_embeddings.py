"""``training.inputs.embeddings``: patch tokens of tiny local DINOv2 and CLIP checkpoints, with the
checkpoint's own pre-processing and gradients back to the pixels."""

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    AutoImageProcessor,
    BitImageProcessor,
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPVisionModel,
    Dinov2Config,
    Dinov2Model,
)

from training.inputs.embeddings import ImageEmbedder

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
DINO_SIDE, DINO_PATCH, DINO_DIM = 28, 14, 32
CLIP_SIDE, CLIP_PATCH, CLIP_DIM = 32, 8, 16


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Folders of a tiny DINOv2 (BitImageProcessor) and a tiny full CLIP (CLIPImageProcessor)."""
    root = tmp_path_factory.mktemp("encoders")
    torch.manual_seed(0)
    dino = Dinov2Config(
        hidden_size=DINO_DIM,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        patch_size=DINO_PATCH,
        image_size=DINO_SIDE,
    )
    Dinov2Model(dino).save_pretrained(root / "dinov2")
    BitImageProcessor(
        size={"shortest_edge": DINO_SIDE},
        crop_size={"height": DINO_SIDE, "width": DINO_SIDE},
        do_center_crop=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    ).save_pretrained(root / "dinov2")
    clip = CLIPConfig(
        text_config={
            "vocab_size": 100,
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 16,
        },
        vision_config={
            "hidden_size": CLIP_DIM,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": CLIP_SIDE,
            "patch_size": CLIP_PATCH,
        },
        projection_dim=16,
    )
    CLIPModel(clip).save_pretrained(root / "clip")
    CLIPImageProcessor(
        size={"shortest_edge": CLIP_SIDE}, crop_size={"height": CLIP_SIDE, "width": CLIP_SIDE}
    ).save_pretrained(root / "clip")
    return {"dinov2": root / "dinov2", "clip": root / "clip"}


@pytest.fixture(scope="module")
def embedders(checkpoints):
    return {name: ImageEmbedder(str(path)) for name, path in checkpoints.items()}


# name -> (input side, tokens, width, reference model class)
ENCODERS = {
    "dinov2": (DINO_SIDE, 1 + (DINO_SIDE // DINO_PATCH) ** 2, DINO_DIM, Dinov2Model),
    "clip": (CLIP_SIDE, 1 + (CLIP_SIDE // CLIP_PATCH) ** 2, CLIP_DIM, CLIPVisionModel),
}


def random_image(side: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)


def to_signed(arrays: list[np.ndarray]) -> torch.Tensor:
    """uint8 ``[H, W, 3]`` arrays -> ``[B, 3, H, W]`` in [-1, 1]."""
    return torch.stack([torch.from_numpy(a).permute(2, 0, 1) for a in arrays]).float() / 127.5 - 1


@pytest.mark.parametrize("name", list(ENCODERS))
class TestImageEmbedder:
    def test_setup_from_the_processor(self, embedders, checkpoints, name):
        embedder = embedders[name]
        side = ENCODERS[name][0]
        processor = AutoImageProcessor.from_pretrained(checkpoints[name])
        assert embedder.input_size == (side, side)
        torch.testing.assert_close(
            embedder.mean.flatten(), torch.tensor(processor.image_mean, dtype=torch.float32)
        )
        torch.testing.assert_close(
            embedder.std.flatten(), torch.tensor(processor.image_std, dtype=torch.float32)
        )
        assert isinstance(embedder.encoder, ENCODERS[name][3])
        assert not embedder.encoder.training
        assert not any(p.requires_grad for p in embedder.parameters())

    @pytest.mark.parametrize("size", [None, 40, 20])
    def test_token_shape(self, embedders, name, size):
        side, tokens, width, _ = ENCODERS[name]
        images = torch.rand(2, 3, size or side, size or side) * 2 - 1
        assert embedders[name](images).shape == (2, tokens, width)

    def test_equals_the_processor_and_model(self, embedders, checkpoints, name):
        """On images already at the encoder's size nothing is resized, so the embedding is the
        model's output on the image processor's pixel values."""
        side = ENCODERS[name][0]
        arrays = [random_image(side, seed) for seed in range(2)]
        processor = AutoImageProcessor.from_pretrained(checkpoints[name])
        pixels = processor(images=[Image.fromarray(a) for a in arrays], return_tensors="pt")
        model = ENCODERS[name][3].from_pretrained(checkpoints[name]).eval()
        with torch.no_grad():
            reference = model(pixel_values=pixels["pixel_values"]).last_hidden_state
            ours = embedders[name](to_signed(arrays))
        torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)

    def test_normalisation_of_a_constant_image(self, embedders, name):
        """A flat image stays flat under any resize: the encoder sees ((c + 1) / 2 - mean) / std
        at its own size, whatever the input size and aspect."""
        embedder = embedders[name]
        side = ENCODERS[name][0]
        value = 0.3
        images = torch.full((1, 3, 48, 72), value)
        mean = torch.tensor(embedder.mean.flatten().tolist())
        std = torch.tensor(embedder.std.flatten().tolist())
        pixels = ((value + 1) / 2 - mean) / std
        expected_input = pixels.view(1, 3, 1, 1).expand(1, 3, side, side)
        with torch.no_grad():
            reference = embedder.encoder(pixel_values=expected_input).last_hidden_state
            torch.testing.assert_close(embedder(images), reference, atol=1e-5, rtol=1e-5)

    def test_gradients_reach_the_images(self, embedders, name):
        images = (torch.rand(2, 3, 40, 40) * 2 - 1).requires_grad_(True)
        tokens = embedders[name](images)
        tokens.square().mean().backward()
        assert images.grad is not None
        assert torch.isfinite(images.grad).all()
        assert (images.grad[0].abs().sum() > 0) and (images.grad[1].abs().sum() > 0)
        assert all(p.grad is None for p in embedders[name].parameters())

    def test_items_are_independent(self, embedders, name):
        side = ENCODERS[name][0]
        batch = torch.rand(3, 3, side, side) * 2 - 1
        with torch.no_grad():
            together = embedders[name](batch)
            alone = embedders[name](batch[1:2])
        torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)
