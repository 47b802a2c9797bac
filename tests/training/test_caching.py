"""``training.inputs.caching``: fill a tensor cache with a real Accelerator, then serve from it."""

import os
import signal
from dataclasses import dataclass

import pytest
import torch
from accelerate import Accelerator
from torch.utils.data import Dataset

from data.cache import TensorCache
from training.config import LowMemoryConfig, TrainConfig
from training.inputs.caching import (
    CachedItems,
    EncoderOffload,
    encoded_items,
    fill_cache,
    offload_after_caching,
)


class KeyedItems(Dataset):
    """Items with content keys, as the edit-pair dataset has."""

    def __init__(self, n: int) -> None:
        self.values = [
            torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(n)
        ]

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict:
        return {"pixels": self.values[index], "prompt": f"prompt {index}"}

    def key(self, index: int) -> str:
        return f"item{index:03d}"


def collate(items: list[dict]) -> dict:
    return {
        "pixels": torch.stack([item["pixels"] for item in items]),
        "prompt": [item["prompt"] for item in items],
    }


class CountingEncoder:
    """A stand-in for the VAE/text encoders: records what it encoded."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, batch: dict) -> dict[str, torch.Tensor]:
        assert batch["pixels"].shape == (1, 3, 4)
        self.prompts += batch["prompt"]
        return {
            "latents": batch["pixels"] * 2 + 1,
            "length": torch.tensor([len(batch["prompt"][0])]),
        }

    def fingerprint(self) -> str:
        return "counting"


def expected(dataset: KeyedItems, index: int) -> dict[str, torch.Tensor]:
    return {
        "latents": dataset.values[index] * 2 + 1,
        "length": torch.tensor(len(f"prompt {index}")),
    }


@pytest.fixture
def accelerator(clean_accelerate_state):
    return Accelerator(cpu=True)


class TestFillCache:
    def test_encodes_every_item_once(self, tmp_path, accelerator):
        dataset = KeyedItems(5)
        cache = TensorCache(tmp_path, "fp")
        encoder = CountingEncoder()
        fill_cache(accelerator, dataset, cache, collate, encoder)
        assert encoder.prompts == [f"prompt {i}" for i in range(5)]
        for index in range(5):
            stored = cache.load(dataset.key(index))
            assert stored.keys() == {"latents", "length"}
            for name, value in expected(dataset, index).items():
                assert stored[name].shape == value.shape  # the batch dim is dropped
                assert torch.equal(stored[name], value), (index, name)

    def test_encodes_only_missing_items(self, tmp_path, accelerator):
        dataset = KeyedItems(5)
        cache = TensorCache(tmp_path, "fp")
        fill_cache(accelerator, dataset, cache, collate, CountingEncoder())
        again = CountingEncoder()
        fill_cache(accelerator, dataset, cache, collate, again)
        assert again.prompts == []
        cache.path(dataset.key(3)).unlink()
        cache.path(dataset.key(1)).unlink()
        third = CountingEncoder()
        fill_cache(accelerator, dataset, cache, collate, third)
        assert third.prompts == ["prompt 1", "prompt 3"]
        assert all(dataset.key(i) in cache for i in range(5))

    def test_other_fingerprint_is_filled_separately(self, tmp_path, accelerator):
        dataset = KeyedItems(3)
        fill_cache(accelerator, dataset, TensorCache(tmp_path, "a"), collate, CountingEncoder())
        encoder = CountingEncoder()
        fill_cache(accelerator, dataset, TensorCache(tmp_path, "b"), collate, encoder)
        assert len(encoder.prompts) == 3


class TestStopWhileCaching:
    def test_sigterm_keeps_the_entries_written_and_says_so(self, tmp_path, accelerator, caplog):
        dataset = KeyedItems(5)
        cache = TensorCache(tmp_path, "fp")
        encoder = CountingEncoder()

        def encode(batch):
            if len(encoder.prompts) == 2:  # the scheduler's SIGTERM, during the third item
                os.kill(os.getpid(), signal.SIGTERM)
            return encoder(batch)

        before = signal.getsignal(signal.SIGTERM)
        with pytest.raises(SystemExit) as stopped:
            fill_cache(accelerator, dataset, cache, collate, encode)
        assert stopped.value.code == 128 + signal.SIGTERM
        assert [dataset.key(i) in cache for i in range(5)] == [True, True, False, False, False]
        assert "the 2 item(s) encoded so far are kept" in caplog.text
        assert signal.getsignal(signal.SIGTERM) is before  # put back
        again = CountingEncoder()
        fill_cache(accelerator, dataset, cache, collate, again)
        assert again.prompts == ["prompt 2", "prompt 3", "prompt 4"]


@dataclass(kw_only=True)
class QuantizableConfig(LowMemoryConfig, TrainConfig):
    pass


class TestQuantizedTextEncoders:
    def test_encode_into_entries_of_their_own(self, tmp_path, accelerator):
        dataset = KeyedItems(2)
        folders = set()
        # The third run finds the first run's entries: it encodes nothing.
        for mode, encoded in (("none", 2), ("int8", 2), ("none", 0)):
            config = QuantizableConfig(
                pretrained_model_name_or_path="m",
                train_data_dir="d",
                output_dir=str(tmp_path),
                cache_latents=True,
                quantize_text_encoders=mode,
            )
            encoder = CountingEncoder()
            items = encoded_items(accelerator, config, dataset, encoder, collate)
            folders.add(items.cache.folder)
            assert len(encoder.prompts) == encoded
        assert len(folders) == 2
        assert tmp_path / "cache" / "counting" in folders  # unquantized: keys as before


class TestCachedItems:
    def test_serves_stored_tensors_and_index(self, tmp_path, accelerator):
        dataset = KeyedItems(4)
        cache = TensorCache(tmp_path, "fp")
        fill_cache(accelerator, dataset, cache, collate, CountingEncoder())
        items = CachedItems(dataset, cache)
        assert len(items) == 4
        for index in (2, 0, 3, 1):
            item = items[index]
            assert item["index"] == index
            assert item.keys() == {"latents", "length", "index"}
            for name, value in expected(dataset, index).items():
                assert torch.equal(item[name], value)

    def test_reads_the_cache_not_the_dataset(self, tmp_path):
        dataset = KeyedItems(2)
        cache = TensorCache(tmp_path, "fp")
        cache.save(dataset.key(0), {"z": torch.full((2,), 7.0)})
        cache.save(dataset.key(1), {"z": torch.full((2,), 8.0)})
        items = CachedItems(dataset, cache)
        assert torch.equal(items[1]["z"], torch.full((2,), 8.0))
        assert "pixels" not in items[1]


class TestOffloadEncoders:
    """--offload_encoders: the encoders wait on the CPU and join the device around validation
    (which on this CPU-only machine is the CPU too: the plumbing, not the transfer, is tested)."""

    def test_encoders_follow_validation(self):
        encoder = torch.nn.Linear(2, 2)
        seen = []
        offload = EncoderOffload([encoder], torch.device("cpu"))

        def validate(model, step):
            seen.append((model, step, encoder.weight.device.type))
            return {"psnr": 1.0}

        wrapped = offload.around(validate)
        assert wrapped("model", 3) == {"psnr": 1.0} and seen == [("model", 3, "cpu")]

    def test_encoders_go_back_even_when_validation_fails(self):
        calls = []

        class Recording(torch.nn.Module):
            def _apply(self, fn, recurse=True):
                calls.append(fn(torch.zeros(())).device.type)
                return super()._apply(fn, recurse)

        offload = EncoderOffload([Recording()], torch.device("cpu"))

        def broken(model, step):
            raise RuntimeError("validation failed")

        with pytest.raises(RuntimeError, match="validation failed"):
            offload.around(broken)(None, 1)
        assert len(calls) == 2  # to the device, then back to the CPU

    def test_needs_the_cache(self):
        base = {"pretrained_model_name_or_path": "m", "train_data_dir": "d"}
        with pytest.raises(ValueError, match="--offload_encoders needs --cache_latents"):
            TrainConfig(**base, offload_encoders=True, cache_latents=False)
        uncached = TrainConfig(**base, cache_latents=False)
        assert offload_after_caching(uncached, [], "cpu", print) is print
