"""Model code the suite adds to diffusers and transformers.

``models.multispectral`` holds ``AutoencoderKLMultispectralAdapter``, the SD3 VAE adapted to
N-band images; ``models.qwen_processor`` Qwen-Image-Edit's processor without torchvision;
``models.published`` the published configurations of the models each family trains on. The tiny
random models and pretrained worlds the tests and the evidence run on live in ``worlds``.
"""

from models.multispectral import AutoencoderKLMultispectralAdapter

__all__ = ["AutoencoderKLMultispectralAdapter"]
