"""``data.cache``: cache fingerprints and the atomic safetensors tensor cache."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import data.cache
from data.cache import TensorCache, fingerprint, weight_files_digest
from data.images import DataError

ROOT = Path(__file__).resolve().parents[2]

PARTS = {
    "model": "/models/flux-kontext",
    "vae": {"scaling_factor": 0.3611, "shift_factor": 0.1159, "latent_channels": 16},
    "text_encoders": [{"hidden_size": 32}, {"d_model": 32}],
    "max_sequence_length": 512,
    "dtype": "torch.float32",
    "overlay": True,
    "embedder": None,
}


class TestFingerprint:
    def test_short_hex(self):
        value = fingerprint(**PARTS)
        assert len(value) == 16
        assert int(value, 16) >= 0

    def test_stable_across_calls_and_argument_order(self):
        reordered = dict(reversed(list(PARTS.items())))
        reordered["vae"] = dict(reversed(list(PARTS["vae"].items())))
        assert fingerprint(**PARTS) == fingerprint(**PARTS) == fingerprint(**reordered)

    def test_stable_across_processes(self):
        """Not Python's salted ``hash``: another interpreter with another hash seed agrees."""
        code = (
            "import json, sys; from data.cache import fingerprint; "
            "print(fingerprint(**json.loads(sys.argv[1])))"
        )
        values = set()
        for seed in ("1", "2"):
            result = subprocess.run(
                [sys.executable, "-c", code, json.dumps(PARTS)],
                cwd=ROOT,
                env={**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)},
                capture_output=True,
                text=True,
                check=True,
            )
            values.add(result.stdout.strip())
        assert values == {fingerprint(**PARTS)}

    @pytest.mark.parametrize(
        "change",
        [
            {"model": "/models/other"},
            {"vae": {**PARTS["vae"], "scaling_factor": 0.3612}},
            {"vae": {**PARTS["vae"], "extra": 1}},
            {"text_encoders": [{"hidden_size": 32}, {"d_model": 64}]},
            {"text_encoders": [{"d_model": 32}, {"hidden_size": 32}]},  # order matters
            {"max_sequence_length": 256},
            {"max_sequence_length": "512"},  # 512 and "512" differ
            {"dtype": "torch.bfloat16"},
            {"overlay": False},
            {"embedder": "/models/dinov2"},
            {"new_part": 0},
        ],
    )
    def test_sensitive_to_every_part(self, change):
        assert fingerprint(**{**PARTS, **change}) != fingerprint(**PARTS)

    def test_missing_part_differs_from_none(self):
        without = {k: v for k, v in PARTS.items() if k != "embedder"}
        assert fingerprint(**without) != fingerprint(**PARTS)

    def test_non_json_values(self):
        assert fingerprint(dtype=torch.float16) == fingerprint(dtype=torch.float16)
        assert fingerprint(dtype=torch.float16) != fingerprint(dtype=torch.bfloat16)


