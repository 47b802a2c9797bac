"""map_mask_to_latent / pack_pixel_mask: values, token order, and size errors."""

import pytest
import torch
from diffusers import FluxKontextPipeline, FluxPipeline, QwenImageEditPipeline

from losses.sequence_mask import map_mask_to_latent, pack_pixel_mask


def naive_token_weights(mask: torch.Tensor) -> torch.Tensor:
    """[B, H, W] -> [B, L]: per 16x16 token, the max of its four 8x8 cell means, row-major."""
    batch, height, width = mask.shape
    out = []
    for b in range(batch):
        row = []
        for ty in range(height // 16):
            for tx in range(width // 16):
                cells = [
                    mask[
                        b,
                        ty * 16 + cy * 8 : ty * 16 + cy * 8 + 8,
                        tx * 16 + cx * 8 : tx * 16 + cx * 8 + 8,
                    ]
                    .double()
                    .mean()
                    .item()
                    for cy in (0, 1)
                    for cx in (0, 1)
                ]
                row.append(max(cells))
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


class TestMapMaskToLatent:
    def test_seed_example_has_1872_tokens(self):
        assert map_mask_to_latent(torch.zeros(2, 832, 576)).shape == (2, 1872)

    def test_single_token_block(self):
        mask = torch.zeros(1, 64, 48)
        mask[0, 16:32, 32:48] = 1  # token row 1, column 2 of a 4x3 grid
        expected = torch.zeros(1, 12)
        expected[0, 1 * 3 + 2] = 1
        torch.testing.assert_close(map_mask_to_latent(mask), expected)

    def test_partial_cell_is_averaged_then_maxed(self):
        mask = torch.zeros(1, 16, 16)
        mask[0, 0:2, 0:2] = 1  # 4 of the 64 pixels of cell (0, 0)
        mask[0, 8:16, 8:12] = 1  # half of cell (1, 1)
        assert map_mask_to_latent(mask).item() == pytest.approx(0.5)

    def test_matches_naive_reference(self):
        mask = (torch.rand(3, 96, 64) > 0.7).float()
        torch.testing.assert_close(map_mask_to_latent(mask).double(), naive_token_weights(mask))

    def test_empty_and_full(self):
        assert map_mask_to_latent(torch.zeros(1, 32, 32)).abs().sum() == 0
        torch.testing.assert_close(map_mask_to_latent(torch.ones(1, 32, 32)), torch.ones(1, 4))

    def test_bool_mask(self):
        mask = torch.rand(2, 32, 48) > 0.5
        torch.testing.assert_close(map_mask_to_latent(mask), map_mask_to_latent(mask.float()))

    @pytest.mark.parametrize("pipeline", [FluxPipeline, FluxKontextPipeline, QwenImageEditPipeline])
    def test_lines_up_with_diffusers_packing_at_832x576(self, pipeline):
        # Latents whose every channel holds the mask's 8x8 cell mean: after diffusers' packing,
        # the largest of a token's 64 features is exactly that token's mask weight.
        mask = (torch.rand(1, 832, 576) > 0.8).float()
        mask[0, 100:300, 50:250] = 1
        cells = torch.nn.functional.avg_pool2d(mask[:, None], 8)  # [1, 1, 104, 72]
        latents = cells.expand(1, 16, 104, 72).contiguous()
        packed = pipeline._pack_latents(latents, 1, 16, 104, 72)
        assert packed.shape == (1, 1872, 64)
        torch.testing.assert_close(map_mask_to_latent(mask), packed.amax(dim=-1))

    def test_token_positions_match_unpacking(self):
        # Each token weight, unpacked with diffusers' inverse, lands on the 2x2 cells it covers.
        mask = torch.rand(2, 64, 96)
        tokens = map_mask_to_latent(mask)  # [2, 24]
        unpacked = FluxPipeline._unpack_latents(
            tokens[..., None].expand(2, 24, 64), height=64, width=96, vae_scale_factor=8
        )
        cell_max = torch.nn.functional.max_pool2d(
            torch.nn.functional.avg_pool2d(mask[:, None], 8), 2
        )
        expected = cell_max.repeat_interleave(2, -1).repeat_interleave(2, -2)
        torch.testing.assert_close(unpacked[:, :1], expected)

    def test_other_vae_factor_pools_its_own_cells(self):
        # A 32x VAE: tokens of 64x64 pixels, the cells averaged over 32x32 pixels.
        mask = torch.zeros(1, 128, 64)
        mask[0, 64:80, 0:32] = 1  # half of cell (2, 0): token (1, 0) of a 2x1 grid
        torch.testing.assert_close(
            map_mask_to_latent(mask, vae_scale_factor=32), torch.tensor([[0.0, 0.5]])
        )
        with pytest.raises(ValueError, match=r"multiples of 64 \(VAE factor 32"):
            map_mask_to_latent(torch.zeros(1, 96, 64), vae_scale_factor=32)

    def test_gradcheck(self):
        mask = torch.rand(1, 32, 32, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(map_mask_to_latent, (mask,))

    @pytest.mark.parametrize("size", [(830, 576), (832, 570), (8, 16)])
    def test_unpackable_size_names_it(self, size):
        with pytest.raises(ValueError, match=rf"{size[0]}x{size[1]}.*multiples of 16"):
            map_mask_to_latent(torch.zeros(1, *size))

    def test_error_suggests_packable_size(self):
        with pytest.raises(ValueError, match=r"e\.g\. to 816x576"):
            map_mask_to_latent(torch.zeros(1, 830, 576))

    def test_wrong_rank(self):
        with pytest.raises(ValueError, match=r"image_mask must be \[B, H, W\]"):
            map_mask_to_latent(torch.zeros(1, 1, 32, 32))


class TestPackPixelMask:
    @pytest.mark.parametrize("layout", ["hw", "bhw", "b1hw"])
    def test_layouts_agree(self, layout):
        mask = (torch.rand(48, 80) > 0.5).float()
        given = {"hw": mask, "bhw": mask[None], "b1hw": mask[None, None]}[layout]
        torch.testing.assert_close(pack_pixel_mask(given), map_mask_to_latent(mask[None]))

    def test_non_square_aspect(self):
        assert pack_pixel_mask(torch.ones(1, 1, 1024, 576)).shape == (1, 64 * 36)

    def test_integer_mask_refused(self):
        with pytest.raises(ValueError, match="bool or floating point"):
            pack_pixel_mask(torch.zeros(32, 32, dtype=torch.uint8))

    def test_unpackable(self):
        with pytest.raises(ValueError, match="multiples of 16"):
            pack_pixel_mask(torch.zeros(40, 32))
