"""The inpainting dataset, its random masks, and the Fill pipeline's 8x8 mask rearrangement."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from data.fill_latents import mask_latents_from_pixels, pixels_from_mask_latents
from data.images import DataError
from data.inpainting import InpaintingDataset, random_inpainting_mask
from data.synthetic import write_inpainting_dataset


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("inpainting")
    write_inpainting_dataset(root, n=6, resolution=64, seed=0)
    return root


def without_masks(folder, tmp_path):
    """A folder listing ``folder``'s images and prompts, without masks."""
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        (tmp_path / row["image"]).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / row["image"], tmp_path / row["image"])
    rows = [{"image": row["image"], "prompt": row["prompt"]} for row in rows]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    return tmp_path


class TestItems:
    def test_fields_and_values(self, folder):
        dataset = InpaintingDataset.from_folder(folder, resolution=64)
        item = dataset[1]
        height, width = item["image"].shape[-2:]
        assert item["mask"].shape == (1, height, width)
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(item["masked_image"], item["image"] * (1 - item["mask"]))
        assert item["masked_image"][:, item["mask"][0] > 0].abs().max() == 0
        assert item["image_path"].endswith("images/0001.png")
        assert item["mask_path"].endswith("masks/0001.png")
        assert item["prompt"].startswith(("a ", "an "))

    def test_mask_follows_the_image_transform(self, folder):
        dataset = InpaintingDataset.from_folder(folder, resolution=64)
        item = dataset[0]  # square: the bucket is the file's size
        mask = np.asarray(Image.open(folder / "masks" / "0000.png")) > 127
        assert torch.equal(item["mask"][0], torch.from_numpy(mask).float())

    def test_hugging_face_columns(self, folder, tmp_path):
        rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
        data = {
            "picture": [Image.open(folder / row["image"]) for row in rows],
            "hole": [Image.open(folder / row["mask"]) for row in rows],
            "text": [row["prompt"] for row in rows],
        }
        datasets.Dataset.from_dict(data).save_to_disk(tmp_path / "hf")
        from_hf = InpaintingDataset.from_hf(
            tmp_path / "hf",
            resolution=64,
            image_column="picture",
            mask_column="hole",
            prompt_column="text",
        )
        from_folder = InpaintingDataset.from_folder(folder, resolution=64)
        for index in (0, 2):
            for field in ("image", "mask", "masked_image"):
                assert torch.equal(from_hf[index][field], from_folder[index][field])


class TestRandomMasks:
    def test_rows_without_masks_need_the_flag(self, folder, tmp_path):
        root = without_masks(folder, tmp_path)
        with pytest.raises(DataError, match="missing key 'mask'"):
            InpaintingDataset.from_folder(root, resolution=64)

    def test_reproducible_varied_and_keyed(self, folder, tmp_path):
        root = without_masks(folder, tmp_path)
        first = InpaintingDataset.from_folder(root, resolution=64, random_masks=True, seed=4)
        again = InpaintingDataset.from_folder(root, resolution=64, random_masks=True, seed=4)
        other = InpaintingDataset.from_folder(root, resolution=64, random_masks=True, seed=5)
        masks = [first[i]["mask"] for i in range(6)]
        assert all(torch.equal(masks[i], again[i]["mask"]) for i in range(6))
        assert not torch.equal(masks[0], masks[1])
        assert not torch.equal(masks[0], other[0]["mask"])
        assert first[0]["mask_path"] == "random mask (seed 4, item 0)"
        assert first.key(0) == again.key(0) != other.key(0)

    def test_rows_with_masks_keep_them(self, folder):
        with_flag = InpaintingDataset.from_folder(folder, resolution=64, random_masks=True)
        plain = InpaintingDataset.from_folder(folder, resolution=64)
        assert torch.equal(with_flag[3]["mask"], plain[3]["mask"])
        assert with_flag.key(3) == plain.key(3)

    def test_coverage(self):
        coverages = [
            random_inpainting_mask(np.random.default_rng(seed), 96, 128).mean()
            for seed in range(40)
        ]
        assert all(0.05 <= coverage <= 0.95 for coverage in coverages)
        assert min(coverages) < 0.2 and max(coverages) > 0.35  # varied, as intended


class TestMaskLatents:
    def test_the_pipelines_rearrangement(self):
        """FluxFillPipeline.prepare_mask_latents: view(B, h, 8, w, 8), permute(0, 2, 4, 1, 3)."""
        mask = (torch.rand(2, 1, 32, 48) > 0.5).float()
        expected = mask[:, 0].view(2, 4, 8, 6, 8).permute(0, 2, 4, 1, 3).reshape(2, 64, 4, 6)
        assert torch.equal(mask_latents_from_pixels(mask), expected)
        assert torch.equal(pixels_from_mask_latents(expected), mask)

    def test_channel_of_each_pixel(self):
        mask = torch.zeros(1, 1, 16, 16)
        mask[0, 0, 9, 2] = 1  # latent pixel (1, 0), offset (1, 2) within it
        latents = mask_latents_from_pixels(mask)
        assert latents.sum() == 1 and latents[0, 1 * 8 + 2, 1, 0] == 1