class TestTensorCache:
    def test_round_trip_exact(self, tmp_path):
        cache = TensorCache(tmp_path, "abc")
        tensors = {
            "latents": torch.randn(16, 4, 6),
            "half": torch.randn(3, 5).to(torch.float16),
            "bf16": torch.randn(2, 7).to(torch.bfloat16),
            "ids": torch.arange(10, dtype=torch.int64),
            "mask": torch.rand(4, 4) > 0.5,
            "bytes": torch.randint(0, 256, (3,), dtype=torch.uint8),
            "transposed": torch.randn(5, 3).t(),  # not contiguous
            "grad": torch.randn(3, requires_grad=True),
        }
        cache.save("item-1", tensors)
        assert "item-1" in cache
        loaded = cache.load("item-1")
        assert loaded.keys() == tensors.keys()
        for name, value in tensors.items():
            assert loaded[name].dtype == value.dtype, name
            assert loaded[name].device.type == "cpu"
            assert torch.equal(loaded[name], value.detach()), name

    def test_layout(self, tmp_path):
        cache = TensorCache(tmp_path, "fp1")
        cache.save("k", {"x": torch.ones(2)})
        assert cache.folder == tmp_path / "fp1"
        assert cache.path("k") == tmp_path / "fp1" / "k.safetensors"
        assert torch.equal(load_file(tmp_path / "fp1" / "k.safetensors")["x"], torch.ones(2))

    def test_contains(self, tmp_path):
        cache = TensorCache(tmp_path, "fp")
        assert "k" not in cache  # the folder does not exist yet
        cache.save("k", {"x": torch.zeros(1)})
        assert "k" in cache
        assert "other" not in cache

    def test_separate_per_fingerprint(self, tmp_path):
        first = TensorCache(tmp_path, fingerprint(model="a"))
        second = TensorCache(tmp_path, fingerprint(model="b"))
        first.save("k", {"x": torch.zeros(2)})
        assert "k" in first
        assert "k" not in second
        second.save("k", {"x": torch.ones(2)})
        assert torch.equal(first.load("k")["x"], torch.zeros(2))
        assert torch.equal(second.load("k")["x"], torch.ones(2))

    def test_overwrite(self, tmp_path):
        cache = TensorCache(tmp_path, "fp")
        cache.save("k", {"x": torch.zeros(2), "y": torch.zeros(1)})
        cache.save("k", {"x": torch.ones(3)})
        assert cache.load("k").keys() == {"x"}
        assert torch.equal(cache.load("k")["x"], torch.ones(3))

    def test_no_partial_files_left(self, tmp_path):
        cache = TensorCache(tmp_path, "fp")
        for index in range(5):
            cache.save(f"item-{index}", {"x": torch.full((2,), float(index))})
        names = sorted(p.name for p in cache.folder.iterdir())
        assert names == [f"item-{index}.safetensors" for index in range(5)]

    def test_written_elsewhere_then_renamed(self, tmp_path, monkeypatch):
        """The entry's name appears only by the rename, of a file already complete."""
        cache = TensorCache(tmp_path, "fp")
        renames = []
        real_replace = os.replace

        def replace(source, destination):
            source, destination = Path(source), Path(destination)
            assert not destination.exists()
            assert "k" not in cache
            assert torch.equal(load_file(source)["x"], torch.arange(6.0))
            renames.append((source, destination))
            real_replace(source, destination)

        monkeypatch.setattr(data.cache.os, "replace", replace)
        cache.save("k", {"x": torch.arange(6.0)})
        assert len(renames) == 1
        source, destination = renames[0]
        assert destination == cache.path("k")
        assert source.parent == cache.folder and source != destination
        assert not source.exists()


class TestWeightFilesDigest:
    @staticmethod
    def write(folder: Path, scale: float = 1.0) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"w": torch.ones(4, 4) * scale}, str(folder / "model.safetensors"))

    def test_stable_while_untouched(self, tmp_path):
        self.write(tmp_path / "vae")
        (tmp_path / "vae" / "config.json").write_text("{}")
        first = weight_files_digest([tmp_path / "vae"])
        assert list(first) == [str(tmp_path / "vae" / "model.safetensors")]
        assert weight_files_digest([tmp_path / "vae"]) == first

    def test_rewritten_weights_change_it(self, tmp_path):
        self.write(tmp_path / "vae")
        first = weight_files_digest([tmp_path / "vae"])
        os.utime(tmp_path / "vae" / "model.safetensors", ns=(0, 0))
        older = weight_files_digest([tmp_path / "vae"])
        self.write(tmp_path / "vae", scale=1.5)  # same names, shapes, size and header
        assert (
            len({json.dumps(d) for d in (first, older, weight_files_digest([tmp_path / "vae"]))})
            == 3
        )

    def test_header_changes_it_whatever_the_time(self, tmp_path):
        self.write(tmp_path / "a")
        folder = tmp_path / "a"
        stamp = (folder / "model.safetensors").stat().st_mtime_ns
        first = weight_files_digest([folder])
        save_file(
            {"w": torch.ones(4, 4, dtype=torch.float64)[:2].float().repeat(2, 1)},
            str(folder / "model.safetensors"),
            metadata={"x": "1"},
        )
        os.utime(folder / "model.safetensors", ns=(stamp, stamp))
        assert weight_files_digest([folder]) != first

    def test_missing_folder_is_empty(self, tmp_path):
        assert weight_files_digest([tmp_path / "nothing"]) == {}


class TestDamagedEntries:
    def test_a_damaged_entry_counts_as_missing_and_names_itself_when_read(self, tmp_path):
        cache = TensorCache(tmp_path, "fp")
        cache.save("item", {"z": torch.ones(3)})
        cache.path("item").write_bytes(b"\x00" * 40)  # a disk error, a stray edit
        assert "item" not in cache  # filling the cache writes it again
        with pytest.raises(DataError, match=r"latent cache entry '.*item\.safetensors' cannot"):
            cache.load("item")
        cache.save("item", {"z": torch.ones(3)})
        assert "item" in cache and torch.equal(cache.load("item")["z"], torch.ones(3))
