"""Aspect buckets, fitting to a bucket, and the bucketed batch sampler."""

import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from data.buckets import BucketBatchSampler, fit_to_bucket, make_buckets, nearest_bucket
from data.images import mask_to_tensor


class TestMakeBuckets:
    @pytest.mark.parametrize("resolution", [128, 256, 512, 1024])
    def test_properties(self, resolution):
        buckets = make_buckets(resolution)
        assert buckets == sorted(set(buckets))
        assert (resolution, resolution) in buckets
        for height, width in buckets:
            assert height % 16 == 0 and width % 16 == 0
            assert resolution**2 * (1 - 16 / resolution) < height * width <= resolution**2
            assert 0.5 <= height / width <= 2.0
            assert (width, height) in buckets

    def test_known_list(self):
        assert make_buckets(128) == [(96, 160), (112, 144), (128, 128), (144, 112), (160, 96)]

    def test_max_aspect(self):
        for height, width in make_buckets(512, max_aspect=1.5):
            assert max(height, width) / min(height, width) <= 1.5
        assert make_buckets(512, max_aspect=1.0) == [(512, 512)]

    @pytest.mark.parametrize("resolution", [100, 0, -16])
    def test_rejects_non_multiple(self, resolution):
        with pytest.raises(ValueError, match="multiple of 16"):
            make_buckets(resolution)


class TestNearestBucket:
    @pytest.mark.parametrize(
        ("height", "width", "expected"),
        [
            (128, 128, (128, 128)),
            (1000, 1000, (128, 128)),
            (130, 128, (128, 128)),
            (128, 160, (112, 144)),
            (160, 128, (144, 112)),
            (100, 200, (96, 160)),
            (200, 100, (160, 96)),
            (10, 1000, (96, 160)),
        ],
    )
    def test_known_aspects(self, height, width, expected):
        assert nearest_bucket(height, width, make_buckets(128)) == expected

    def test_log_scale_is_symmetric(self):
        buckets = [(64, 128), (128, 64)]
        # 1:1 is equally far from 1:2 and 2:1 in log scale: the first listed wins.
        assert nearest_bucket(100, 100, buckets) == (64, 128)
        assert nearest_bucket(100, 100, buckets[::-1]) == (128, 64)


class TestFitToBucket:
    def test_output_size(self):
        for size in [(96, 160), (160, 96), (128, 128)]:
            out = fit_to_bucket(Image.new("RGB", (300, 200)), size)
            assert out.size == (size[1], size[0])

    def test_identity_when_already_bucket_sized(self):
        pixels = np.random.default_rng(0).integers(0, 255, (96, 160, 3), dtype=np.uint8)
        out = fit_to_bucket(Image.fromarray(pixels), (96, 160))
        assert np.array_equal(np.asarray(out), pixels)

    def test_cover_then_centre_crop_keeps_image_and_mask_aligned(self):
        # 300x200 (W x H) into (96, 160): scale = max(96/200, 160/300) = 8/15, the centred
        # 300x180 source region is kept (10 rows cut top and bottom). A rectangle spanning
        # rows 40..130, columns 75..225 lands on rows 16..64, columns 40..120.
        image = Image.new("RGB", (300, 200), (0, 0, 0))
        mask = Image.new("L", (300, 200), 0)
        ImageDraw.Draw(image).rectangle((75, 40, 224, 129), fill=(255, 255, 255))
        ImageDraw.Draw(mask).rectangle((75, 40, 224, 129), fill=255)
        fitted_image = fit_to_bucket(image, (96, 160), Image.Resampling.LANCZOS)
        fitted_mask = mask_to_tensor(fit_to_bucket(mask, (96, 160), Image.Resampling.BILINEAR))
        expected = torch.zeros(1, 96, 160)
        expected[:, 16:64, 40:120] = 1
        assert torch.equal(fitted_mask, expected)
        assert torch.equal(mask_to_tensor(fitted_image), fitted_mask)

    def test_upscaling_keeps_alignment(self):
        image = Image.new("RGB", (40, 50), (0, 0, 0))
        mask = Image.new("L", (40, 50), 0)
        ImageDraw.Draw(image).ellipse((5, 10, 30, 40), fill=(255, 255, 255))
        ImageDraw.Draw(mask).ellipse((5, 10, 30, 40), fill=255)
        fitted_image = mask_to_tensor(fit_to_bucket(image, (144, 112)))
        fitted_mask = mask_to_tensor(fit_to_bucket(mask, (144, 112), Image.Resampling.BILINEAR))
        disagree = (fitted_image != fitted_mask).sum().item()
        assert fitted_mask.sum() > 1000 and disagree <= 0.01 * fitted_mask.sum()


def _bucket_ids(sizes):
    return [bucket for bucket, count in enumerate(sizes) for _ in range(count)]


def _epoch(sampler, epoch=0):
    sampler.set_epoch(epoch)
    return list(sampler)


