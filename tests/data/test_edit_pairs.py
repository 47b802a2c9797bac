"""The edit-pair dataset: item values, keys, up-front validation, Hugging Face sources."""

import json
import pickle
import shutil

import datasets
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from data.buckets import BucketBatchSampler
from data.edit_pairs import EditPairDataset, composite_overlay
from data.images import DataError
from data.rows import MAX_REPORTED_PROBLEMS, collate_items
from data.synthetic import write_kontext_dataset
from losses import downsample_mask_area, signed_distance_map_from_mask


@pytest.fixture(scope="module")
def synthetic_folder(tmp_path_factory):
    """Six synthetic pairs: 128x128, 160x128 and 128x160 (W x H) in turn."""
    root = tmp_path_factory.mktemp("pairs")
    write_kontext_dataset(root, n=6, resolution=128, seed=0)
    return root


@pytest.fixture(scope="module")
def dataset(synthetic_folder):
    return EditPairDataset.from_folder(synthetic_folder, resolution=128)


def write_metadata(root, rows):
    """Rows are dicts (written as JSON) or raw strings (written as they are)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


def write_pair(root, name, size=(32, 24), mask_size=None, prompt="insert a red ball"):
    """Write context/target/mask PNGs of ``size`` (W x H); returns the metadata row."""
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    width, height = size
    context = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    target = context.copy()
    target[4:12, 4:12] = (255, 0, 0)
    mask_width, mask_height = mask_size or size
    mask = np.zeros((mask_height, mask_width), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    row = {"context": f"{name}_c.png", "target": f"{name}_t.png", "mask": f"{name}_m.png"}
    Image.fromarray(context).save(root / row["context"])
    Image.fromarray(target).save(root / row["target"])
    Image.fromarray(mask).save(root / row["mask"])
    return {**row, "prompt": prompt}


def load_error(root) -> str:
    with pytest.raises(DataError) as caught:
        EditPairDataset.from_folder(root, resolution=32)
    return str(caught.value)


class TestItems:
    def test_shapes_buckets_and_ranges(self, dataset):
        assert len(dataset) == 6
        assert [dataset.bucket_size(i) for i in range(3)] == [(128, 128), (112, 144), (144, 112)]
        for index in range(len(dataset)):
            item = dataset[index]
            height, width = dataset.buckets[dataset.bucket_of_items[index]]
            for field in ("context", "target", "overlay"):
                assert item[field].shape == (3, height, width)
                assert item[field].min() >= -1 and item[field].max() <= 1
            assert item["mask"].shape == (1, height, width)
            assert set(item["mask"].unique().tolist()) == {0.0, 1.0}
            assert item["mask_latent"].shape == (1, height // 8, width // 8)
            assert item["signed_distance_map"].shape == (1, height // 8, width // 8)
            assert item["index"] == index and item["prompt"].startswith("insert a")

    def test_bucket_sized_item_equals_the_files(self, dataset, synthetic_folder):
        item = dataset[0]  # 128x128: already its bucket's size, so pixels pass unchanged
        context = np.array(Image.open(synthetic_folder / "images/0000_context.png"))
        mask = np.asarray(Image.open(synthetic_folder / "masks/0000.png"))
        expected = torch.from_numpy(context).permute(2, 0, 1).float() / 255 * 2 - 1
        assert torch.allclose(item["context"], expected, atol=1e-6)
        assert torch.equal(item["mask"][0], torch.from_numpy(mask == 255).float())

    def test_mask_geometry_is_the_losses_functions_of_the_mask(self, dataset):
        for index in range(3):
            item = dataset[index]
            height, width = item["mask"].shape[-2:]
            mask_latent = downsample_mask_area(item["mask"], (height // 8, width // 8))[0]
            assert torch.equal(item["mask_latent"], mask_latent)
            sdm = signed_distance_map_from_mask(mask_latent > 0.5, normalize=True)[0]
            assert torch.equal(item["signed_distance_map"], sdm)
            assert item["mask_latent"].sum() * 64 == pytest.approx(item["mask"].sum().item())
            assert item["signed_distance_map"].abs().max() == 1

    def test_mask_geometry_follows_the_vaes_factor(self, synthetic_folder):
        # A 4x VAE (the tiny pretrained world's) gets masks on its own 4x grid.
        dataset = EditPairDataset.from_folder(synthetic_folder, resolution=128, latent_factor=4)
        item = dataset[1]
        height, width = item["mask"].shape[-2:]
        assert item["mask_latent"].shape == (1, height // 4, width // 4)
        assert item["signed_distance_map"].shape == (1, height // 4, width // 4)
        assert item["mask_latent"].sum() * 16 == pytest.approx(item["mask"].sum().item())

    def test_composited_overlay(self, dataset):
        item = dataset[0]
        context, target, mask = item["context"], item["target"], item["mask"]
        assert torch.equal(item["overlay"], composite_overlay(context, target, mask))
        inside, outside = mask[0] == 1, mask[0] == 0
        assert torch.allclose(item["overlay"][:, outside], context[:, outside])
        blend = 0.5 * context[:, inside] + 0.5 * target[:, inside]
        assert torch.allclose(item["overlay"][:, inside], blend)

    def test_overlay_file_is_used(self, tmp_path):
        row = write_pair(tmp_path, "a")
        Image.new("RGB", (32, 24), (255, 0, 0)).save(tmp_path / "a_o.png")
        write_metadata(tmp_path, [{**row, "overlay": "a_o.png"}])
        item = EditPairDataset.from_folder(tmp_path, resolution=32)[0]
        assert item["overlay"].shape == item["context"].shape
        assert bool(item["overlay"][0].eq(1).all()) and bool(item["overlay"][1:].eq(-1).all())

    def test_collate_with_the_sampler(self, dataset):
        sampler = BucketBatchSampler(dataset.bucket_of_items, 2, seed=0)
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_items)
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            height, width = batch["context"].shape[-2:]
            assert batch["context"].shape == batch["target"].shape == (2, 3, height, width)
            assert batch["overlay"].shape == (2, 3, height, width)
            assert batch["mask"].shape == (2, 1, height, width)
            assert batch["mask_latent"].shape == (2, 1, height // 8, width // 8)
            assert batch["signed_distance_map"].shape == (2, 1, height // 8, width // 8)
            assert batch["index"].dtype == torch.long and batch["index"].shape == (2,)
            assert len(batch["prompt"]) == 2 and "key" not in batch
        assert sorted(i for batch in batches for i in batch["index"].tolist()) == list(range(6))

    def test_collate_refuses_mixed_buckets(self, dataset):
        with pytest.raises(ValueError, match="mixes bucket sizes"):
            collate_items([dataset[0], dataset[1]])

    def test_pickles_for_worker_processes(self, dataset):
        copy = pickle.loads(pickle.dumps(dataset))
        assert torch.equal(copy[1]["target"], dataset[1]["target"])
        assert copy.key(1) == dataset.key(1)


class TestKeys:
    def test_identical_content_shares_a_key_and_any_change_breaks_it(self, tmp_path):
        row = write_pair(tmp_path, "a")
        copy = {}
        for field in ("context", "target", "mask"):
            copy[field] = "copy_" + row[field]
            shutil.copy(tmp_path / row[field], tmp_path / copy[field])
        mask = np.asarray(Image.open(tmp_path / row["mask"])).copy()
        mask[0, 0] = 255
        Image.fromarray(mask).save(tmp_path / "changed_m.png")
        rows = [
            row,
            {**row, **copy},
            {**row, "mask": "changed_m.png"},
            {**row, "prompt": "insert a red bal"},
            {**row, "overlay": row["target"]},
        ]
        write_metadata(tmp_path, rows)
        keys = [EditPairDataset.from_folder(tmp_path, resolution=32).key(i) for i in range(5)]
        assert keys[0] == keys[1]
        assert len(set(keys)) == 4
        assert all(len(key) == 64 and int(key, 16) >= 0 for key in keys)

    def test_bucket_size_is_part_of_the_key(self, tmp_path):
        write_metadata(tmp_path, [write_pair(tmp_path, "a", size=(64, 64))])
        key_32 = EditPairDataset.from_folder(tmp_path, resolution=32).key(0)
        key_64 = EditPairDataset.from_folder(tmp_path, resolution=64).key(0)
        assert key_32 != key_64

    def test_file_hashes_are_computed_once(self, tmp_path):
        row = write_pair(tmp_path, "a")
        write_metadata(tmp_path, [row])
        dataset = EditPairDataset.from_folder(tmp_path, resolution=32)
        key = dataset.key(0)
        Image.new("RGB", (32, 24), (1, 2, 3)).save(tmp_path / row["context"])
        assert dataset.key(0) == key
        assert EditPairDataset.from_folder(tmp_path, resolution=32).key(0) != key


class TestValidation:
    def test_mask_of_another_size(self, tmp_path):
        write_metadata(tmp_path, [write_pair(tmp_path, "a", mask_size=(30, 24))])
        message = load_error(tmp_path)
        assert "a_m.png" in message and "30x24" in message and "32x24" in message
        assert "a_t.png" in message

    def test_target_and_overlay_sizes_are_checked(self, tmp_path):
        row = write_pair(tmp_path, "a")
        Image.new("RGB", (24, 32)).save(tmp_path / "a_t.png")
        Image.new("RGB", (16, 16)).save(tmp_path / "a_o.png")
        write_metadata(tmp_path, [{**row, "overlay": "a_o.png"}])
        message = load_error(tmp_path)
        assert "a_t.png" in message and "a_o.png" in message

    def test_missing_file(self, tmp_path):
        write_metadata(tmp_path, [{**write_pair(tmp_path, "a"), "target": "nowhere.png"}])
        message = load_error(tmp_path)
        assert "nowhere.png" in message and "does not exist" in message

    def test_unreadable_image(self, tmp_path):
        row = write_pair(tmp_path, "a")
        (tmp_path / "a_m.png").write_text("this is not a png")
        write_metadata(tmp_path, [row])
        message = load_error(tmp_path)
        assert "a_m.png" in message and "cannot be read as an image" in message

    @pytest.mark.parametrize("prompt", [None, "", "   ", 3])
    def test_prompt_less_row(self, tmp_path, prompt):
        row = write_pair(tmp_path, "a")
        if prompt is None:
            del row["prompt"]
        else:
            row["prompt"] = prompt
        write_metadata(tmp_path, [write_pair(tmp_path, "b"), row])
        message = load_error(tmp_path)
        assert "metadata.jsonl' line 2" in message and "prompt-less row" in message

    def test_malformed_json_line(self, tmp_path):
        row = write_pair(tmp_path, "a")
        write_metadata(tmp_path, [row, '{"context": "a_c.png", ', row])
        message = load_error(tmp_path)
        assert "metadata.jsonl' line 2: malformed JSON" in message

    def test_missing_key_and_wrong_types(self, tmp_path):
        row = write_pair(tmp_path, "a")
        no_target = {key: value for key, value in row.items() if key != "target"}
        write_metadata(tmp_path, [no_target, {**row, "overlay": 5}, "[1, 2]"])
        message = load_error(tmp_path)
        assert "line 1: missing key 'target'" in message
        assert "line 2: 'overlay' must be a relative path" in message
        assert "line 3: expected a JSON object" in message

    def test_a_row_without_a_mask_has_none(self, tmp_path):
        row = write_pair(tmp_path, "a")
        write_metadata(tmp_path, [{k: v for k, v in row.items() if k != "mask"}, row])
        dataset = EditPairDataset.from_folder(tmp_path, resolution=32)
        plain, masked = dataset[0], dataset[1]
        assert not plain["has_mask"] and not plain["mask"].any() and masked["has_mask"]
        # The overlay negative of a row without a region is the context itself.
        assert torch.equal(plain["overlay"], plain["context"])

    def test_a_context_of_another_size_is_fitted_to_the_targets_bucket(self, tmp_path):
        row = write_pair(tmp_path, "a", size=(32, 32))
        # 64x32 (W x H): red left half, blue right half; cover-cropped to the 32x32 bucket it
        # keeps columns 16..48, half red and half blue.
        halves = np.zeros((32, 64, 3), dtype=np.uint8)
        halves[:, :32, 0] = 255
        halves[:, 32:, 2] = 255
        Image.fromarray(halves).save(tmp_path / "a_c.png")
        write_metadata(tmp_path, [row])
        context = EditPairDataset.from_folder(tmp_path, resolution=32)[0]["context"]
        assert context.shape == (3, 32, 32)
        red, blue = torch.tensor([1.0, -1.0, -1.0]), torch.tensor([-1.0, -1.0, 1.0])
        torch.testing.assert_close(context[:, :, :12], red[:, None, None].expand(3, 32, 12))
        torch.testing.assert_close(context[:, :, 20:], blue[:, None, None].expand(3, 32, 12))

    def test_several_contexts_are_refused_naming_the_row(self, tmp_path):
        row = write_pair(tmp_path, "a")
        write_metadata(tmp_path, [{**row, "context": ["a_c.png", "a_t.png"]}])
        message = load_error(tmp_path)
        assert "line 1: context[0]" in message and "FluxKontextPipeline reads at most 1" in message

    def test_the_trigger_word_replaces_its_token_or_leads_the_prompt(self, tmp_path):
        rows = [
            write_pair(tmp_path, "a", prompt="insert [trigger] on the left"),
            write_pair(tmp_path, "b", prompt="insert a red ball"),
        ]
        write_metadata(tmp_path, rows)
        plain = EditPairDataset.from_folder(tmp_path, resolution=32)
        rows_with = EditPairDataset(plain.rows, resolution=32, trigger_word="ohwx mug")
        assert [rows_with[i]["prompt"] for i in (0, 1)] == [
            "insert ohwx mug on the left",
            "ohwx mug insert a red ball",
        ]
        # The prompt is part of an item's content key: a latent cache never serves the other.
        assert rows_with.key(1) != plain.key(1)

    def test_all_problems_in_one_report(self, tmp_path):
        good = write_pair(tmp_path, "a")
        rows = [
            write_pair(tmp_path, "b", mask_size=(8, 8)),
            {**good, "context": "gone.png"},
            {**good, "prompt": ""},
            "not json",
            good,
        ]
        write_metadata(tmp_path, rows)
        message = load_error(tmp_path)
        for expected in ("b_m.png", "gone.png", "line 3: prompt-less", "line 4: malformed"):
            assert expected in message
        assert message.count("\n  - ") == 4

    def test_report_stops_after_the_limit(self, tmp_path):
        write_metadata(tmp_path, ["{"] * (MAX_REPORTED_PROBLEMS + 5))
        message = load_error(tmp_path)
        assert message.count("malformed JSON") == MAX_REPORTED_PROBLEMS
        assert f"stopped after {MAX_REPORTED_PROBLEMS} of {MAX_REPORTED_PROBLEMS + 5} rows" in (
            message
        )

    def test_folder_without_metadata_or_rows(self, tmp_path):
        assert "metadata.jsonl" in load_error(tmp_path)
        (tmp_path / "metadata.jsonl").write_text("\n\n")
        assert "no rows" in load_error(tmp_path)
        assert "not a directory" in load_error(tmp_path / "metadata.jsonl")


def hf_dataset(folder, columns=None):
    """The rows of an edit-pair folder as a ``datasets.Dataset`` with Image columns."""
    columns = columns or {}
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    data, features = {}, {}
    for field in ("context", "target", "mask", "prompt"):
        name = columns.get(field, field)
        if field == "prompt":
            data[name] = [row["prompt"] for row in rows]
            features[name] = datasets.Value("string")
        else:
            data[name] = [Image.open(folder / row[field]) for row in rows]
            features[name] = datasets.Image()
    return datasets.Dataset.from_dict(data, features=datasets.Features(features))


class TestHuggingFace:
    def test_save_to_disk_matches_the_folder(self, synthetic_folder, dataset, tmp_path):
        hf_dataset(synthetic_folder).save_to_disk(tmp_path / "hf")
        from_hf = EditPairDataset.from_hf(tmp_path / "hf", resolution=128)
        assert from_hf.bucket_of_items == dataset.bucket_of_items
        for index in (0, 1):
            hf_item, folder_item = from_hf[index], dataset[index]
            for field in ("context", "target", "overlay", "mask", "signed_distance_map"):
                assert torch.equal(hf_item[field], folder_item[field]), field
            assert hf_item["prompt"] == folder_item["prompt"]
        again = EditPairDataset.from_hf(tmp_path / "hf", resolution=128)
        assert [again.key(i) for i in range(6)] == [from_hf.key(i) for i in range(6)]
        assert len({from_hf.key(i) for i in range(6)}) == 6

    def test_dataset_dict_split_and_column_names(self, synthetic_folder, tmp_path):
        columns = {"context": "source", "target": "edited", "mask": "region", "prompt": "text"}
        full = hf_dataset(synthetic_folder, columns)
        splits = datasets.DatasetDict({"train": full, "validation": full.select([1, 2])})
        splits.save_to_disk(tmp_path / "hf")
        loaded = EditPairDataset.from_hf(
            tmp_path / "hf",
            resolution=128,
            split="validation",
            context_column="source",
            target_column="edited",
            mask_column="region",
            prompt_column="text",
        )
        assert len(loaded) == 2 and loaded[0]["context"].shape == (3, 112, 144)
        with pytest.raises(DataError, match=r"split 'test'.*no such split.*validation"):
            EditPairDataset.from_hf(tmp_path / "hf", resolution=128, split="test")

    def test_path_columns(self, synthetic_folder, tmp_path):
        rows = [json.loads(line) for line in (synthetic_folder / "metadata.jsonl").open()]
        data = {
            field: [str(synthetic_folder / row[field]) for row in rows]
            for field in ("context", "target", "mask")
        }
        data["prompt"] = [row["prompt"] for row in rows]
        datasets.Dataset.from_dict(data).save_to_disk(tmp_path / "hf")
        loaded = EditPairDataset.from_hf(tmp_path / "hf", resolution=128)
        assert torch.equal(
            loaded[2]["mask"],
            EditPairDataset.from_folder(synthetic_folder, resolution=128)[2]["mask"],
        )

    def test_bad_rows_name_row_and_column(self, synthetic_folder, tmp_path):
        rows = hf_dataset(synthetic_folder).select([0, 1]).to_dict()
        rows["mask"][0] = Image.new("L", (10, 10))
        rows["prompt"][1] = ""
        features = hf_dataset(synthetic_folder).features
        datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "hf")
        with pytest.raises(DataError) as caught:
            EditPairDataset.from_hf(tmp_path / "hf", resolution=128)
        message = str(caught.value)
        assert "dataset row 0, column 'mask': size 10x10 differs" in message
        assert "dataset row 1, column 'prompt': prompt-less row" in message

    def test_missing_column(self, synthetic_folder, tmp_path):
        hf_dataset(synthetic_folder).remove_columns("target").save_to_disk(tmp_path / "hf")
        with pytest.raises(DataError, match=r"no column 'target' \(for target\)"):
            EditPairDataset.from_hf(tmp_path / "hf", resolution=128)

    def test_without_a_mask_column_no_row_has_a_mask(self, synthetic_folder, tmp_path):
        hf_dataset(synthetic_folder).remove_columns("mask").save_to_disk(tmp_path / "hf")
        item = EditPairDataset.from_hf(tmp_path / "hf", resolution=128)[0]
        assert not item["has_mask"] and not item["mask"].any()

    def test_unknown_name_offline(self):
        with pytest.raises(DataError, match="dataset 'no-such-user/no-such-set'"):
            EditPairDataset.from_hf("no-such-user/no-such-set", resolution=128)