class TestBucketBatchSampler:
    BUCKETS = _bucket_ids([7, 10, 6])  # 23 items in 3 buckets

    def test_one_bucket_per_batch_and_every_index_once(self):
        sampler = BucketBatchSampler(self.BUCKETS, 4, seed=0)
        batches = _epoch(sampler)
        assert len(batches) == len(sampler) == 2 + 3 + 2
        for batch in batches:
            assert len({self.BUCKETS[index] for index in batch}) == 1
            assert 1 <= len(batch) <= 4
        assert sorted(index for batch in batches for index in batch) == list(range(23))

    def test_ranks_cover_every_index_with_equal_step_counts(self):
        for num_replicas in (2, 3, 4):
            per_rank = [
                _epoch(BucketBatchSampler(self.BUCKETS, 4, seed=1, num_replicas=n, rank=r))
                for n, r in [(num_replicas, rank) for rank in range(num_replicas)]
            ]
            counts = {len(batches) for batches in per_rank}
            assert counts == {math.ceil(7 / num_replicas)}
            seen = Counter(index for batches in per_rank for batch in batches for index in batch)
            assert set(seen) == set(range(23))
            # Padding repeats whole batches from the start of the epoch's order only.
            padded = 7 % num_replicas and num_replicas - 7 % num_replicas
            single = _epoch(BucketBatchSampler(self.BUCKETS, 4, seed=1))
            assert sum(seen.values()) == 23 + sum(len(b) for b in single[:padded])

    def test_rank_batch_count_is_a_multiple_of_accumulation(self):
        # 7 batches, 2 ranks, accumulation 3: padded to 12, 6 per rank.
        samplers = [
            BucketBatchSampler(
                self.BUCKETS, 4, seed=2, num_replicas=2, rank=r, gradient_accumulation_steps=3
            )
            for r in range(2)
        ]
        per_rank = [_epoch(sampler) for sampler in samplers]
        assert [len(sampler) for sampler in samplers] == [6, 6]
        assert [len(batches) for batches in per_rank] == [6, 6]
        single = _epoch(BucketBatchSampler(self.BUCKETS, 4, seed=2))
        assert per_rank[0] + per_rank[1] != single  # dealt round-robin, not in halves
        assert [per_rank[i % 2][i // 2] for i in range(12)] == single + single[:5]

    def test_repeated_batches_are_counted(self):
        # The example: 40 items, batch 1, 8 ranks, accumulation 4 -> 64 batches.
        for rank in (0, 7):
            sampler = BucketBatchSampler(
                [0] * 40, 1, seed=0, num_replicas=8, rank=rank, gradient_accumulation_steps=4
            )
            assert sampler.repeated_batches == 24 and sampler.batches_per_epoch == 8
        assert BucketBatchSampler(self.BUCKETS, 4, seed=2).repeated_batches == 0
        two_by_three = BucketBatchSampler(
            self.BUCKETS, 4, seed=2, num_replicas=2, gradient_accumulation_steps=3
        )
        assert two_by_three.repeated_batches == 12 - 7

    def test_ranks_are_disjoint_without_padding(self):
        buckets = _bucket_ids([8, 8, 8])  # 6 batches of 4: no padding for 2 or 3 ranks
        for num_replicas in (2, 3):
            per_rank = [
                {
                    index
                    for batch in _epoch(
                        BucketBatchSampler(buckets, 4, seed=5, num_replicas=num_replicas, rank=r)
                    )
                    for index in batch
                }
                for r in range(num_replicas)
            ]
            assert sum(len(indices) for indices in per_rank) == 24
            assert set().union(*per_rank) == set(range(24))

    def test_order_is_a_function_of_seed_and_epoch(self):
        first = _epoch(BucketBatchSampler(self.BUCKETS, 3, seed=7), epoch=2)
        again = _epoch(BucketBatchSampler(self.BUCKETS, 3, seed=7), epoch=2)
        assert first == again
        assert _epoch(BucketBatchSampler(self.BUCKETS, 3, seed=7), epoch=3) != first
        assert _epoch(BucketBatchSampler(self.BUCKETS, 3, seed=8), epoch=2) != first

    def test_leaves_global_rng_untouched(self):
        torch_state = torch.random.get_rng_state()
        # The legacy global NumPy state is exactly what must stay untouched.
        numpy_state = np.random.get_state()[1].copy()  # noqa: NPY002
        sampler = BucketBatchSampler(self.BUCKETS, 3, seed=0)
        for epoch in range(3):
            _epoch(sampler, epoch)
        assert torch.equal(torch.random.get_rng_state(), torch_state)
        assert np.array_equal(np.random.get_state()[1], numpy_state)  # noqa: NPY002

    def test_drop_last(self):
        sampler = BucketBatchSampler(self.BUCKETS, 4, seed=0, drop_last=True)
        batches = _epoch(sampler)
        assert len(batches) == len(sampler) == 1 + 2 + 1
        assert all(len(batch) == 4 for batch in batches)

    def test_no_shuffle_is_index_order(self):
        batches = _epoch(BucketBatchSampler(self.BUCKETS, 4, seed=0, shuffle=False))
        assert batches[:2] == [[0, 1, 2, 3], [4, 5, 6]]

    def test_resume_mid_epoch(self):
        sampler = BucketBatchSampler(self.BUCKETS, 2, seed=3, num_replicas=2, rank=1)
        full = _epoch(sampler, epoch=4)
        sampler.set_epoch(4, start_batch=3)
        assert len(sampler) == len(full) - 3
        assert list(sampler) == full[3:]
        sampler.set_epoch(5)
        assert len(sampler) == len(full)

    def test_invalid_arguments(self):
        with pytest.raises(ValueError, match="rank"):
            BucketBatchSampler(self.BUCKETS, 2, seed=0, num_replicas=2, rank=2)
        with pytest.raises(ValueError, match="batch_size"):
            BucketBatchSampler(self.BUCKETS, 0, seed=0)
        with pytest.raises(ValueError, match="no batches"):
            BucketBatchSampler([0, 1, 2], 2, seed=0, drop_last=True)
        with pytest.raises(ValueError, match="no items"):
            BucketBatchSampler([], 2, seed=0)
        with pytest.raises(ValueError, match="start_batch"):
            BucketBatchSampler(self.BUCKETS, 2, seed=0).set_epoch(0, start_batch=100)
